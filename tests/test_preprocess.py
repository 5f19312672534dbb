"""Binarized corpora: preprocess (tokenizers, filters, shards, manifest last), reading the shards
back, ShardBatcher against TokenBatcher, and the CLI path preprocess -> train -> translate ->
evaluate on a corpus whose lines hold characters str.splitlines would break at."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytransformer.cli import main
from pytransformer.io import split_lines
from pytransformer.preprocess import PreprocessOptions, preprocess
from pytransformer.text.tokenizer import load_tokenizer
from pytransformer.train.data import TokenBatcher, synthetic_pairs
from pytransformer.train.shards import (
    MANIFEST,
    DataError,
    ShardBatcher,
    ShardWriter,
    open_data,
    write_manifest,
)

# Line breaks for str.splitlines but not for a parallel corpus: each must stay inside its line.
ODD = ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85"]
WORDS_EN = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
WORDS_DE = ["eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht"]


def make_corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Word-for-word pairs; every third line carries one of ODD inside it."""
    rng = np.random.default_rng(seed)
    src, tgt = [], []
    for i in range(n):
        k = rng.integers(1, 6, endpoint=True)
        w = rng.integers(0, len(WORDS_EN), k)
        s, t = " ".join(WORDS_EN[j] for j in w), " ".join(WORDS_DE[j] for j in w)
        if i % 3 == 0:
            odd = ODD[i % len(ODD)]
            s, t = s + odd + "x", t + odd + "x"
        src.append(s)
        tgt.append(t)
    return src, tgt


def write(path, lines: list[str]) -> str:
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    src, tgt = make_corpus(120)
    vsrc, vtgt = make_corpus(20, seed=1)
    return {
        "src": write(tmp_path / "train.en", src), "tgt": write(tmp_path / "train.de", tgt),
        "valid_src": write(tmp_path / "valid.en", vsrc),
        "valid_tgt": write(tmp_path / "valid.de", vtgt),
        "lines": (src, tgt, vsrc, vtgt), "dir": tmp_path,
    }


