"""Vocabulary shortlists: `decode.vmap.VocabMap` (union semantics against a brute-force set union,
the CTranslate2 vmap file format, its errors) and the decoder state's `vocab_subset` (the subset's
logits are the full vocabulary's, bit for bit, -inf elsewhere; greedy decoding inside a subset
that holds the full-vocabulary path is unchanged)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import BOS, EOS, random_batch, small_config, tiny_config

import pytransformer as pt
from pytransformer.decode.vmap import VMAP_FILE, VocabMap, load_vmap
from pytransformer.models.quantize import quantize_model

# -- VocabMap ------------------------------------------------------------------------------------

_ids = st.lists(st.integers(0, 40), max_size=6)
_rules = st.dictionaries(
    st.one_of(st.integers(0, 15), st.tuples(st.integers(0, 15), st.integers(0, 15))),
    _ids, max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(rules=_rules, always=_ids,
       sources=st.lists(st.lists(st.integers(0, 15), max_size=8), min_size=1, max_size=4))
def test_subset_is_the_union_of_the_matching_rules(rules, always, sources):
    vm = VocabMap(rules, always)
    want = set(always)
    for src in sources:
        for key, targets in rules.items():
            gram = key if isinstance(key, tuple) else (key,)
            n = len(gram)
            if any(tuple(src[i : i + n]) == gram for i in range(len(src) - n + 1)):
                want |= set(targets)
    got = vm.subset([np.array(s, np.int64) for s in sources])
    assert got.dtype == np.int64 and got.ndim == 1
    assert got.tolist() == sorted(want)
    assert vm.subset(sources).tolist() == sorted(want)  # plain lists too
    union = set()
    for s in sources:
        union |= set(vm.candidates(s).tolist())
    assert union | set(always) == want


def test_list_rules_empty_key_and_repeated_keys():
    vm = VocabMap([[5, 3], [], [7]], always=[2, 2, 1])
    assert vm.always.tolist() == [1, 2]
    assert vm.subset([[0], [2, 9]]).tolist() == [1, 2, 3, 5, 7]
    vm = VocabMap({(): [4], 3: [8], (3,): [6]}, always=[2])
    assert vm.always.tolist() == [2, 4]  # the empty n-gram is always allowed
    assert list(vm.rules) == [(3,)] and vm.rules[(3,)].tolist() == [6, 8]
    assert vm.subset([[]]).tolist() == [2, 4]


def test_vocab_map_rejects_bad_arguments():
    with pytest.raises(TypeError, match="rules"):
        VocabMap("abc")
    with pytest.raises(TypeError, match="ids"):
        VocabMap({1: [1.5]})
    with pytest.raises(TypeError, match="ids"):
        VocabMap({True: [1]})
    with pytest.raises(ValueError, match="tuple"):
        VocabMap({"a": [1]})
    with pytest.raises(IndexError, match="negative"):
        VocabMap({1: [-1]})
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        VocabMap({1: [10]}, tgt_vocab_size=10)
    vm = VocabMap({1: [3]})
    with pytest.raises(TypeError, match="sources"):
        vm.subset(5)
    with pytest.raises(TypeError, match=r"sources\[0\]"):
        vm.subset(["abc"])
    with pytest.raises(TypeError, match=r"sources\[1\]"):
        vm.subset([[1], [0.5]])
    with pytest.raises(ValueError, match=r"sources\[0\]"):
        vm.subset([np.zeros((2, 2), np.int64)])
    with pytest.raises(IndexError, match=r"sources\[0\]"):
        vm.subset([[-3]])


SRC = ["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "sat", "on", "mat"]
TGT = ["<pad>", "<s>", "</s>", "<unk>", "le", "la", "chat", "assis", "sur", "tapis", "un"]
S2I = {t: i for i, t in enumerate(SRC)}
T2I = {t: i for i, t in enumerate(TGT)}


def test_reads_the_ctranslate2_format(tmp_path):
    path = tmp_path / "vmap.txt"
    path.write_text(
        "\tle la\n"              # always allowed
        "the\tle la un\n"
        "cat\tchat\r\n"          # CRLF line ends are fine
        "\n"                     # blank lines are skipped
        "sat on\tassis sur\n"    # a bigram
        "cat\tle\n",             # a repeated source side adds up
        encoding="utf-8",
    )
    vm = VocabMap.from_file(path, S2I, T2I, always=[2])
    assert vm.always.tolist() == [2, 4, 5]
    assert vm.max_ngram == 2
    assert vm.rules.keys() == {(4,), (5,), (6, 7)}
    assert vm.rules[(5,)].tolist() == [4, 6]
    ids = vm.subset([[S2I[w] for w in "the cat sat on".split()]])
    assert [TGT[i] for i in ids] == ["</s>", "le", "la", "chat", "assis", "sur", "un"]
    assert vm.subset([[S2I["sat"], S2I["mat"], S2I["on"]]]).tolist() == [2, 4, 5]  # no bigram
    assert vm.skipped == {"rules": 0, "targets": 0}


def test_unknown_tokens_are_skipped_and_counted_or_rejected(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("the\tle zzz\nqqq\tchat\ndog cat\tchat\ncat\tchat\n", encoding="utf-8")
    vm = VocabMap.from_file(path, S2I, T2I)
    assert vm.skipped == {"rules": 2, "targets": 1}
    assert vm.rules.keys() == {(4,), (5,)} and vm.rules[(4,)].tolist() == [4]
    with pytest.raises(ValueError, match=r"v\.txt:1: unknown target token 'zzz'"):
        VocabMap.from_file(path, S2I, T2I, unknown="error")
    path.write_text("the\tle\nqqq\tchat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"v\.txt:2: unknown source token 'qqq'"):
        VocabMap.from_file(path, S2I, T2I, unknown="error")
    # callables: None or KeyError mean unknown
    vm = VocabMap.from_file(path, S2I.get, lambda t: T2I[t])
    assert vm.skipped["rules"] == 1
    with pytest.raises(ValueError, match="unknown"):
        VocabMap.from_file(path, S2I, T2I, unknown="maybe")


@pytest.mark.parametrize("text, match", [
    ("the le\n", r":1: no tab"),
    ("the\tle\ncat\tchat\tle\n", r":2: more than one tab"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt" + match):
        VocabMap.from_file(path, S2I, T2I)


def test_file_errors(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"the\t\xff\n")
    with pytest.raises(ValueError, match=r"bin\.txt: not UTF-8"):
        VocabMap.from_file(path, S2I, T2I)
    with pytest.raises(OSError):
        VocabMap.from_file(tmp_path / "missing.txt", S2I, T2I)
    path.write_text("the\tle\n", encoding="utf-8")
    with pytest.raises(TypeError, match="tgt_token_to_id"):
        VocabMap.from_file(path, S2I, 5)
    with pytest.raises(TypeError, match=r"bin\.txt:1: tgt_token_to_id gave 'x'"):
        VocabMap.from_file(path, S2I, lambda t: "x")


@settings(max_examples=30, deadline=None)
@given(rules=st.dictionaries(
    st.one_of(st.integers(0, len(SRC) - 1), st.tuples(*[st.integers(0, len(SRC) - 1)] * 3)),
    st.lists(st.integers(0, len(TGT) - 1), max_size=5), max_size=8),
    always=st.lists(st.integers(0, len(TGT) - 1), max_size=3))
def test_file_round_trip(tmp_path_factory, rules, always):
    path = tmp_path_factory.mktemp("vm") / "vmap.txt"
    vm = VocabMap(rules, always)
    vm.to_file(path, SRC, dict(enumerate(TGT)))
    back = VocabMap.from_file(path, S2I, T2I, unknown="error")
    assert back == vm and back.max_ngram == vm.max_ngram
    assert path.read_text(encoding="utf-8").split("\n")[0].startswith("\t")


def test_to_file_rejects_tokens_it_cannot_write(tmp_path):
    vm = VocabMap({0: [1]})
    with pytest.raises(ValueError, match="id 1"):
        vm.to_file(tmp_path / "a.txt", ["a"], ["x"])
    with pytest.raises(ValueError, match="cannot be written"):
        vm.to_file(tmp_path / "a.txt", ["a b"], ["x", "y"])
    with pytest.raises(ValueError, match="cannot be written"):
        vm.to_file(tmp_path / "a.txt", ["a"], ["x", ""])
    assert not (tmp_path / "a.txt").exists()


def test_load_vmap_from_a_model_directory(tmp_path):
    assert load_vmap(tmp_path, S2I, T2I) is None
    (tmp_path / VMAP_FILE).write_text("the\tle\n", encoding="utf-8")
    vm = load_vmap(tmp_path, S2I, T2I, always=[2], tgt_vocab_size=len(TGT))
    assert vm.subset([[4]]).tolist() == [2, 4]


# -- vocab_subset in the decoder state -----------------------------------------------------------

V = 300


def _model(tie: str, int8: bool) -> pt.Transformer:
    cfg = small_config(V, 32, 2, output_bias=True, tie_embeddings=tie, max_len=64)
    m = pt.Transformer(cfg, seed=1).eval()
    return quantize_model(m) if int8 else m


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("tie", ["none", "decoder"])
@pytest.mark.parametrize("pack", [False, True])
def test_subset_logits_are_the_full_ones_bit_for_bit(tie, int8, pack):
    """The subset's product runs the kernel the full layer runs (packed with 4+ rows, unpacked
    with fewer, int8), and each output column's sum does not depend on the other columns."""
    m = _model(tie, int8)
    rng = np.random.default_rng(0)
    batch = random_batch(m.config, rng, B=6, S=5, T=1)
    memory = m.encode(batch.src, batch.src_lengths)
    ids = np.unique(np.r_[EOS, rng.integers(0, V, 60)])
    outside = np.setdiff1d(np.arange(V), ids)
    full = m.init_decoder_state(memory, batch.src_lengths, 20, pack_weights=pack)
    sub = m.init_decoder_state(memory, batch.src_lengths, 20, pack_weights=pack, vocab_subset=ids)
    np.testing.assert_array_equal(sub.vocab_subset, ids)
    tokens = np.full(6, BOS)
    for t in range(6):
        if t == 2:
            rows = np.array([0, 0, 3, 5, 5, 1, 2, 4])  # fan-out
        elif t == 4:
            rows = np.array([6, 1])  # down to 2 rows: the unpacked path
        else:
            rows = None
        if rows is not None:
            full.reorder(rows)
            sub.reorder(rows)
            tokens = tokens[rows]
        a, _ = m.decode_step(full, tokens)
        b, _ = m.decode_step(sub, tokens)
        assert b.shape == a.shape and b.dtype == np.float32
        np.testing.assert_array_equal(b[:, ids], a[:, ids])
        assert np.isneginf(b[:, outside]).all()
        tokens = rng.integers(3, V, size=tokens.size)


