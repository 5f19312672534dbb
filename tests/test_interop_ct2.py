"""CTranslate2 models in (from_ctranslate2) and out (export_ctranslate2), compared with
ctranslate2.Translator.translate_batch on small random models."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2")

import pytransformer as pt  # noqa: E402
from pytransformer.interop import export_ctranslate2, from_ctranslate2, from_marian  # noqa: E402
from pytransformer.interop.ct2_format import read_model_bin, write_model_bin  # noqa: E402
from pytransformer.io import CheckpointError  # noqa: E402
from pytransformer.text.vocab import VocabTokenizer  # noqa: E402
from pytransformer.translator import Translator  # noqa: E402

ACT = {"relu": 0, "swish": 2, "gelu": 3}


def _spec_model(out, *, pre_norm, activation="relu", layers=(2, 1), heads=2, C=16, F=24, V=20,
                quantization="float32", shared=True, seed=0):
    """A TransformerSpec with random weights written by ctranslate2 itself."""
    from ctranslate2.specs import TransformerSpec, common_spec

    rng = np.random.default_rng(seed)
    spec = TransformerSpec.from_config(layers, heads, pre_norm=pre_norm,
                                       activation=common_spec.Activation(ACT[activation]))

    def lin(s, o, i):
        s.weight = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
        s.bias = (0.1 * rng.standard_normal(o)).astype(np.float32)

    def ln(s):
        s.gamma = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
        s.beta = (0.1 * rng.standard_normal(C)).astype(np.float32)

    for stack in (spec.encoder, spec.decoder):
        emb = stack.embeddings[0] if isinstance(stack.embeddings, list) else stack.embeddings
        emb.weight = (0.5 * rng.standard_normal((V, C))).astype(np.float32)
        if pre_norm:
            ln(stack.layer_norm)
        for layer in stack.layer:
            lin(layer.self_attention.linear[0], 3 * C, C)
            lin(layer.self_attention.linear[1], C, C)
            ln(layer.self_attention.layer_norm)
            if hasattr(layer, "attention"):
                lin(layer.attention.linear[0], C, C)
                lin(layer.attention.linear[1], 2 * C, C)
                lin(layer.attention.linear[2], C, C)
                ln(layer.attention.layer_norm)
            lin(layer.ffn.linear_0, F, C)
            lin(layer.ffn.linear_1, C, F)
            ln(layer.ffn.layer_norm)
    if shared:
        spec.encoder.embeddings[0].weight = spec.decoder.embeddings.weight
    spec.decoder.projection.weight = spec.decoder.embeddings.weight
    spec.decoder.projection.bias = (0.3 * rng.standard_normal(V)).astype(np.float32)
    toks = ["<blank>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, V)]
    spec.register_source_vocabulary(toks)
    spec.register_target_vocabulary(toks)
    spec.validate()
    spec.optimize(quantization=quantization)
    os.makedirs(out, exist_ok=True)
    spec.save(str(out))
    return toks


def _batch(toks, n=12, seed=1):
    rng = np.random.default_rng(seed)
    return [list(rng.choice(toks[4:], size=rng.integers(1, 8))) for _ in range(n)]


def _ct2(path, batch, **kw):
    tr = ctranslate2.Translator(str(path), device="cpu", compute_type="float32")
    return tr.translate_batch(batch, max_decoding_length=16, return_scores=True, **kw)


CASES = {
    "post-relu-f32": dict(pre_norm=False),
    "pre-swish-f32": dict(pre_norm=True, activation="swish", layers=(1, 2)),
    "pre-gelu-f16": dict(pre_norm=True, activation="gelu", quantization="float16"),
    "post-int8": dict(pre_norm=False, quantization="int8", shared=False),
    "pre-int16": dict(pre_norm=True, quantization="int16", heads=4),
}


def _log_probs(tr, src, tgt):
    """Our teacher-forced log-probabilities of tgt's tokens and the final EOS (float64)."""
    s = np.array([tr.src_tokenizer.encode_tokens(src)])
    t = tr.tgt_tokenizer.encode_tokens(tgt)
    cfg = tr.model.config
    logits = tr.model.forward(s, np.array([s.shape[1]]), np.array([[cfg.bos_id] + t]))[0]
    logits = logits.astype(np.float64)
    m = logits.max(1, keepdims=True)
    ls = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return ls[np.arange(len(t) + 1), t + [cfg.eos_id]]


