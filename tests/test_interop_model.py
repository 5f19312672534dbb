"""The model features imported models need: gradients of the new variants against finite
differences, the position tables against their formulas, suppress_ids, old configs loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_cases import check_gradients, random_batch, tiny_config

import pytransformer as pt
from pytransformer.nn.layers import position_table, swish, swish_backward


@pytest.mark.parametrize("overrides", [
    dict(activation="swish", positional_encoding="halves", scale_embedding=False),
    dict(activation="swish", tie_embeddings="embeddings", tgt_vocab_size=19, norm_first=True,
         positional_encoding="tensor2tensor"),
], ids=["swish-halves-noscale", "swish-embeddings-tie-prenorm"])
def test_new_variants_gradients(overrides, threads):
    threads(1)
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1, **overrides)
    model = pt.Transformer(cfg, seed=1)
    batch = random_batch(cfg, np.random.default_rng(2), B=2, S=5, T=4)
    check_gradients(model, batch)


@pytest.mark.parametrize("n", [1, 7, 8, 601, 20011])
def test_swish_kernels_against_float64(n, isa):
    """Each ISA's kernel (and the scalar sibling) against float64 numpy, sizes not multiples of
    the vector width, saturated tails included."""
    from pytransformer import _C

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 12).astype(np.float32)
    x[: min(n, 4)] = [-100.0, 100.0, 0.0, -1e-3][: min(n, 4)]
    x64 = x.astype(np.float64)
    s = 1 / (1 + np.exp(-x64))
    dy = rng.standard_normal(n).astype(np.float32)
    grad = dy * s * (1 + x64 * (1 - s))
    for fwd, bwd in ((swish, swish_backward), (_C._naive.swish, _C._naive.swish_backward)):
        np.testing.assert_allclose(fwd(x), x64 * s, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(bwd(dy, x), grad, rtol=2e-5, atol=1e-6)
    y = x.copy()
    assert pt.ops.swish(y, out=y) is y
    np.testing.assert_allclose(y, x64 * s, rtol=2e-6, atol=1e-7)
    with pytest.raises(TypeError, match="x"):
        pt.ops.swish(x.astype(np.float64))


@pytest.mark.parametrize("C", [6, 7, 16])
def test_position_tables(C):
    pos = np.arange(9, dtype=np.float64)[:, None]
    h = (C + 1) // 2
    rate = 10000.0 ** (-2 * np.arange(h) / C)
    halves = position_table("halves", 9, C)
    np.testing.assert_allclose(halves[:, :h], np.sin(pos * rate), atol=1e-6)
    np.testing.assert_allclose(halves[:, h:], np.cos(pos * rate)[:, : C - h], atol=1e-6)
    inter = position_table("interleaved", 9, C)
    np.testing.assert_allclose(inter[:, 0::2], np.sin(pos * rate), atol=1e-6)
    t2t = position_table("tensor2tensor", 9, C)
    rate2 = np.exp(-np.log(10000.0) * np.arange(h) / max(C // 2 - 1, 1))
    np.testing.assert_allclose(t2t[:, :h], np.sin((pos + 1) * rate2), atol=1e-6)  # from 1


def test_suppress_ids_validated_and_never_emitted():
    with pytest.raises(ValueError, match="suppress_ids"):
        tiny_config(suppress_ids=(99,))
    with pytest.raises(TypeError, match="suppress_ids"):
        tiny_config(suppress_ids="3")
    cfg = tiny_config()
    model = pt.Transformer(cfg, seed=0)
    srcs = [[3, 4, 5], [6, 7]]
    free = model.translate(srcs, beam_size=1, max_decoding_length=12)
    emitted = {t for r in free for t in r.hypotheses[0]}
    banned = tuple(sorted(emitted))[:2]
    cfg2 = tiny_config(suppress_ids=banned)
    model2 = pt.Transformer(cfg2, seed=0)
    for beam in (1, 3):
        res = model2.translate(srcs, beam_size=beam, max_decoding_length=12)
        assert not {t for r in res for t in r.hypotheses[0]} & set(banned)


def test_old_config_loads_with_defaults(tmp_path):
    model = pt.Transformer(tiny_config(), seed=0)
    model.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("positional_encoding", "scale_embedding", "suppress_ids"):
        del cfg[key]
    old = pt.TransformerConfig.from_dict(cfg)
    assert old.positional_encoding == "interleaved" and old.scale_embedding
    assert old.suppress_ids == ()


def test_vocab_tokenizer_round_trip(tmp_path):
    from pytransformer.text.tokenizer import load_tokenizer
    from pytransformer.text.vocab import VocabTokenizer

    toks = ["</s>", "<unk>", "a", "b", ">>de<<", "<pad>"]
    tok = VocabTokenizer(toks, append_eos=True)
    assert tok.tokens(">>de<< a  b c") == [">>de<<", "a", "b", "c"]
    assert tok.encode(">>de<< a b c") == [4, 2, 3, 1, 0]
    assert tok.decode([2, 1, 3, 0, 5]) == "a <unk> b"  # tokens: eos, pad left out
    assert tok.decode_tokens([2, 1, 3, 0, 5]) == ["a", "<unk>", "b"]
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode("a b") == tok.encode("a b") and again.itos == toks
    with pytest.raises(ValueError, match="appears twice"):
        VocabTokenizer(["a", "a", "</s>", "<unk>", "<pad>"])
    with pytest.raises(ValueError, match="special token"):
        VocabTokenizer(["a", "</s>", "<unk>"])


def test_translate_tokens_checks_its_input():
    from pytransformer.text.tokenizer import CharTokenizer
    from pytransformer.text.vocab import VocabTokenizer
    from pytransformer.translator import Translator

    toks = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 23)]
    cfg = tiny_config()
    src = VocabTokenizer(toks[:19], bos="<s>")
    tr = Translator(pt.Transformer(cfg, seed=0), src, VocabTokenizer(toks, bos="<s>"))
    out = tr.translate_tokens([["w4", "w5"], ["nope"]], beam_size=1, max_decoding_length=5)
    assert len(out) == 2 and all(isinstance(t, str) for h in out for t in h)
    with pytest.raises(TypeError, match="batch"):
        tr.translate_tokens("w4 w5")
    with pytest.raises(TypeError, match=r"batch\[0\]"):
        tr.translate_tokens([[4, 5]])
    chars = Translator(pt.Transformer(tiny_config(src_vocab_size=7, tgt_vocab_size=7), seed=0),
                       CharTokenizer(list("abc")), CharTokenizer(list("abc")))
    with pytest.raises(TypeError, match="VocabTokenizer"):
        chars.translate_tokens([["a"]])


def test_output_directory_is_never_half_written(tmp_path):
    from pytransformer.interop._files import write_directory

    def fail(tmp):
        (tmp / "model.bin").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_directory(tmp_path / "out", fail)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the temporary directory
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "data.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists"):
        write_directory(tmp_path / "keep", lambda tmp: None)
    assert (tmp_path / "keep" / "data.txt").read_text() == "user data"
    (tmp_path / "empty").mkdir()
    out = write_directory(tmp_path / "empty", lambda tmp: (tmp / "f").write_text("x"))
    assert (out / "f").read_text() == "x"


def test_cli_translate_uses_the_models_options(tmp_path):
    """An imported model's defaults (options.json) apply unless the command line sets them."""
    from pytransformer.cli import main
    from pytransformer.text.vocab import VocabTokenizer
    from pytransformer.translator import Translator

    toks = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 23)]
    tr = Translator(pt.Transformer(tiny_config(), seed=0), VocabTokenizer(toks[:19], bos="<s>"),
                    VocabTokenizer(toks, bos="<s>"))
    tr.options = {"max_decoding_length": 2, "beam_size": 1}
    tr.save(tmp_path / "m")
    (tmp_path / "in.txt").write_text("w4 w5 w6\nw7\n")
    for extra, most in (([], 2), (["--max-decoding-length", "5"], 5)):
        out = tmp_path / f"out{most}.txt"
        assert main(["translate", "--model", str(tmp_path / "m"), "--input",
                     str(tmp_path / "in.txt"), "--output", str(out), *extra]) == 0
        lines = out.read_text().splitlines()
        assert len(lines) == 2 and all(len(line.split()) <= most for line in lines)
    assert any(len(line.split()) > 2 for line in (tmp_path / "out5.txt").read_text().splitlines())