def _greedy(m, batch, steps, vocab_subset=None):
    memory = m.encode(batch.src, batch.src_lengths)
    state = m.init_decoder_state(memory, batch.src_lengths, steps, vocab_subset=vocab_subset)
    B = batch.src.shape[0]
    out = np.zeros((B, steps), np.int64)
    tokens = np.full(B, BOS)
    for t in range(steps):
        logits, _ = m.decode_step(state, tokens)
        tokens = logits.argmax(-1)
        out[:, t] = tokens
    return out


def test_greedy_inside_a_subset_holding_its_path_is_unchanged():
    m = _model("none", False)
    batch = random_batch(m.config, np.random.default_rng(1), B=4, S=6, T=1)
    path = _greedy(m, batch, 12)
    rng = np.random.default_rng(2)
    ids = np.unique(np.r_[EOS, path.ravel(), rng.integers(0, V, 30)])
    np.testing.assert_array_equal(_greedy(m, batch, 12, ids), path)
    # without the path's first tokens the search must pick something else, inside the subset
    first = np.unique(path[:, 0])
    narrowed = np.setdiff1d(ids, first[first != EOS])
    other = _greedy(m, batch, 12, narrowed)
    assert np.isin(other, narrowed).all() and not np.array_equal(other, path)


@pytest.mark.parametrize("value, exc, match", [
    ([2, 5], TypeError, "numpy integer array"),
    (np.array([2.0, 5.0]), TypeError, "integer array"),
    (np.array([[2, 5]]), ValueError, "1-D"),
    (np.zeros(0, np.int64), ValueError, "non-empty"),
    (np.array([5, 2]), ValueError, "sorted and unique"),
    (np.array([2, 2, 5]), ValueError, "sorted and unique"),
    (np.array([3, 5]), ValueError, "end-of-sequence id 2"),
    (np.array([2, 23]), IndexError, r"23 is out of range \[0, 23\)"),
    (np.array([-1, 2]), IndexError, "-1 is out of range"),
])
def test_vocab_subset_is_checked(value, exc, match):
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=0).eval()
    batch = random_batch(cfg, np.random.default_rng(0), B=2, S=4, T=1)
    memory = m.encode(batch.src, batch.src_lengths)
    with pytest.raises(exc, match="vocab_subset: .*" + match):
        m.init_decoder_state(memory, batch.src_lengths, 4, vocab_subset=value)