def _assert_scores_close(path, tr, batch, targets):
    """CTranslate2's score_batch (its own forward) and ours agree on every token's
    log-probability within 1e-4: the models are the same, not only their argmax."""
    ct = ctranslate2.Translator(str(path), device="cpu", compute_type="float32")
    for src, tgt in zip(batch, targets, strict=True):
        ref = np.array(ct.score_batch([src], [tgt])[0].log_probs)
        np.testing.assert_allclose(_log_probs(tr, src, tgt), ref, atol=1e-4)


def _assert_greedy_equal(path, batch, ours, ref):
    """Equal token lists, except where greedy met a tie: at the first difference CTranslate2's
    own log-probabilities (score_batch) of the two chosen tokens must agree within 1e-4."""
    tr = ctranslate2.Translator(str(path), device="cpu", compute_type="float32")
    for src, a, r in zip(batch, ours, ref, strict=True):
        b = r.hypotheses[0]
        if a == b:
            continue
        k = next(i for i in range(min(len(a), len(b)) + 1) if i >= min(len(a), len(b))
                 or a[i] != b[i])
        pa, pb = (tr.score_batch([src], [h[: k + 1] if k < len(h) else h])[0].log_probs[k]
                  for h in (a, b))
        assert abs(pa - pb) < 1e-4, (src, a, b, pa, pb)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_imported_greedy_matches_translate_batch(tmp_path, case):
    toks = _spec_model(tmp_path, **case)
    tr = from_ctranslate2(tmp_path)
    batch = _batch(toks)
    ref = _ct2(tmp_path, batch, beam_size=1)
    ours = tr.translate_tokens(batch, beam_size=1, max_decoding_length=16)
    _assert_greedy_equal(tmp_path, batch, ours, ref)
    assert sum(a == r.hypotheses[0] for a, r in zip(ours, ref, strict=True)) >= len(batch) - 1
    _assert_scores_close(tmp_path, tr, batch[:4], [r.hypotheses[0] for r in ref[:4]])
    _assert_scores_close(tmp_path, tr, batch[:2], [["w5", "w9", "w7"], batch[3]])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_imported_beam_matches_translate_batch(tmp_path, length_penalty):
    """Beam 4, CTranslate2's rules on both sides (its default min_decoding_length of 1 given to
    ours): every sentence the same (tests/test_search_ct2.py checks the options one by one)."""
    toks = _spec_model(tmp_path, pre_norm=True)
    tr = from_ctranslate2(tmp_path)
    batch = _batch(toks, seed=4)
    ref = _ct2(tmp_path, batch, beam_size=4, length_penalty=length_penalty)
    ours = tr.translate_tokens(batch, beam_size=4, length_penalty=length_penalty,
                               max_decoding_length=16, min_decoding_length=1)
    assert ours == [r.hypotheses[0] for r in ref]


