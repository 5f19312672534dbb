"""Streaming decoding: translate_iterable (lazy blocks, bounded memory, input order),
generate_tokens (token by token, the greedy translation), batches on worker threads
(inter_threads: the serial results, bit for bit) and the CLI's incremental translate."""

from __future__ import annotations

import collections
import itertools
import os
import pathlib
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import small_config

import pytransformer
import pytransformer.cli as cli
from pytransformer import Transformer
from pytransformer.decode import (
    generate_tokens,
    translate,
    translate_batches,
    translate_iterable,
)
from pytransformer.decode.stream import _plan, blocks
from pytransformer.text.tokenizer import CharTokenizer
from pytransformer.translator import Translator

PACKAGE_ROOT = pathlib.Path(pytransformer.__file__).resolve().parents[1]
VOCAB = 24
SUPPRESSED = 4


def _model(seed: int = 5, eos_bias: float = 4.0) -> Transformer:
    """A random model that says something: larger weights and a random output bias spread the
    logits (plain random weights repeat one token), an EOS bias ends hypotheses at different
    lengths, and one suppressed token that the bias would otherwise favour."""
    cfg = small_config(VOCAB, 16, layers=1, max_len=48, dropout=0.0, tie_embeddings="none",
                       suppress_ids=(SUPPRESSED,))
    model = Transformer(cfg, seed=seed).eval()
    sd = model.state_dict()
    rng = np.random.default_rng(seed)
    for k in sd:
        if k.endswith("weight") and "norm" not in k:
            sd[k] = (sd[k] * 2.0).astype(np.float32)
    bias = rng.normal(0, 0.5, size=sd["output.bias"].shape).astype(np.float32)
    bias[cfg.eos_id] += eos_bias
    bias[SUPPRESSED] += 3.0
    sd["output.bias"] = bias
    model.load_state_dict(sd)
    return model


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _model()


def _sources(n: int, seed: int = 0, longest: int = 12) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=int(k)).tolist() for k in rng.integers(0, longest, n)]


def _same(a, b, exact: bool = False) -> None:
    """Results agree: the same tokens; scores equal (exact) or to float32 rounding (batches of
    other compositions round differently)."""
    assert [r.hypotheses for r in a] == [r.hypotheses for r in b]
    for x, y in zip(a, b, strict=True):
        if exact:
            assert x.scores == y.scores
        else:
            np.testing.assert_allclose(x.scores, y.scores, rtol=0, atol=1e-5)


# -- translate_iterable --------------------------------------------------------------------------


@pytest.mark.parametrize("read_batch_size", [1, 3, 7, 50, None])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_translate_iterable_equals_translate(model, read_batch_size, beam_size):
    srcs = _sources(50, seed=1)
    kw = dict(beam_size=beam_size, max_decoding_length=10, return_scores=True, max_batch_size=4)
    whole = translate(model, srcs, **kw)
    assert len({len(r.hypotheses[0]) for r in whole}) > 3  # varied lengths: a real check
    streamed = list(translate_iterable(model, iter(srcs), read_batch_size=read_batch_size, **kw))
    _same(streamed, whole)


class Counting:
    """An iterator over items that counts what was taken and raises after `fail_after`."""

    def __init__(self, items, fail_after: int | None = None):
        self.items, self.taken, self.fail_after = list(items), 0, fail_after

    def __iter__(self):
        return self

    def __next__(self):
        if self.fail_after is not None and self.taken == self.fail_after:
            raise RuntimeError(f"input failed after {self.taken} items")
        if self.taken == len(self.items):
            raise StopIteration
        self.taken += 1
        return self.items[self.taken - 1]