def test_subset_state_skips_packing_the_full_output():
    m = _model("decoder", False)
    batch = random_batch(m.config, np.random.default_rng(0), B=4, S=4, T=1)
    memory = m.encode(batch.src, batch.src_lengths)
    ids = np.array([2, 7, 9])
    state = m.init_decoder_state(memory, batch.src_lengths, 8, pack_weights=True,
                                 vocab_subset=ids.astype(np.int32))
    assert id(m.output) not in state.packed_weights
    assert state.output_rows.packed.shape == (3, m.config.d_model)
    assert state.vocab_subset.dtype == np.int64


def test_greedy_with_a_vmap_matches_ctranslate2_use_vmap(tmp_path):
    """The same vmap.txt in a CTranslate2 model directory: translate_batch(use_vmap=True) and our
    greedy decoding inside `load_vmap(...).subset(batch)` pick the same tokens (CTranslate2 adds
    unk, bos, eos and pad itself: our `always`)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from test_interop_ct2 import _spec_model  # a model written by ctranslate2 itself

    from pytransformer.interop import from_ctranslate2

    toks = _spec_model(tmp_path, pre_norm=True, V=160, seed=2)
    rng = np.random.default_rng(3)
    words = toks[4:]
    lines = ["\t" + " ".join(rng.choice(words, 3, replace=False))]
    lines += [f"{w}\t{' '.join(rng.choice(words, 4, replace=False))}" for w in words]
    lines.append(f"{words[0]} {words[1]}\t{' '.join(rng.choice(words, 5, replace=False))}")
    (tmp_path / VMAP_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    tr = from_ctranslate2(tmp_path)
    src_tok, tgt_tok, cfg = tr.src_tokenizer, tr.tgt_tokenizer, tr.model.config
    vm = load_vmap(tmp_path, src_tok.stoi, tgt_tok.stoi,
                   always=[cfg.pad_id, cfg.bos_id, cfg.eos_id, tgt_tok.unk_id],
                   tgt_vocab_size=cfg.tgt_vocab_size, unknown="error")
    batch = [list(rng.choice(words[:10], size=rng.integers(2, 7))) for _ in range(8)]
    batch[0][:2] = words[:2]  # the bigram rule fires
    ct = ctranslate2.Translator(str(tmp_path), device="cpu", compute_type="float32")
    ref = ct.translate_batch(batch, beam_size=1, use_vmap=True, max_decoding_length=16)
    sources = [src_tok.encode_tokens(s) for s in batch]
    ids = vm.subset(sources)
    assert ids.size < cfg.tgt_vocab_size / 2
    lengths = np.array([len(s) for s in sources])
    src = np.zeros((len(sources), lengths.max()), np.int64)
    for r, s in enumerate(sources):
        src[r, : len(s)] = s
    m = tr.model
    state = m.init_decoder_state(m.encode(src, lengths), lengths, 16, vocab_subset=ids)
    out = np.zeros((len(batch), 12), np.int64)
    tokens = np.full(len(batch), cfg.bos_id)
    for t in range(12):
        tokens = m.decode_step(state, tokens)[0].argmax(-1)
        out[:, t] = tokens
    for r, hyp in enumerate(ref):
        ours = tgt_tok.decode_tokens(out[r, : list(out[r]).index(cfg.eos_id)]
                                     if cfg.eos_id in out[r] else out[r])
        assert ours[:12] == hyp.hypotheses[0][:12], r
        assert set(tgt_tok.encode_tokens(hyp.hypotheses[0])) <= set(ids.tolist())


# --------------------------------------------------------------------------------------------
# The application: Translator(use_vmap=True), its directory's vmap.txt, `translate --vmap`

CHARS = "abcdefghijklmnop"


def _char_translator(seed: int = 3):
    from pytransformer.text.tokenizer import CharTokenizer
    from pytransformer.translator import Translator

    tok = CharTokenizer(list(CHARS))
    cfg = small_config(tok.vocab_size, 16, layers=1, max_len=32, dropout=0.0,
                       tie_embeddings="none")
    m = pt.Transformer(cfg, seed=seed).eval()
    sd = m.state_dict()
    bias = np.random.default_rng(seed).normal(0, 1.0, sd["output.bias"].shape)
    bias[EOS] += 2.0  # outputs end at varied lengths
    m.load_state_dict({**sd, "output.bias": bias.astype(np.float32)})
    return Translator(m, tok, tok)


def _write_vmap(path, rules: dict[str, str], always: str = "") -> None:
    lines = [f"\t{' '.join(always)}"] + [f"{s}\t{' '.join(t)}" for s, t in rules.items()]
    path.write_text("\n".join(lines) + "\n")


RULES = {"a": "bc", "b": "cd", "c": "de", "d": "ab", "e": "fg", "f": "gh"}


def _allowed(sentence: str) -> set[str]:
    return {t for ch in sentence for t in RULES.get(ch, "")} | set("p")


def test_translator_use_vmap_keeps_to_the_candidates(tmp_path):
    tr = _char_translator()
    _write_vmap(tmp_path / "map.txt", RULES, always="p")
    sentences = ["abc", "def", "a", "fed", "ab" * 5, ""]
    opts = dict(beam_size=2, max_decoding_length=10, min_decoding_length=1)
    plain = tr.translate(sentences, **opts)
    with pytest.raises(ValueError, match="use_vmap: .*no vocabulary map"):
        tr.translate(sentences, use_vmap=True)
    tr.load_vmap(tmp_path / "map.txt")
    # the subset is the union over the sentences decoded together
    out = tr.translate(sentences, **opts, use_vmap=True)
    assert set("".join(out)) <= _allowed("".join(sentences))
    alone = tr.translate(sentences, **opts, use_vmap=True, max_batch_size=1)
    for s, o in zip(sentences, alone, strict=True):
        assert set(o) <= _allowed(s), (s, o)
    assert alone != plain  # the map changes translations, so the check above can fail
    # the decode level with the same subsets gives the same tokens
    ids = tr.encode_sources(sentences)
    res = pt.decode.translate(tr.model, ids, **opts, use_vmap=True,
                              vocab_subset_fn=tr.vmap.subset)
    assert [tr.tgt_tokenizer.decode(r.hypotheses[0]) for r in res] == out
    # streaming and a saved directory keep the map
    assert list(tr.translate_iterable(sentences, **opts, use_vmap=True)) == out
    tr.save(tmp_path / "tr")
    assert (tmp_path / "tr" / VMAP_FILE).is_file()
    again = type(tr).load(tmp_path / "tr")
    assert again.vmap == tr.vmap
    assert again.translate(sentences, **opts, use_vmap=True) == out


def test_cli_translate_with_a_vmap(tmp_path, capsys):
    from pytransformer.cli import main

    tr = _char_translator()
    tr.save(tmp_path / "tr")
    _write_vmap(tmp_path / "map.txt", RULES, always="p")
    (tmp_path / "in.txt").write_text("abc\ndef\nfed\n")
    assert main(["translate", "--model", str(tmp_path / "tr"), "--input", str(tmp_path / "in.txt"),
                 "--output", str(tmp_path / "out.txt"), "--vmap", str(tmp_path / "map.txt"),
                 "--beam-size", "1", "--max-decoding-length", "8", "--max-batch-size", "1",
                 "--min-decoding-length", "1"]) == 0
    got = (tmp_path / "out.txt").read_text().splitlines()
    for s, o in zip(["abc", "def", "fed"], got, strict=True):
        assert set(o) <= _allowed(s)
    # --use-vmap without a vmap.txt, and a bad --vmap file: one-line errors naming the flag
    assert main(["translate", "--model", str(tmp_path / "tr"), "--input", str(tmp_path / "in.txt"),
                 "--use-vmap"]) != 0
    assert "use_vmap" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text("abc no tab\n")
    assert main(["translate", "--model", str(tmp_path / "tr"), "--input", str(tmp_path / "in.txt"),
                 "--vmap", str(tmp_path / "bad.txt")]) != 0
    assert "--vmap:" in capsys.readouterr().err