def test_export_round_trip_matches_ctranslate2(tmp_path):
    cfg = pt.TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=16, num_heads=2,
                               d_ff=24, num_encoder_layers=1, num_decoder_layers=2,
                               activation="swish", positional_encoding="halves",
                               tie_embeddings="all", norm_first=True, pad_id=0, bos_id=1,
                               eos_id=2, max_len=64)
    model = pt.Transformer(cfg, seed=3)
    for p in model.parameters().values():
        p *= 3.0  # outputs that depend on the source
    toks = ["<blank>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 20)]
    tok = VocabTokenizer(toks, pad="<blank>", bos="<s>", eos="</s>", unk="<unk>", skip=["</s>"])
    Translator(model, tok, tok).save(tmp_path / "ours")
    out = export_ctranslate2(tmp_path / "ours", tmp_path / "ct2")
    batch = _batch(toks, seed=2)
    ref = _ct2(out, batch, beam_size=1)
    ours = Translator.load(tmp_path / "ours").translate_tokens(batch, beam_size=1,
                                                               max_decoding_length=16)
    assert ours == [r.hypotheses[0] for r in ref]
    _assert_scores_close(out, Translator.load(tmp_path / "ours"), batch[:3], ours[:3])
    back = from_ctranslate2(out)
    assert back.translate_tokens(batch, beam_size=1, max_decoding_length=16) == ours
    with pytest.raises(FileExistsError):
        export_ctranslate2(tmp_path / "ours", out)


@pytest.mark.parametrize("version,spec", [(1, ""), (2, "TransformerBase"), (3, "TransformerBase")])
def test_old_binary_version_reads(tmp_path, version, spec):
    """Versions 1-3 (item sizes, not type ids; aliases only from 3; no spec name in 1) written
    from the documented layout, as TransformerBase (8 heads, pre-norm, ReLU): CTranslate2 and
    we agree on tokens and log-probabilities."""
    toks = _spec_model(tmp_path / "new", pre_norm=True, heads=8)
    mb = read_model_bin(tmp_path / "new" / "model.bin")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    if version >= 3:
        keep = {k: v for k, v in mb.variables.items() if k not in mb.aliases and v.ndim > 0}
        aliases = {a: t for a, t in mb.aliases.items() if t in keep}
    else:
        keep = {k: v for k, v in mb.variables.items() if v.ndim > 0}
        aliases = {}
    write_model_bin(old / "model.bin", spec, 1, keep, aliases, version=version)
    batch = _batch(toks, seed=6)
    ref = _ct2(old, batch, beam_size=1)
    imported = from_ctranslate2(old)
    ours = imported.translate_tokens(batch, beam_size=1, max_decoding_length=16)
    assert ours == [r.hypotheses[0] for r in ref]
    _assert_scores_close(old, imported, batch[:3], [["w5", "w6"], batch[0], batch[1]])


def test_hugging_face_marian_through_ct2_converter(tmp_path):
    """The Marian model converted by CTranslate2's own TransformersConverter (which drops the
    pad token and starts the decoder from a zero embedding) imports to the same tokens."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from interop_cases import make_marian, sentences

    make_marian(tmp_path / "hf")
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(tmp_path / "hf")).convert(str(tmp_path / "ct2"))
    ct2 = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    ours = from_ctranslate2(tmp_path / "ct2")
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
    itos = sorted(vocab, key=vocab.get)
    marian = from_marian(tmp_path / "hf")
    batch = [[itos[i] for i in marian.src_tokenizer.encode(s)] for s in sentences(16, seed=8)]
    ref = ct2.translate_batch(batch, beam_size=1, max_decoding_length=16)
    got = ours.translate_tokens(batch, beam_size=1, max_decoding_length=16)
    assert got == [r.hypotheses[0] for r in ref]
    _assert_scores_close(tmp_path / "ct2", ours, batch[:4], [batch[4], batch[5], *got[:2]])


def test_bad_ct2_inputs(tmp_path):
    toks = _spec_model(tmp_path / "m", pre_norm=False)
    data = (tmp_path / "m" / "model.bin").read_bytes()
    for name, edit in (
        ("truncated", lambda d: d[: len(d) // 3]),
        ("newer", lambda d: struct.pack("<I", 99) + d[4:]),
    ):
        bad = tmp_path / name
        shutil.copytree(tmp_path / "m", bad)
        (bad / "model.bin").write_bytes(edit(data))
        with pytest.raises(CheckpointError, match="model.bin"):
            from_ctranslate2(bad)
    vocab = tmp_path / "vocab"
    shutil.copytree(tmp_path / "m", vocab)
    (vocab / "shared_vocabulary.json").write_text(json.dumps(toks[:-1]))
    with pytest.raises(CheckpointError, match="shared_vocabulary.json"):
        from_ctranslate2(vocab)
    mb = read_model_bin(tmp_path / "m" / "model.bin")
    for name, spec, var in (("arch", "WhisperSpec", {}),
                            ("act", "TransformerSpec", {"encoder/activation": np.int8(5),
                                                        "decoder/activation": np.int8(5)})):
        bad = tmp_path / name
        shutil.copytree(tmp_path / "m", bad)
        variables = {k: v for k, v in mb.variables.items() if k not in mb.aliases}
        variables.update({k: np.asarray(v) for k, v in var.items()})
        write_model_bin(bad / "model.bin", spec, 7, variables,
                        {a: t for a, t in mb.aliases.items() if t in variables})
        with pytest.raises(CheckpointError, match="not supported"):
            from_ctranslate2(bad)
    os.remove(vocab / "model.bin")
    with pytest.raises(CheckpointError, match="model.bin"):
        from_ctranslate2(vocab)


def test_cli_convert_translate_export(tmp_path, capsys):
    from pytransformer.cli import main

    toks = _spec_model(tmp_path / "ct2", pre_norm=True)
    assert main(["convert", "--from", "ctranslate2", str(tmp_path / "ct2"),
                 "--out", str(tmp_path / "ours")]) == 0
    batch = _batch(toks, n=4, seed=3)
    (tmp_path / "in.txt").write_text("".join(" ".join(b) + "\n" for b in batch))
    assert main(["translate", "--model", str(tmp_path / "ours"), "--input",
                 str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt"),
                 "--beam-size", "1", "--max-decoding-length", "16"]) == 0
    ref = _ct2(tmp_path / "ct2", batch, beam_size=1)
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert lines == [" ".join(r.hypotheses[0]) for r in ref]
    assert main(["export", "--to", "ctranslate2", str(tmp_path / "ours"),
                 str(tmp_path / "back")]) == 0
    again = _ct2(tmp_path / "back", batch, beam_size=1)
    assert [r.hypotheses for r in again] == [r.hypotheses for r in ref]
    # OUT exists: a one-line error, nothing overwritten
    assert main(["convert", "--from", "ctranslate2", str(tmp_path / "ct2"),
                 "--out", str(tmp_path / "ours")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--from", "marian", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_exported_marian_import_loads_in_ctranslate2(tmp_path):
    """A Marian import exported again: CTranslate2 starts from the pad token (our bos_id) and
    adds our "halves" position table; with the pad suppressed there as here, same tokens and
    per-token log-probabilities."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from interop_cases import make_marian, sentences

    make_marian(tmp_path / "hf", share=False, tie=False, activation="gelu")
    marian = from_marian(tmp_path / "hf")
    marian.save(tmp_path / "ours")
    out = export_ctranslate2(tmp_path / "ours", tmp_path / "ct2")
    assert json.loads((out / "config.json").read_text())["add_source_eos"]  # as Marian's
    src = [marian.src_tokenizer.decode_tokens(marian.src_tokenizer.encode(s))
           for s in sentences(8, seed=2)]
    ct = ctranslate2.Translator(str(out), device="cpu", compute_type="float32")
    ref = ct.translate_batch(src, beam_size=1, max_decoding_length=12,
                             suppress_sequences=[["<pad>"]])
    got = marian.translate_tokens(src, beam_size=1, max_decoding_length=12)
    assert got == [r.hypotheses[0] for r in ref]


def test_separate_text_vocabularies(tmp_path):
    """source_vocabulary.txt and target_vocabulary.txt (the older text form), different
    target tokens: read as CTranslate2 reads them."""
    toks = _spec_model(tmp_path, pre_norm=True, shared=False)
    os.remove(tmp_path / "shared_vocabulary.json")
    tgt = toks[:4] + [f"t{i}" for i in range(4, len(toks))]
    (tmp_path / "source_vocabulary.txt").write_text("".join(t + "\n" for t in toks))
    (tmp_path / "target_vocabulary.txt").write_text("".join(t + "\n" for t in tgt))
    batch = _batch(toks, seed=9)
    ref = _ct2(tmp_path, batch, beam_size=1)
    tr = from_ctranslate2(tmp_path)
    assert tr.translate_tokens(batch, beam_size=1, max_decoding_length=16) == [
        r.hypotheses[0] for r in ref]
    _assert_scores_close(tmp_path, tr, batch[:2], [["t5", "t9"], ["t7", "w5"]])