@pytest.mark.parametrize("read_batch_size", [1, 4, 10])
def test_translate_iterable_reads_lazily_in_blocks(model, read_batch_size):
    srcs = _sources(23, seed=2)
    source = Counting(srcs)
    results = translate_iterable(model, source, read_batch_size=read_batch_size, beam_size=1,
                                 max_decoding_length=6)
    assert source.taken == 0  # nothing is read before the first result is asked for
    seen = []
    for r in results:
        seen.append(r)
        # a result comes out once its block is in, never later, never earlier
        assert source.taken == min(len(srcs), -(-len(seen) // read_batch_size) * read_batch_size)
    assert [r.hypotheses for r in seen] == [
        r.hypotheses for r in translate(model, srcs, beam_size=1, max_decoding_length=6)
    ]


@pytest.mark.parametrize("read_batch_size", [1, 5])
def test_worker_threads_read_at_most_two_blocks_ahead(model, read_batch_size):
    srcs = _sources(23, seed=2)
    source = Counting(srcs)
    with ThreadPoolExecutor(2) as pool:
        results = translate_iterable(model, source, read_batch_size=read_batch_size,
                                     executor=pool, beam_size=1, max_decoding_length=6)
        seen = []
        for r in results:
            seen.append(r.hypotheses)
            blocks_out = -(-len(seen) // read_batch_size)
            assert source.taken <= min(len(srcs), (blocks_out + 1) * read_batch_size)
        assert seen == [r.hypotheses for r in translate(model, srcs, beam_size=1,
                                                        max_decoding_length=6)]
        early = translate_iterable(model, iter(srcs), read_batch_size=2, executor=pool,
                                   beam_size=1, max_decoding_length=6)
        next(early)
        early.close()  # the started block is cancelled or finishes; nothing hangs


@settings(max_examples=25)
@given(n=st.integers(0, 25), read=st.integers(1, 12), batch=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_any_blocking_gives_the_translations(model, n, read, batch, seed):
    srcs = _sources(n, seed=seed)
    kw = dict(beam_size=1, max_decoding_length=5, max_batch_size=batch)
    got = [r.hypotheses for r in translate_iterable(model, srcs, read_batch_size=read, **kw)]
    assert got == [r.hypotheses for r in translate(model, srcs, **kw)]


def test_results_before_a_failing_input_come_out_first(model):
    srcs = _sources(30, seed=3)
    source = Counting(srcs, fail_after=10)
    got = []
    with pytest.raises(RuntimeError, match="after 10 items"):
        for r in translate_iterable(model, source, read_batch_size=4, beam_size=1,
                                    max_decoding_length=6):
            got.append(r.hypotheses)
    expected = [r.hypotheses for r in translate(model, srcs[:8], beam_size=1,
                                                max_decoding_length=6)]
    assert got == expected  # the two whole blocks before the failure


def test_bad_options_fail_before_any_input_is_read(model):
    source = Counting(_sources(5))
    with pytest.raises(TypeError, match="bem_size: not an option of translate"):
        translate_iterable(model, source, bem_size=2)
    with pytest.raises(ValueError, match="beam_size"):
        translate_iterable(model, source, beam_size=0)
    with pytest.raises(ValueError, match="read_batch_size"):
        translate_iterable(model, source, read_batch_size=0)
    with pytest.raises(TypeError, match="read_batch_size"):
        translate_iterable(model, source, read_batch_size=2.0)
    with pytest.raises(TypeError, match="iterable"):
        translate_iterable(model, "3 4 5")
    assert source.taken == 0
    with pytest.raises(IndexError, match=r"sources\[1\]"):  # found when its block is reached
        list(translate_iterable(model, [[3], [VOCAB]], beam_size=1))
    too_long = [[3]] * 5 + [[3] * 49]  # cut to max_len with a warning, as translate does
    with ThreadPoolExecutor(2) as pool:
        for executor in (None, pool):
            with pytest.warns(UserWarning, match="longer than 48 tokens truncated"):
                got = list(translate_iterable(model, too_long, read_batch_size=2,
                                              executor=executor, beam_size=1,
                                              max_decoding_length=3))
            want = translate(model, [[3]] * 5 + [[3] * 48], beam_size=1,
                             max_decoding_length=3)
            assert [r.hypotheses for r in got] == [r.hypotheses for r in want]
    assert list(translate_iterable(model, iter([]))) == []


def test_blocks_by_cost():
    items = [[1] * n for n in (3, 1, 4, 1, 5, 9, 2, 6)]
    got = list(blocks(items, 6, len))
    assert [x for b in got for x in b] == items
    for b in got:  # at most 6 tokens a block, unless one item alone is larger
        assert sum(map(len, b)) <= 6 or len(b) == 1
    for a, b in itertools.pairwise(got):  # greedy: the next item did not fit
        assert sum(map(len, a)) + len(b[0]) > 6


def test_token_batches_plan():
    rng = np.random.default_rng(0)
    srcs = [np.zeros(int(n), dtype=np.int64) for n in rng.integers(0, 20, 200)]
    plan = _plan(srcs, 40, by_tokens=True)
    assert sorted(i for b in plan for i in b) == list(range(200))
    # the empty sources (answered without decoding) ride in the first batch; the others are
    # longest first, within the token budget
    flat = [i for b in plan for i in b if srcs[i].size]
    assert [srcs[i].size for i in flat] == sorted((s.size for s in srcs if s.size), reverse=True)
    assert {i for i in range(200) if not srcs[i].size} <= set(plan[0])
    for b in plan:
        real = [i for i in b if srcs[i].size]
        longest = max(max(srcs[i].size for i in real), 1)
        assert len(real) * longest <= 40 or len(real) == 1


# -- worker threads ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3])
def test_batches_on_worker_threads_are_the_serial_results(model, workers):
    srcs = _sources(40, seed=4, longest=20)
    kw = dict(beam_size=2, num_hypotheses=2, max_decoding_length=12, return_scores=True,
              max_batch_size=5)
    serial = translate(model, srcs, **kw)
    with ThreadPoolExecutor(workers) as pool:
        parallel = translate_batches(model, srcs, executor=pool, **kw)
        streamed = list(translate_iterable(model, srcs, read_batch_size=17, executor=pool, **kw))
    assert parallel == serial  # bit for bit: the same batches
    serial_blocks = list(translate_iterable(model, srcs, read_batch_size=17, **kw))
    assert streamed == serial_blocks


@pytest.mark.parametrize("beam_size", [1, 2])
def test_sampling_is_the_one_call_draw_however_the_input_is_split(model, beam_size):
    srcs = _sources(30, seed=6, longest=15)
    srcs[3] = []  # an empty source does not shift the others' random streams
    kw = dict(beam_size=beam_size, sampling_topk=0, sampling_temperature=1.3, seed=11,
              max_decoding_length=10, max_batch_size=4, return_scores=True)
    whole = translate(model, srcs, **kw)
    assert whole != translate(model, srcs, **{**kw, "seed": 12})  # the draws are random
    with ThreadPoolExecutor(2) as pool:
        parallel = translate_batches(model, srcs, executor=pool, **kw)
        streamed = list(translate_iterable(model, srcs, read_batch_size=7, executor=pool, **kw))
    blocks_ = list(translate_iterable(model, srcs, read_batch_size=7, **kw))
    for got in (parallel, streamed, blocks_):
        assert [r.hypotheses for r in got] == [r.hypotheses for r in whole]


def test_target_prefixes_go_with_their_sources_on_workers(model):
    srcs = _sources(12, seed=9, longest=10)
    prefixes = [[5, 6] if i % 3 == 0 else None for i in range(12)]
    kw = dict(beam_size=2, max_decoding_length=8, max_batch_size=3)
    serial = [translate(model, [s], [p], **kw)[0] for s, p in zip(srcs, prefixes, strict=True)]
    with ThreadPoolExecutor(2) as pool:
        got = translate_batches(model, srcs, target_prefix=prefixes, executor=pool, **kw)
    for r, p in zip(got, prefixes, strict=True):
        if p:
            assert r.hypotheses[0][:2] == p
    # a batch with and one without prefixes decode alike when each holds one sentence
    with ThreadPoolExecutor(2) as pool:
        one = translate_batches(model, srcs, target_prefix=prefixes, executor=pool,
                                **{**kw, "max_batch_size": 1})
    assert [r.hypotheses for r in one] == [r.hypotheses for r in serial]
    with pytest.raises(TypeError, match="target_prefix: not an option of translate_iterable"):
        translate_iterable(model, srcs, target_prefix=prefixes)
    with pytest.raises(ValueError, match="target_prefix: expected one entry"):
        translate_batches(model, srcs, target_prefix=prefixes[:3], executor=pool)


def test_batches_really_run_at_once(model):
    """Two batches meet at a barrier inside encode: with one worker they would wait forever."""
    barrier = threading.Barrier(2, timeout=30)
    calls = []

    class Meeting:
        def __init__(self, inner):
            self.inner, self.config = inner, inner.config

        def encode(self, *a):
            calls.append(threading.get_ident())
            if len(calls) <= 2:
                barrier.wait()
            return self.inner.encode(*a)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    srcs = _sources(12, seed=5)
    with ThreadPoolExecutor(2) as pool:
        got = translate_batches(Meeting(model), srcs, executor=pool, beam_size=1,
                                max_decoding_length=5, max_batch_size=3)
    assert len(set(calls[:2])) == 2
    assert [r.hypotheses for r in got] == [
        r.hypotheses for r in translate(model, srcs, beam_size=1, max_decoding_length=5,
                                        max_batch_size=3)
    ]


# -- generate_tokens -----------------------------------------------------------------------------


def test_generate_tokens_is_greedy_translation(model):
    srcs = _sources(30, seed=6) + [[]]
    for min_len in (0, 3):
        for src in srcs:
            ref = translate(model, [src], beam_size=1, max_decoding_length=10,
                            min_decoding_length=min_len)[0].hypotheses[0]
            steps = list(generate_tokens(model, src, max_decoding_length=10,
                                         min_decoding_length=min_len))
            assert [s.token_id for s in steps] == ref
            assert [s.step for s in steps] == list(range(len(ref)))
    lengths = {len(list(generate_tokens(model, s, max_decoding_length=10))) for s in srcs}
    assert len(lengths) > 3 and 10 in lengths  # some end at EOS, some at the length limit


def _step_logits(model, src, tokens):
    """Reference: the logits after feeding BOS + tokens, recomputed from scratch (float64)."""
    lengths = np.array([len(src)])
    ids = np.array([src or [0]], dtype=np.int64)
    state = model.init_decoder_state(model.encode(ids, lengths), lengths, len(tokens) + 1,
                                     pack_weights=False)
    out = []
    for t in [model.config.bos_id, *tokens]:
        logits, _ = model.decode_step(state, np.array([t]))
        row = logits[0].astype(np.float64)
        row[SUPPRESSED] = -np.inf  # the model's suppress_ids: never a candidate
        out.append(row)
    return out


def test_sampling_draws_from_the_top_k_reproducibly(model):
    src = _sources(1, seed=7)[0]
    runs = {}
    for seed in range(6):
        steps = list(generate_tokens(model, src, max_decoding_length=12, sampling_topk=3,
                                     sampling_temperature=1.5, seed=seed, return_log_prob=True))
        again = [s.token_id for s in generate_tokens(model, src, max_decoding_length=12,
                                                     sampling_topk=3, sampling_temperature=1.5,
                                                     seed=seed)]
        tokens = [s.token_id for s in steps]
        assert tokens == again
        runs[seed] = tuple(tokens)
        for s, logits in zip(steps, _step_logits(model, src, tokens), strict=False):
            assert s.token_id in np.argsort(-logits)[:3]
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            assert s.log_prob == pytest.approx(logp[s.token_id], abs=1e-4)
    assert len(set(runs.values())) > 1
    greedy = [s.token_id for s in generate_tokens(model, src, max_decoding_length=12)]
    cold = [s.token_id for s in generate_tokens(model, src, max_decoding_length=12,
                                                sampling_topk=0, sampling_temperature=0.0)]
    assert cold == greedy


def test_generate_tokens_end_token_and_suppression(model):
    src = _sources(1, seed=8)[0]
    greedy = translate(model, [src], beam_size=1, max_decoding_length=20)[0].hypotheses[0]
    assert len(greedy) > 3
    stop = greedy[2]
    got = [s.token_id for s in generate_tokens(model, src, max_decoding_length=20,
                                               end_token=[stop, 99 % VOCAB])]
    assert got == greedy[: greedy.index(stop)]
    sampled = [s.token_id for seed in range(20) for s in generate_tokens(
        model, src, max_decoding_length=20, sampling_topk=0, seed=seed)]
    assert SUPPRESSED not in sampled  # its bias makes it the likeliest, yet it never comes
    banned = sorted(set(greedy))[:2]
    again = [s.token_id for s in generate_tokens(model, src, max_decoding_length=20,
                                                 suppress_tokens=banned)]
    assert again and not set(again) & set(banned)
    long = list(range(3, VOCAB)) * 3  # longer than max_len: usable once cut
    with pytest.warns(UserWarning, match="longer than 48 tokens, truncated"):
        head = [s.token_id for s in generate_tokens(model, long, max_decoding_length=8)]
    assert head == translate(model, [long[:48]], beam_size=1,
                             max_decoding_length=8)[0].hypotheses[0]
    cut = [s.token_id for s in generate_tokens(model, long, max_input_length=7,
                                               max_decoding_length=8)]
    assert cut == translate(model, [long[:7]], beam_size=1, max_decoding_length=8)[0].hypotheses[0]


@pytest.mark.parametrize("options, error, match", [
    ({"beam_size": 2}, ValueError, "beam_size: generate_tokens decodes greedily"),
    ({"sampling_topk": -1}, ValueError, "sampling_topk"),
    ({"sampling_topp": 0.0}, ValueError, "sampling_topp"),
    ({"sampling_temperature": -1.0}, ValueError, "sampling_temperature"),
    ({"max_decoding_length": 0}, ValueError, "max_decoding_length"),
    ({"min_decoding_length": 5, "max_decoding_length": 4}, ValueError, "min_decoding_length"),
    ({"end_token": VOCAB}, IndexError, "end_token"),
    ({"end_token": []}, ValueError, "end_token"),
    ({"seed": -1}, ValueError, "seed"),
    ({"return_log_prob": 1}, TypeError, "return_log_prob"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
    ({"no_repeat_ngram_size": -1}, ValueError, "no_repeat_ngram_size"),
    ({"suppress_tokens": [3, VOCAB]}, IndexError, r"suppress_tokens\[1\]"),
    ({"target_prefix": "ab"}, TypeError, "target_prefix"),
    ({"target_prefix": [1.5]}, TypeError, r"target_prefix\[0\]"),
    ({"max_input_length": -1}, ValueError, "max_input_length"),
])
def test_generate_tokens_checks_its_options_at_once(model, options, error, match):
    with pytest.raises(error, match=match):
        generate_tokens(model, [3, 4], **options)  # no next(): raised by the call itself
    with pytest.raises(IndexError, match="source_ids"):
        generate_tokens(model, [3, VOCAB])


# -- the text level -------------------------------------------------------------------------------


CHARS = "abcdefghijklmnopqrst"


@pytest.fixture(scope="module")
def translator() -> Translator:
    tok = CharTokenizer(list(CHARS))
    assert tok.vocab_size == VOCAB
    return Translator(_model(seed=5, eos_bias=3.0), tok, tok)


def _lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(CHARS), size=int(k))) for k in rng.integers(0, 9, n)]


def test_translator_streams_what_it_translates(translator):
    lines = _lines(40, seed=1) + ["", ""]
    kw = dict(beam_size=2, max_decoding_length=8, max_batch_size=4)
    whole = translator.translate(lines, **kw)
    assert len(set(whole)) > 5
    assert list(translator.translate_iterable(iter(lines), read_batch_size=6, **kw)) == whole
    nbest = list(translator.translate_iterable(lines, n_best=2, **kw))
    assert nbest == translator.translate(lines, n_best=2, **kw)
    assert list(translator.translate_iterable(lines, num_hypotheses=2, **kw)) == nbest
    assert list(translator.translate_iterable([], **kw)) == []
    with pytest.raises(TypeError, match="lines"):
        translator.translate_iterable("abc")
    with pytest.raises(TypeError, match=r"lines\[1\]"):
        list(translator.translate_iterable(["ab", 3]))
    for n in (1, 3):
        too_long = ["ab"] * 4 + ["a" * 49]  # cut to max_len with a warning, as translate does
        with Translator(translator.model, translator.src_tokenizer, translator.tgt_tokenizer,
                        inter_threads=n) as tr:
            with pytest.warns(UserWarning, match="truncated"):
                got = list(tr.translate_iterable(too_long, read_batch_size=3, **kw))
            assert got == translator.translate(["ab"] * 4 + ["a" * 48], **kw)
    with pytest.raises(TypeError, match="bem_size"):
        translator.translate_iterable(lines, bem_size=2)


def test_translator_samples_as_one_call_however_it_reads(translator):
    lines = _lines(30, seed=5)
    kw = dict(beam_size=1, sampling_topk=0, sampling_temperature=1.5, seed=3,
              max_decoding_length=8, max_batch_size=4)
    whole = translator.translate(lines, **kw)
    assert whole != translator.translate(lines, **{**kw, "seed": 4})  # the draws are random
    assert list(translator.translate_iterable(lines, read_batch_size=7, **kw)) == whole


def test_translator_inter_threads(translator):
    lines = _lines(60, seed=2)
    kw = dict(beam_size=2, max_decoding_length=8, max_batch_size=4)
    serial = translator.translate(lines, **kw)
    for n in (2, 3):
        with Translator(translator.model, translator.src_tokenizer, translator.tgt_tokenizer,
                        inter_threads=n) as tr:
            assert tr.translate(lines, **kw) == serial
            assert list(tr.translate_iterable(lines, read_batch_size=16, **kw)) == list(
                translator.translate_iterable(lines, read_batch_size=16, **kw))
    with pytest.raises(ValueError, match="inter_threads"):
        Translator(translator.model, translator.src_tokenizer, translator.tgt_tokenizer,
                   inter_threads=0)


def test_translator_generate_tokens_pieces(translator):
    for line in _lines(20, seed=3):
        steps = list(translator.generate_tokens(line, max_decoding_length=8))
        assert "".join(s.token for s in steps) == translator.translate(
            [line], beam_size=1, max_decoding_length=8)[0]
        assert all(s.token == translator.tgt_tokenizer.decode([s.token_id]) for s in steps)
    texts = translator.translate(_lines(40, seed=4), beam_size=1, max_decoding_length=12)
    line, text = next((s, t) for s, t in zip(_lines(40, seed=4), texts, strict=True)
                      if len(set(t)) > 1)
    stop = text[-1]
    cut = "".join(s.token for s in translator.generate_tokens(line, max_decoding_length=12,
                                                              end_token=stop))
    assert cut == text[: text.index(stop)]
    with pytest.raises(ValueError, match="end_token"):
        translator.generate_tokens(line, end_token="xyz")
    with pytest.raises(ValueError, match="beam_size"):
        translator.generate_tokens(line, beam_size=4)


def test_translate_file_is_atomic(translator, tmp_path):
    lines = _lines(30, seed=5)
    src = tmp_path / "in.txt"
    src.write_bytes("".join(f"{s}\r\n" for s in lines).encode())
    out = tmp_path / "out.txt"
    kw = dict(beam_size=1, max_decoding_length=6)
    assert translator.translate_file(src, out, read_batch_size=7, **kw) == len(lines)
    assert out.read_text().split("\n")[:-1] == translator.translate(lines, **kw)
    before = out.read_bytes()
    src.write_bytes(b"ab\ncd\n\xff\xfe\nef\n")
    with pytest.raises(ValueError, match="line 3 is not UTF-8"):
        translator.translate_file(src, out, read_batch_size=1, **kw)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # no temp left


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(translator, tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("stream") / "tr"
    translator.save(d)
    return d


def test_cli_passes_only_the_options_given(model_dir, tmp_path, monkeypatch, capsys):
    seen = []

    def recording(self, lines, **kw):
        seen.append((self.inter_threads, kw))
        return (s.upper() for s in lines)

    monkeypatch.setattr(Translator, "translate_iterable", recording)
    (tmp_path / "in.txt").write_text("ab\n\ncd\n")
    base = ["translate", "--model", str(model_dir), "--input", str(tmp_path / "in.txt")]
    assert cli.main(base) == 0
    assert capsys.readouterr().out == "AB\n\nCD\n"
    assert seen[-1] == (1, {"n_best": 1, "read_batch_size": cli._TRANSLATE_BLOCK})
    flags = ["--sampling-topk", "5", "--sampling-topp", "0.9", "--sampling-temperature", "0.7",
             "--seed", "3", "--batch-size", "8", "--batch-type", "examples",
             "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "3",
             "--min-decoding-length", "2", "--max-decoding-length", "9", "--max-input-length",
             "20", "--disable-unk", "--length-penalty", "0.5", "--beam-size", "1",
             "--num-hypotheses", "1", "--inter-threads", "2"]
    seen.clear()
    assert cli.main(base + flags) == 0
    assert seen[-1] == (2, {
        "n_best": 1, "read_batch_size": cli._TRANSLATE_BLOCK, "sampling_topk": 5,
        "sampling_topp": 0.9, "sampling_temperature": 0.7,
        "seed": 3, "max_batch_size": 8, "batch_type": "examples", "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3, "min_decoding_length": 2, "max_decoding_length": 9,
        "max_input_length": 20, "disable_unk": True, "length_penalty": 0.5, "beam_size": 1,
    })
    assert cli.main(base + ["--max-batch-size", "8"]) == 0
    assert seen[-1][1]["max_batch_size"] == 8


def test_cli_bad_option_value_is_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("ab\n")
    args = ["translate", "--model", str(model_dir), "--input", str(tmp_path / "in.txt"),
            "--output", str(tmp_path / "out.txt")]
    assert cli.main(args + ["--beam-size", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "beam_size" in err
    assert not (tmp_path / "out.txt").exists()
    assert cli.main(args + ["--inter-threads", "0"]) != 0
    assert "inter_threads" in capsys.readouterr().err
    (tmp_path / "in.txt").write_bytes(b"ab\n\xff\n")
    assert cli.main(args) == 2
    assert "line 2 is not UTF-8" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("")
    args[args.index("--input") + 1] = str(tmp_path / "blank.txt")
    assert cli.main(args) == 0
    assert (tmp_path / "out.txt").read_text() == ""


_MEASURED = """\
import sys
from pytransformer.cli import main
code = main(sys.argv[1:])
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("PEAK_KB", peak, file=sys.stderr)
sys.exit(code)
"""


def _cli_run(model_dir: pathlib.Path, lines_file: pathlib.Path, out_file: pathlib.Path,
             *flags: str) -> int:
    """Runs `pytransformer translate` on stdin in a fresh process (the package under test:
    -P and PYTHONPATH); returns its peak resident memory in kB."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}
    args = ["translate", "--model", str(model_dir), "--beam-size", "1",
            "--max-decoding-length", "3", *flags]
    with open(lines_file, "rb") as stdin, open(out_file, "wb") as stdout:
        proc = subprocess.run([sys.executable, "-P", "-c", _MEASURED, *args], stdin=stdin,
                              stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    return int(err.rsplit("PEAK_KB", 1)[1].split()[0])


def _flat_memory(model_dir, translator, tmp_path, small: int, large: int) -> None:
    rng = np.random.default_rng(0)
    pool = _lines(500, seed=7)
    lines = [pool[i] for i in rng.integers(0, len(pool), large)]
    for n in (small, large):
        (tmp_path / f"in{n}.txt").write_text("".join(f"{s}\n" for s in lines[:n]))
    peaks = {n: _cli_run(model_dir, tmp_path / f"in{n}.txt", tmp_path / f"out{n}.txt")
             for n in (small, large)}
    got = (tmp_path / f"out{large}.txt").read_text().split("\n")[:-1]
    assert got == translator.translate(lines, beam_size=1, max_decoding_length=3)
    assert (tmp_path / f"out{large}.txt").read_text().startswith(
        (tmp_path / f"out{small}.txt").read_text())
    assert peaks[large] - peaks[small] < 4096, peaks  # kB: a few MB, not the input's size


def test_cli_streams_in_bounded_memory(model_dir, translator, tmp_path):
    _flat_memory(model_dir, translator, tmp_path, 20_000, 60_000)


@pytest.mark.slow
def test_cli_streams_200k_lines_in_bounded_memory(model_dir, translator, tmp_path):
    _flat_memory(model_dir, translator, tmp_path, 20_000, 200_000)


def test_cli_answers_each_line_before_the_input_ends(model_dir, translator):
    """With --read-batch-size 1 a translation comes out while stdin is still open."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}
    args = ["-P", "-m", "pytransformer", "translate", "--model", str(model_dir),
            "--read-batch-size", "1", "--beam-size", "1", "--max-decoding-length", "6"]
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    watchdog = threading.Timer(60, proc.kill)  # a readline that never returns fails instead
    watchdog.start()
    try:
        for line in _lines(3, seed=8):
            proc.stdin.write(f"{line}\n".encode())
            proc.stdin.flush()
            answer = proc.stdout.readline().decode()  # would block forever without streaming
            assert answer == translator.translate([line], beam_size=1,
                                                  max_decoding_length=6)[0] + "\n"
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        watchdog.cancel()
        proc.kill()


# -- generate_tokens against CTranslate2 ---------------------------------------------------------

CT2_OPTIONS = [
    {}, {"repetition_penalty": 1.5}, {"repetition_penalty": 0.7}, {"no_repeat_ngram_size": 1},
    {"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 3, "disable_unk": True},
    {"target_prefix": ["w5", "w6"]},
    {"target_prefix": ["w5"], "min_decoding_length": 6, "repetition_penalty": 1.3},
    # CTranslate2's min_decoding_length defaults to 1 (ours, as translate's, to 0)
    {"end_token": "END", "min_decoding_length": 1},
    {"end_token": ["END", "<s>"], "min_decoding_length": 5},
    {"max_input_length": 2},
]


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_tokens_options_match_ctranslate2(tmp_path, seed):
    """Each option of generate_tokens named after CTranslate2's gives CTranslate2's greedy
    translation (translate_batch) on a CTranslate2 model with random weights; and each changes
    some translation, so the comparison can fail."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from test_interop_ct2 import _batch, _spec_model

    from pytransformer.interop import from_ctranslate2

    toks = _spec_model(tmp_path, pre_norm=seed == 1, seed=seed)
    ours_tr = from_ctranslate2(tmp_path)
    ct = ctranslate2.Translator(str(tmp_path), device="cpu", compute_type="float32")
    batch = _batch(toks, n=12, seed=seed)
    plain = None
    for options in CT2_OPTIONS:
        if "end_token" in options:  # END: the commonest token of the plain translations
            common = collections.Counter(t for h in plain for t in h[1:]).most_common(1)[0][0]
            ends = options["end_token"]
            options = {**options, "end_token": common if ends == "END" else [
                common if t == "END" else t for t in ends]}
        ct_options = dict(options)
        ours_options = dict(options)
        if "target_prefix" in options:
            ct_options["target_prefix"] = [options["target_prefix"]] * len(batch)
            ours_options["target_prefix"] = " ".join(options["target_prefix"])
        ref = [r.hypotheses[0] for r in ct.translate_batch(
            batch, beam_size=1, max_decoding_length=16, **ct_options)]
        ours = [[s.token.strip() for s in ours_tr.generate_tokens(
            " ".join(src), max_decoding_length=16, **ours_options)] for src in batch]
        same = sum(a == b for a, b in zip(ours, ref, strict=True))
        assert same >= len(batch) - 1, (options, same)  # one greedy tie allowed, as in interop
        if plain is None:
            plain = ours
        else:
            assert ours != plain, options