def test_shards_read_back_the_encoding_of_every_kept_pair(corpus, tmp_path):
    """A corpus over several shards: every stored sentence is the tokenizer's encoding of its
    line, in order, and exactly the pairs the filters keep (computed here independently)."""
    src, tgt = corpus["lines"][:2]
    src = src + ["", "one", "one two", "one " * 40]  # empty side, ratio 2, over max_len / ratio
    tgt = tgt + ["eins", "", "eins zwei", "eins"]
    opts = PreprocessOptions(vocab_size=60, shard_size=17, max_len=30, max_ratio=4.0)
    report = preprocess(write(tmp_path / "s", src), write(tmp_path / "t", tgt), tmp_path / "D",
                        options=opts)
    data = open_data(tmp_path / "D", verify=True)
    src_tok = load_tokenizer(data.path("src_tokenizer.json"))
    tgt_tok = load_tokenizer(data.path("tgt_tokenizer.json"))
    kept, reasons = [], {"empty": 0, "too_long": 0, "ratio": 0}
    for s, t in zip(src, tgt, strict=True):
        a, b = src_tok.encode(s), tgt_tok.encode(t)
        if not a or not b:
            reasons["empty"] += 1
        elif len(a) > 30 or len(b) > 30:
            reasons["too_long"] += 1
        elif max(len(a), len(b)) > 4 * min(len(a), len(b)):
            reasons["ratio"] += 1
        else:
            kept.append((a, b))
    split = data.split("train")
    assert len(data.manifest["splits"]["train"]["shards"]) == -(-len(kept) // 17) > 3
    assert split.n_pairs == len(kept) == report.kept
    assert (report.read, report.empty, report.too_long, report.ratio) == (
        len(src), reasons["empty"], reasons["too_long"], reasons["ratio"])
    assert reasons["empty"] == 2 and reasons["too_long"] == 1
    for i, (a, b) in enumerate(kept):
        assert split.src[i].tolist() == a and split.tgt[i].tolist() == b
    assert split.src_lengths.tolist() == [len(a) for a, _ in kept]
    assert data.meta["filtered"]["kept"] == len(kept)


def test_joint_and_separate_vocabularies(corpus, tmp_path):
    joint = preprocess(corpus["src"], corpus["tgt"], tmp_path / "J",
                       options=PreprocessOptions(vocab_size=60))
    assert joint.kept == 120
    same = [(tmp_path / "J" / f).read_bytes() for f in ("src_tokenizer.json", "tgt_tokenizer.json")]
    assert same[0] == same[1]
    preprocess(corpus["src"], corpus["tgt"], tmp_path / "S",
               options=PreprocessOptions(vocab_size=40, joint=False))
    src_tok = load_tokenizer(tmp_path / "S" / "src_tokenizer.json")
    tgt_tok = load_tokenizer(tmp_path / "S" / "tgt_tokenizer.json")
    assert src_tok.tokens("fünf") != tgt_tok.tokens("fünf")  # "ü" is in German text only
    assert "ü" not in "".join(src_tok.tokens("one two"))


def test_interrupted_preprocess_leaves_nothing_train_accepts(corpus, tmp_path, monkeypatch,
                                                              capsys):
    out = tmp_path / "D"
    args = ["preprocess", "--src", corpus["src"], "--tgt", corpus["tgt"], "--out", str(out),
            "--tokenizer", "char", "--shard-size", "10"]
    assert main(args) == 0
    assert open_data(out).split("train").n_pairs == 120
    calls = []

    def dying(self, srcs, tgts):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill between blocks
        return original(self, srcs, tgts)

    original = ShardWriter.add_pairs
    monkeypatch.setattr(ShardWriter, "add_pairs", dying)
    monkeypatch.setattr("pytransformer.preprocess._BLOCK", 25)
    assert main(args) == 130  # the rerun over the finished directory is interrupted
    assert not (out / MANIFEST).exists()
    with pytest.raises(DataError, match="preprocess did not finish"):
        open_data(out)
    capsys.readouterr()
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"),
                 "--preset", "tiny", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "preprocess did not finish" in err


def test_truncated_or_corrupt_shards_are_refused(corpus, tmp_path):
    out = tmp_path / "D"
    preprocess(corpus["src"], corpus["tgt"], out, options=PreprocessOptions(tokenizer="char"))
    ids = out / "train-00000.tgt.ids"
    blob = ids.read_bytes()
    ids.write_bytes(blob[:-4])
    with pytest.raises(DataError, match="truncated"):
        open_data(out)
    flipped = bytearray(blob)
    flipped[5] ^= 1
    ids.write_bytes(bytes(flipped))
    open_data(out)  # sizes agree: only verify reads every byte
    with pytest.raises(DataError, match="checksum"):
        open_data(out, verify=True)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        open_data(out)


def test_misaligned_and_bad_input_files(corpus, tmp_path, capsys):
    short = write(tmp_path / "short.de", corpus["lines"][1][:50])
    assert main(["preprocess", "--src", corpus["src"], "--tgt", short,
                 "--out", str(tmp_path / "D")]) == 1
    err = capsys.readouterr().err
    assert "has 120 lines but" in err and "has 50" in err and err.count("\n") == 1
    assert not (tmp_path / "D" / MANIFEST).exists()
    (tmp_path / "bad.de").write_bytes(b"\xff\xfe\n" * 120)
    assert main(["preprocess", "--src", corpus["src"], "--tgt", str(tmp_path / "bad.de"),
                 "--out", str(tmp_path / "D"), "--tokenizer", "char"]) == 1
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["preprocess", "--src", str(tmp_path / "missing"), "--tgt", corpus["tgt"],
                 "--out", str(tmp_path / "D")]) == 2
    assert "--src" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_ratio"):
        PreprocessOptions(max_ratio=0.5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    assert main(["preprocess", "--src", corpus["src"], "--tgt", corpus["tgt"], "--tokenizer",
                 "char", "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "thesis.tex" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]


@settings(max_examples=12, deadline=None)
@given(
    max_tokens=st.integers(10, 300), max_sentences=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 2**31), shard_size=st.integers(1, 60), shuffle=st.booleans(),
)
def test_shard_batcher_equals_token_batcher(tmp_path_factory, max_tokens, max_sentences, seed,
                                            shard_size, shuffle):
    """The run-wise cut over memory-mapped shards gives TokenBatcher's batches, epoch after
    epoch (its greedy per-sentence cut is the reference)."""
    pairs = synthetic_pairs("random", 100, 50, 1, 9, seed=seed % 1000)
    d = tmp_path_factory.mktemp("shards")
    writer = ShardWriter(d, "train", shard_size)
    writer.add_pairs([s.tolist() for s, _ in pairs[:45]], [t.tolist() for _, t in pairs[:45]])
    writer.add_pairs([s.tolist() for s, _ in pairs[45:]], [t.tolist() for _, t in pairs[45:]])
    write_manifest(d, {"train": writer.close()}, {})
    split = open_data(d).split("train")
    kw = dict(pad_id=0, bos_id=1, eos_id=2, seed=seed, max_sentences=max_sentences,
              shuffle=shuffle, skip_long=True)
    ours, ref = ShardBatcher(split, max_tokens, **kw), TokenBatcher(pairs, max_tokens, **kw)
    assert len(ours) == len(ref)
    for _ in range(len(ref) + 3):  # an epoch and the start of the next (reshuffled)
        a, b = ours.next_batch(), ref.next_batch()
        for field in ("src", "src_lengths", "tgt_in", "tgt_out", "tgt_lengths", "indices"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_shard_batcher_resumes_and_names_its_corpus(corpus, tmp_path):
    preprocess(corpus["src"], corpus["tgt"], tmp_path / "D",
               options=PreprocessOptions(tokenizer="char", shard_size=30))
    data = open_data(tmp_path / "D")
    split = data.split("train")
    ids = dict(pad_id=0, bos_id=1, eos_id=2, seed=3, corpus_id=data.id)
    a = ShardBatcher(split, 200, **ids)
    for _ in range(len(a) + 2):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = ShardBatcher(split, 200, **ids)
    b.load_state_dict(state)
    for _ in range(len(a) + 3):
        np.testing.assert_array_equal(a.next_batch().tgt_out, b.next_batch().tgt_out)
    other = ShardBatcher(split, 200, **{**ids, "corpus_id": "another"})
    with pytest.raises(ValueError, match="different data set"):
        other.load_state_dict(state)
    with pytest.raises(TypeError, match="split"):
        ShardBatcher([(1, 2)], 200, pad_id=0, bos_id=1, eos_id=2)


def test_preprocess_train_translate_evaluate_cli(corpus, tmp_path, capsys):
    """The whole path through the CLI; the odd line breaks stay inside their lines, so the
    corpus stays aligned: the data holds all pairs, the references are the lines as written,
    and translate writes one line per input line."""
    src, tgt, vsrc, vtgt = corpus["lines"]
    data, run = tmp_path / "DATA", tmp_path / "run"
    assert main(["preprocess", "--src", corpus["src"], "--tgt", corpus["tgt"],
                 "--valid-src", corpus["valid_src"], "--valid-tgt", corpus["valid_tgt"],
                 "--out", str(data), "--vocab-size", "60", "--shard-size", "50"]) == 0
    assert "120 pairs read, 120 kept" in capsys.readouterr().err
    d = open_data(data)
    assert d.split("train").n_pairs == 120 and d.split("valid").n_pairs == 20
    tok = load_tokenizer(data / "src_tokenizer.json")
    assert d.split("train").src[3].tolist() == tok.encode(src[3])  # ODD[3] inside
    assert split_lines((data / "valid.tgt.txt").read_text(encoding="utf-8")) == vtgt
    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                 "--steps", "4", "--valid-every", "2", "--checkpoint-every", "2",
                 "--max-tokens", "300", "--threads", "1"]) == 0
    log_text = (run / "checkpoints" / "log.jsonl").read_text()
    log = [json.loads(line) for line in log_text.splitlines()]
    bleu = [r for r in log if "valid_bleu" in r]
    assert [r["step"] for r in bleu] == [2, 4] and all(r["valid_bleu"] >= 0 for r in bleu)
    assert log[-1]["stop"] == "max_steps"
    assert (run / "checkpoints" / "best" / "model.safetensors").exists()
    out = tmp_path / "hyp.txt"
    assert main(["translate", "--model", str(run), "--input", corpus["valid_src"],
                 "--output", str(out), "--beam-size", "2", "--max-decoding-length", "8"]) == 0
    hyps = split_lines(out.read_text(encoding="utf-8"))
    assert len(hyps) == len(vsrc)
    capsys.readouterr()
    assert main(["evaluate", "--hyp", str(out), "--ref", corpus["valid_tgt"]]) == 0
    assert "bleu" in json.loads(capsys.readouterr().out)
    png = tmp_path / "curve.png"
    assert main(["plot", "curve", str(run), "-o", str(png)]) == 0  # with the BLEU panel
    assert png.stat().st_size > 1000


def test_train_data_argument_errors(corpus, tmp_path, capsys):
    preprocess(corpus["src"], corpus["tgt"], tmp_path / "D",
               options=PreprocessOptions(tokenizer="char"))
    cases = [
        (["--data", str(tmp_path / "D"), "--src", corpus["src"]], "drop --src"),
        (["--data", str(tmp_path / "nope")], "--data"),
        ([], "--data DATA, or --src and --tgt"),
        (["--data", str(tmp_path / "D"), "--max-time", "soon"], "--max-time"),
    ]
    for extra, message in cases:
        assert main(["train", "--out", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path / "D")  # left alone
