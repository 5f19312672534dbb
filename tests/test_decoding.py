"""Decoding: greedy, beam search and sampling.

The search code is tested first against small reference "models" written here (a random table
over a tiny vocabulary whose next-token logits depend on the whole history, so a wrong cache
reorder changes the answer), with every expectation computed independently by re-running the
model from scratch on each sequence: exhaustive enumeration, teacher-forced rescoring, argmax loops.
The rules are CTranslate2's (see pytransformer.decode.search): end tokens are masked on the logits
before the softmax while a hypothesis is too short, L counts the EOS, lp(L) = L ** alpha, and an
empty source translates to nothing with score 0 without running the model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import small_config

from pytransformer.decode import generate, length_penalty, search, translate

# ----------------------------------------------------------------------------------------------
# Reference models implementing the incremental decoding interface


@dataclass
class ToyConfig:
    src_vocab_size: int = 9
    tgt_vocab_size: int = 5
    vocab_size: int = 5
    max_len: int = 12
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int | None = 2


class ToyState:
    def __init__(self, src, src_lengths, ctx, max_steps, log):
        self.src, self.src_lengths, self.ctx = src, src_lengths, ctx
        self.hist = np.zeros((src.shape[0], max_steps), dtype=np.int64)
        self.step = 0
        self.log = log

    @property
    def batch_size(self) -> int:
        return self.hist.shape[0]

    def reorder(self, indices):
        indices = np.asarray(indices)
        assert indices.ndim == 1 and indices.size > 0
        assert indices.min() >= 0 and indices.max() < self.batch_size
        self.src, self.src_lengths = self.src[indices], self.src_lengths[indices]
        self.ctx, self.hist = self.ctx[indices], self.hist[indices]


class ToySeq2Seq:
    """Logits = f(previous token) + g(hash of the whole history) + h(source); float32 like the
    real model. Attention: a softmax over the valid source positions of a token/source table."""

    def __init__(self, config: ToyConfig | None = None, seed: int = 0, eos_bias: float = 0.0):
        self.config = config or ToyConfig()
        v, sv = self.config.tgt_vocab_size, self.config.src_vocab_size
        rng = np.random.default_rng(seed)
        self.prev = rng.normal(scale=1.5, size=(v, v))
        self.hist_tab = rng.normal(scale=1.5, size=(17, v))
        self.ctx_tab = rng.normal(scale=1.0, size=(11, v))
        self.attn_tab = rng.normal(size=(v, sv))
        if self.config.eos_id is not None:
            self.prev[:, self.config.eos_id] += eos_bias
        self.batch_log: list[int] = []
        self.calls = 0

    def encode(self, src_ids, src_lengths):
        self.calls += 1
        mem = src_ids.astype(np.float32)[:, :, None].copy()
        for b, n in enumerate(src_lengths):
            mem[b, n:] = np.nan  # padding: must never influence anything
        return mem

    def init_decoder_state(self, memory, src_lengths, max_steps, pack_weights=None):
        src = np.nan_to_num(memory[:, :, 0], nan=0).astype(np.int64)
        ctx = np.array(
            [int((src[b, :n] * np.arange(1, n + 1)).sum()) % 11 for b, n in enumerate(src_lengths)]
        )
        return ToyState(src, np.asarray(src_lengths).copy(), ctx, max_steps, self.batch_log)

    def _logits(self, hist, ctx):
        t = hist.shape[1]
        h = (hist * (np.arange(t) + 3)).sum(axis=1) % 17
        return (self.prev[hist[:, -1]] + self.hist_tab[h] + self.ctx_tab[ctx]).astype(np.float32)

    def decode_step(self, state, tokens, *, need_attention=False):
        tokens = np.asarray(tokens)
        assert tokens.shape == (state.batch_size,)
        assert state.step < state.hist.shape[1], "decoded past max_steps"
        state.log.append(state.batch_size)
        state.hist[:, state.step] = tokens
        state.step += 1
        logits = self._logits(state.hist[:, : state.step], state.ctx)
        attn = None
        if need_attention:
            s = state.src.shape[1]
            a = self.attn_tab[tokens[:, None], state.src]
            valid = np.arange(s)[None] < state.src_lengths[:, None]
            a = np.exp(np.where(valid, a - a.max(axis=1, keepdims=True), -np.inf))
            attn = (a / np.maximum(a.sum(axis=1, keepdims=True), 1e-30)).astype(np.float32)
        return logits, attn

    def translate(self, sources, **kw):
        return translate(self, sources, **kw)


class ToyLM(ToySeq2Seq):
    def init_state(self, batch_size, max_steps, pack_weights=None):
        src = np.zeros((batch_size, 1), dtype=np.int64)
        return ToyState(src, np.ones(batch_size, dtype=np.int64), np.zeros(batch_size, np.int64),
                        max_steps, self.batch_log)

    def decode_step(self, state, tokens):
        return super().decode_step(state, tokens)[0], None


# ----------------------------------------------------------------------------------------------
# Independent references: from-scratch recomputation of each sequence


def ref_logp(model, src, seq, no_eos=False):
    """float64 log-probabilities of the next token after feeding seq (from scratch); no_eos:
    with the EOS masked before the softmax (a hypothesis below its minimum length)."""
    if isinstance(model, ToyLM):
        state = model.init_state(1, len(seq))
    else:
        mem = model.encode(np.array([src]), np.array([len(src)]))
        state = model.init_decoder_state(mem, np.array([len(src)]), len(seq))
    for tok in seq:
        logits, _ = ToySeq2Seq.decode_step(model, state, np.array([tok]))
    x = logits[0].astype(np.float64)
    if no_eos:
        x[model.config.eos_id] = -np.inf
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def ref_attention(model, src, hyp):
    if not src:
        return np.zeros((len(hyp), 0))
    bos = model.config.bos_id
    a = model.attn_tab[np.array([bos] + hyp[:-1] if hyp else [], dtype=np.int64)[:, None],
                       np.array(src)[None]]
    a = np.exp(a - a.max(axis=1, keepdims=True))
    return a / a.sum(axis=1, keepdims=True)


def ref_score(model, src, prefix, hyp, ended_by_eos, alpha, min_len=0):
    seq = list(prefix)
    total = 0.0
    for i, tok in enumerate(hyp + ([model.config.eos_id] if ended_by_eos else [])):
        total += ref_logp(model, src, seq, i < min_len)[tok]
        seq.append(tok)
    n = len(hyp) + int(ended_by_eos)
    return total / length_penalty(n, alpha)


def exhaustive(model, src, prefix, min_len, max_len, alpha, kind="power"):
    """Every complete hypothesis with its score, best first (ties keep enumeration order)."""
    eos = model.config.eos_id
    out = []

    def walk(seq, hyp, total):
        lp = ref_logp(model, src, seq, len(hyp) < min_len)
        for tok in range(lp.size):
            t = total + lp[tok]
            if tok == eos:
                if len(hyp) >= min_len:
                    out.append((t / length_penalty(len(hyp) + 1, alpha, kind), hyp))
            elif len(hyp) + 1 == max_len:
                out.append((t / length_penalty(max_len, alpha, kind), hyp + [tok]))
            else:
                walk(seq + [tok], hyp + [tok], t)

    walk(list(prefix), [], 0.0)
    out.sort(key=lambda x: -x[0])
    return out


def ref_greedy(model, src, prefix, max_len, min_len=0):
    seq, hyp, eos = list(prefix), [], model.config.eos_id
    while len(hyp) < max_len:
        lp = ref_logp(model, src, seq)
        if eos is not None and len(hyp) < min_len:
            lp[eos] = -np.inf
        tok = int(lp.argmax())
        if tok == eos:
            break
        hyp.append(tok)
        seq.append(tok)
    return hyp


SOURCES = [[3, 4, 5], [8], [5, 6, 7, 8, 3, 4], [4, 4], [7, 3, 5, 6], []]
FULL = SOURCES[:-1]  # the empty source is not decoded


def test_empty_source_is_not_decoded():
    res = translate(Exploding(), [[]], num_hypotheses=2, beam_size=2, return_scores=True,
                    return_attention=True, target_prefix=[[3, 4]])
    assert res[0].hypotheses == [[3, 4]] * 2 and res[0].scores == [0.0, 0.0]
    assert [a.shape for a in res[0].attention] == [(2, 0)] * 2


# ----------------------------------------------------------------------------------------------
# Beam search against exhaustive enumeration


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
@pytest.mark.parametrize("min_len", [0, 2])
def test_full_width_beam_equals_exhaustive(alpha, min_len):
    # A beam as wide as the search space keeps every prefix; with a length penalty it registers
    # every complete hypothesis (it stops after 4**5 of them, more than there are), and with
    # alpha = 0 it stops once the best candidate ends, which no later hypothesis can beat (only
    # the 1-best is then exact).
    model = ToySeq2Seq(ToyConfig(tgt_vocab_size=4), seed=0, eos_bias=1.0)
    refs = [exhaustive(model, src, [1], min_len, 5, alpha) for src in FULL]
    for n_best in (1, 4) if alpha else (1,):
        res = translate(model, FULL, beam_size=4**5, length_penalty=alpha,
                        max_decoding_length=5, min_decoding_length=min_len,
                        num_hypotheses=n_best, return_scores=True)
        for ref, r in zip(refs, res, strict=True):
            assert r.hypotheses == [h for _, h in ref[:n_best]]
            np.testing.assert_allclose(r.scores, [s for s, _ in ref[:n_best]], atol=1e-5)


@settings(max_examples=25)
@given(v=st.integers(3, 5), n=st.integers(1, 4), min_len=st.integers(0, 4),
       alpha=st.floats(-0.5, 2.0), seed=st.integers(0, 10_000), n_best=st.integers(1, 3))
def test_full_width_beam_equals_exhaustive_property(v, n, min_len, alpha, seed, n_best):
    min_len = min(min_len, n)
    if alpha == 0:
        n_best = 1  # see test_full_width_beam_equals_exhaustive
    model = ToySeq2Seq(ToyConfig(tgt_vocab_size=v), seed=seed, eos_bias=seed % 3 - 1.0)
    srcs = SOURCES[: 1 + seed % 3]
    res = translate(model, srcs, beam_size=v**n, length_penalty=alpha, max_decoding_length=n,
                    min_decoding_length=min_len, num_hypotheses=n_best, return_scores=True)
    for src, r in zip(srcs, res, strict=True):
        ref = exhaustive(model, src, [1], min_len, n, alpha)[:n_best]
        np.testing.assert_allclose(r.scores, [s for s, _ in ref], atol=1e-5)
        # tokens must match except where two hypotheses tie in score
        if len({round(s, 4) for s, _ in ref}) == len(ref):
            assert r.hypotheses == [h for _, h in ref]


def test_lm_full_width_beam_equals_exhaustive():
    """Prompts of different lengths share the step: the short one searches while the long one
    is still being fed its prompt."""
    lm = ToyLM(seed=5, eos_bias=0.3)
    prompts = [[1, 3], [1, 4, 4, 3, 0], [1]]
    out = generate(lm, prompts, max_new_tokens=4, beam_size=5**4, length_penalty=0.8)
    for p, hyp in zip(prompts, out, strict=True):
        ref = exhaustive(lm, [], p, 0, 4, 0.8, "gnmt")  # generate keeps the GNMT penalty
        assert hyp == ref[0][1]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_narrow_beam_scores_are_true_scores(alpha):
    """A narrow beam cannot be exact, but every hypothesis it returns must carry its true score,
    respect the length limits and come best first."""
    cfg = ToyConfig(tgt_vocab_size=11, max_len=40)
    model = ToySeq2Seq(cfg, seed=7, eos_bias=1.0)
    res = translate(model, FULL, beam_size=3, num_hypotheses=3, length_penalty=alpha,
                    max_decoding_length=9, min_decoding_length=2, return_scores=True)
    for src, r in zip(FULL, res, strict=True):
        assert len(r.hypotheses) == 3
        assert r.scores == sorted(r.scores, reverse=True)
        assert len({tuple(h) for h in r.hypotheses}) == 3
        for hyp, score in zip(r.hypotheses, r.scores, strict=True):
            assert 2 <= len(hyp) <= 9 and cfg.eos_id not in hyp
            want = ref_score(model, src, [1], hyp, len(hyp) < 9, alpha, min_len=2)
            assert score == pytest.approx(want, abs=1e-5)


def test_beam_search_beats_or_equals_greedy_score():
    """At one maximum length a beam wide enough to keep every hypothesis finds the best-scoring
    one (checked by enumeration), which scores at least as well as greedy's."""
    cfg = ToyConfig(tgt_vocab_size=11, max_len=40)
    model = ToySeq2Seq(cfg, seed=1, eos_bias=0.5)  # greedy is not optimal for every source
    kw = dict(return_scores=True, max_decoding_length=3, length_penalty=0.6)
    greedy = translate(model, FULL, beam_size=1, **kw)
    exact = translate(model, FULL, beam_size=11**3, **kw)
    gains = []
    for g, e, src in zip(greedy, exact, FULL, strict=True):
        best_score, best = exhaustive(model, src, [1], 0, 3, 0.6)[0]
        assert e.hypotheses[0] == best
        assert e.scores[0] == pytest.approx(best_score, abs=1e-5)
        assert np.isfinite(g.scores[0]) and e.scores[0] >= g.scores[0] - 1e-6
        gains.append(e.scores[0] - g.scores[0])
    assert max(gains) > 1e-3  # greedy misses the best somewhere: the comparison has teeth


# ----------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize("min_len", [0, 3])
def test_greedy_matches_reference_and_beam_of_one(min_len):
    cfg = ToyConfig(tgt_vocab_size=11, max_len=40)
    model = ToySeq2Seq(cfg, seed=2, eos_bias=1.0)
    kw = dict(max_decoding_length=10, min_decoding_length=min_len, length_penalty=0.6)
    greedy = translate(model, FULL, beam_size=1, return_scores=True, **kw)
    for src, r in zip(FULL, greedy, strict=True):
        assert r.hypotheses[0] == ref_greedy(model, src, [1], 10, min_len)
        hyp = r.hypotheses[0]
        assert r.scores[0] == pytest.approx(
            ref_score(model, src, [1], hyp, len(hyp) < 10, 0.6, min_len), abs=1e-5)
    # The beam search itself with one beam: identical tokens and bit-identical scores.
    mem = model.encode(np.array([[3, 4, 5]]), np.array([3]))
    for src, r in zip(FULL, greedy, strict=True):
        mem = model.encode(np.array([src]), np.array([len(src)]))
        state = model.init_decoder_state(mem, np.array([len(src)]), 10)
        prob = search.Problem(
            step=lambda tok, s=state: model.decode_step(s, tok), state=state,
            prefixes=[np.array([1])], min_gen=np.array([min_len]), max_gen=np.array([10]),
            end_ids=np.array([2]), alpha=0.6, keep_prefix=True)
        (hyp,), = search.beam_search(prob, 1, 1, False)
        assert hyp.tokens == r.hypotheses[0] and hyp.score == r.scores[0]


def test_finished_sentences_leave_the_batch():
    cfg = ToyConfig(tgt_vocab_size=11, max_len=40)
    model = ToySeq2Seq(cfg, seed=2, eos_bias=1.0)
    res = translate(model, FULL, beam_size=1, max_decoding_length=30)
    lens = sorted(len(r.hypotheses[0]) for r in res)
    assert lens[0] < lens[-1]  # otherwise the test shows nothing
    log = model.batch_log
    assert log[0] == len(FULL) and all(a >= b for a, b in zip(log, log[1:], strict=False))
    assert len(log) == lens[-1] + 1 and log[-1] == lens.count(lens[-1])
    model.batch_log.clear()
    translate(model, FULL, beam_size=3, max_decoding_length=30)
    log = model.batch_log  # one row per sentence at the first step, then 3 per live sentence
    assert log[0] == len(FULL) and all(b % 3 == 0 for b in log[1:])
    assert all(a >= b for a, b in zip(log[1:], log[2:], strict=False))
    assert log[1] == 3 * len(FULL) and log[-1] < log[1]


# ----------------------------------------------------------------------------------------------
# Lengths, EOS, n-best, attention, batching


@pytest.mark.parametrize("beam_size", [1, 4])
def test_forced_length(beam_size):
    model = ToySeq2Seq(seed=4, eos_bias=8.0)  # EOS is by far the likeliest token
    res = translate(model, SOURCES, beam_size=beam_size, min_decoding_length=6,
                    max_decoding_length=6, num_hypotheses=min(beam_size, 2), return_scores=True)
    for src, r in zip(FULL, res[:-1], strict=True):
        for hyp, score in zip(r.hypotheses, r.scores, strict=True):
            assert len(hyp) == 6 and 2 not in hyp
            want = ref_score(model, src, [1], hyp, False, 1.0, min_len=6)
            assert score == pytest.approx(want, abs=1e-5)
    # Without a minimum, that model stops at once.
    res = translate(model, SOURCES, beam_size=beam_size, max_decoding_length=6)
    assert all(r.hypotheses[0] == [] for r in res)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_max_length_caps_and_model_max_len(beam_size):
    model = ToySeq2Seq(ToyConfig(tgt_vocab_size=11, max_len=7), seed=8, eos_bias=-20.0)
    res = translate(model, FULL, beam_size=beam_size, max_decoding_length=5)
    assert all(len(r.hypotheses[0]) == 5 for r in res)
    res = translate(model, FULL, beam_size=beam_size, max_decoding_length=100)
    assert all(len(r.hypotheses[0]) == 7 for r in res)  # capped at the model's positions


@pytest.mark.parametrize("beam_size", [1, 3])
def test_attention(beam_size):
    cfg = ToyConfig(tgt_vocab_size=11, max_len=40)
    model = ToySeq2Seq(cfg, seed=9, eos_bias=0.5)
    res = translate(model, SOURCES, beam_size=beam_size, num_hypotheses=beam_size,
                    max_decoding_length=8, return_attention=True)
    for src, r in zip(SOURCES, res, strict=True):
        assert r.scores is None and len(r.attention) == len(r.hypotheses)
        for hyp, att in zip(r.hypotheses, r.attention, strict=True):
            assert att.shape == (len(hyp), len(src)) and att.dtype == np.float32
            np.testing.assert_allclose(att, ref_attention(model, src, hyp), atol=1e-6)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_batch_invariance_and_chunking(beam_size):
    cfg = ToyConfig(tgt_vocab_size=11, max_len=40)
    model = ToySeq2Seq(cfg, seed=6, eos_bias=0.8)
    kw = dict(beam_size=beam_size, num_hypotheses=min(2, beam_size), return_scores=True,
              max_decoding_length=15)
    together = translate(model, SOURCES, **kw)
    chunked = translate(model, SOURCES, max_batch_size=2, **kw)
    alone = [translate(model, [s], **kw)[0] for s in SOURCES]
    assert together == chunked == alone


def test_n_best_ordering_and_count():
    cfg = ToyConfig(tgt_vocab_size=11, max_len=40)
    model = ToySeq2Seq(cfg, seed=12, eos_bias=0.8)
    res = translate(model, SOURCES, beam_size=6, num_hypotheses=6, return_scores=True)
    one = translate(model, SOURCES, beam_size=6, num_hypotheses=1, return_scores=True)
    for r, o in zip(res, one, strict=True):
        assert len(r.hypotheses) == 6 and r.scores == sorted(r.scores, reverse=True)
        assert r.hypotheses[0] == o.hypotheses[0]


# ----------------------------------------------------------------------------------------------
# Language-model generation and sampling


PROMPTS = [[1, 3, 4], [1], [1, 5, 6, 7, 3, 3], [1, 9]]


def lm_model(**kw):
    return ToyLM(ToyConfig(tgt_vocab_size=12, vocab_size=12, max_len=30), **kw)


def test_generate_greedy_matches_reference():
    lm = lm_model(seed=1, eos_bias=0.5)
    for out in (generate(lm, PROMPTS, max_new_tokens=8, temperature=0),
                generate(lm, PROMPTS, max_new_tokens=8, top_k=1)):
        for p, o in zip(PROMPTS, out, strict=True):
            assert o == ref_greedy(lm, [], p, 8)


def test_generate_respects_max_len():
    lm = lm_model(seed=1, eos_bias=-30.0)
    out = generate(lm, PROMPTS, max_new_tokens=100, temperature=0)
    assert [len(o) for o in out] == [30 - len(p) + 1 for p in PROMPTS]
    assert generate(lm, PROMPTS, max_new_tokens=0) == [[]] * 4


def test_sampling_reproducible_and_batch_invariant():
    lm = lm_model(seed=2, eos_bias=-1.0)
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=6, top_p=0.9)
    a = generate(lm, PROMPTS, seed=123, **kw)
    assert a == generate(lm, PROMPTS, seed=123, **kw)
    assert a == generate(lm, PROMPTS, seed=123, max_batch_size=1, **kw)
    assert a != generate(lm, PROMPTS, seed=124, **kw)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (5, 0.7)])
def test_sampled_tokens_stay_in_the_allowed_set(top_k, top_p):
    lm = lm_model(seed=3, eos_bias=-2.0)
    out = generate(lm, PROMPTS * 5, max_new_tokens=8, temperature=1.3, top_k=top_k,
                   top_p=top_p, seed=0)
    for p, o in zip(PROMPTS * 5, out, strict=True):
        seq = list(p)
        for tok in o:
            lp = ref_logp(lm, [], seq)
            order = np.argsort(-lp, kind="stable")
            allowed = order[:top_k] if top_k else order
            probs = np.exp(lp[allowed] / 1.3)
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            allowed = allowed[before < top_p]
            assert tok in allowed
            seq.append(tok)


@pytest.mark.parametrize("temperature", [1e-300, 1e-310, 5e-324])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9)])
def test_tiny_temperatures_are_greedy(temperature, top_k, top_p):
    """1 / T overflows float64 for these: sampling must still pick the most likely token (it
    used to turn every probability into NaN and return token 0)."""
    lm = lm_model(seed=6, eos_bias=-1.0)
    greedy = generate(lm, PROMPTS, max_new_tokens=8, temperature=0)
    with np.errstate(over="raise", invalid="raise"):  # no overflow or NaN on the way either
        out = generate(lm, PROMPTS, max_new_tokens=8, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=1)
    assert out == greedy
    assert any(tok != 0 for seq in greedy for tok in seq)


def test_sampling_distribution():
    """One token sampled 4000 times from one prompt matches the truncated, tempered softmax."""
    lm = lm_model(seed=4)
    n, temp, top_k = 4000, 0.7, 4
    out = generate(lm, [[1, 3]] * n, max_new_tokens=1, temperature=temp, top_k=top_k, seed=9)
    lp = ref_logp(lm, [], [1, 3])
    allowed = np.argsort(-lp)[:top_k]
    want = np.zeros(lp.size)
    want[allowed] = np.exp(lp[allowed] / temp)
    want /= want.sum()
    counts = np.bincount([o[0] for o in out if o], minlength=lp.size)
    got = counts / n
    # Five standard deviations of a binomial frequency.
    assert np.all(np.abs(got - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-12)


def test_generate_beam_and_batch_invariance():
    lm = lm_model(seed=5, eos_bias=0.5)
    out = generate(lm, PROMPTS, max_new_tokens=6, beam_size=4)
    assert out == [generate(lm, [p], max_new_tokens=6, beam_size=4)[0] for p in PROMPTS]
    assert generate(lm, PROMPTS, max_new_tokens=6, beam_size=1, temperature=0) == [
        generate(lm, [p], max_new_tokens=6, temperature=0)[0] for p in PROMPTS]


# ----------------------------------------------------------------------------------------------
# Validation, before any work


class Exploding(ToySeq2Seq):
    def encode(self, *a):
        raise AssertionError("work started before the arguments were checked")

    init_state = encode


@pytest.mark.parametrize(
    "sources,kw,exc,words",
    [
        ([[3, -1]], {}, IndexError, "sources[0][1]"),
        ([[3], [3, 9]], {}, IndexError, "sources[1][1]"),
        ([[3.0, 4.0]], {}, TypeError, "sources[0]"),
        ("abc", {}, TypeError, "sources"),
        ([[3]], {"beam_size": 0}, ValueError, "beam_size"),
        ([[3]], {"beam_size": 2.0}, TypeError, "beam_size"),
        ([[3]], {"num_hypotheses": 3, "beam_size": 2}, ValueError, "num_hypotheses"),
        ([[3]], {"num_hypotheses": 2, "beam_size": 1}, ValueError, "num_hypotheses"),
        ([[3]], {"patience": 0.0}, ValueError, "patience"),
        ([[3]], {"length_penalty_kind": "x"}, ValueError, "length_penalty_kind"),
        ([[3]], {"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
        ([[3]], {"no_repeat_ngram_size": -1}, ValueError, "no_repeat_ngram_size"),
        ([[3]], {"disable_unk": True}, ValueError, "unk_id"),
        ([[3]], {"unk_id": 5}, ValueError, "unk_id"),
        ([[3]], {"suppress_sequences": [[1, 5]]}, IndexError, "suppress_sequences[0][1]"),
        ([[3]], {"end_token": []}, ValueError, "end_token"),
        ([[3]], {"end_token": [2, 7]}, IndexError, "end_token[1]"),
        ([[3]], {"end_token": "2"}, TypeError, "end_token"),
        ([[3]], {"target_prefix": [[3], [4]]}, ValueError, "target_prefix"),
        ([[3]], {"target_prefix": [[9]]}, IndexError, "target_prefix[0][0]"),
        ([[3]], {"max_input_length": -1}, ValueError, "max_input_length"),
        ([[3]], {"sampling_topk": -1}, ValueError, "sampling_topk"),
        ([[3]], {"sampling_topp": 0.0}, ValueError, "sampling_topp"),
        ([[3]], {"sampling_topp": 1.5}, ValueError, "sampling_topp"),
        ([[3]], {"sampling_temperature": -1.0}, ValueError, "sampling_temperature"),
        ([[3]], {"seed": -1}, ValueError, "seed"),
        ([[3]], {"min_alternative_expansion_prob": 2.0}, ValueError,
         "min_alternative_expansion_prob"),
        ([[3]], {"batch_type": "rows"}, ValueError, "batch_type"),
        ([[3]], {"use_vmap": 1}, TypeError, "use_vmap"),
        ([[3]], {"vocab_subset_fn": 3}, TypeError, "vocab_subset_fn"),
        ([[3]], {"max_decoding_length": 0}, ValueError, "max_decoding_length"),
        ([[3]], {"min_decoding_length": 5, "max_decoding_length": 4}, ValueError,
         "min_decoding_length"),
        ([[3]], {"min_decoding_length": 13}, ValueError, "min_decoding_length"),
        ([[3]], {"length_penalty": float("nan")}, ValueError, "length_penalty"),
        ([[3]], {"max_batch_size": 0}, ValueError, "max_batch_size"),
        ([[3]], {"return_scores": 1}, TypeError, "return_scores"),
    ],
)
def test_translate_validation(sources, kw, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        translate(Exploding(), sources, **kw)


def test_long_sources_are_truncated_with_a_warning():
    model = ToySeq2Seq(ToyConfig(tgt_vocab_size=11, max_len=12), seed=3)
    src = [3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 3, 4]
    with pytest.warns(UserWarning, match="truncated"):
        got = translate(model, [src], max_decoding_length=5, return_attention=True)
    assert got[0].hypotheses == translate(model, [src[:12]], max_decoding_length=5)[0].hypotheses
    assert got[0].attention[0].shape[1] == len(src)  # zeros past the cut, as CTranslate2
    with pytest.warns(UserWarning, match="truncated"):
        cut = translate(model, [src], max_decoding_length=5, max_input_length=3)
    assert cut[0].hypotheses == translate(model, [src[:3]], max_decoding_length=5)[0].hypotheses


def test_translate_empty():
    assert translate(Exploding(), []) == []
    assert generate(Exploding(), [], max_new_tokens=3) == []


@pytest.mark.parametrize(
    "prompts,kw,exc,words",
    [
        ([[1, 3]], {"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ([[1, 3]], {"temperature": -0.5}, ValueError, "temperature"),
        ([[1, 3]], {"top_k": -1}, ValueError, "top_k"),
        ([[1, 3]], {"top_p": 0.0}, ValueError, "top_p"),
        ([[1, 3]], {"top_p": 1.5}, ValueError, "top_p"),
        ([[1, 3]], {"beam_size": 2, "top_k": 3}, ValueError, "top_k"),
        ([[1, 3]], {"seed": -3}, ValueError, "seed"),
        ([[1, 3]], {"seed": "x"}, TypeError, "seed"),
        ([[1, 5]], {}, IndexError, r"prompts\[0\]\[1\]"),
        ([[1] * 13], {}, ValueError, "max_len"),
        ([[1], []], {}, ValueError, r"prompts\[1\]"),
    ],
)
def test_generate_validation(prompts, kw, exc, words):
    kw.setdefault("max_new_tokens", 3)
    with pytest.raises(exc, match=words):
        generate(Exploding(), prompts, **kw)


def test_length_penalty_formula():
    for n, a in itertools.product([0, 1, 7, 30], [0.0, 0.6, 1.0]):
        assert length_penalty(n, a, "gnmt") == pytest.approx(((5 + n) / 6) ** a)
        assert length_penalty(n, a) == pytest.approx(float(n) ** a)


# ----------------------------------------------------------------------------------------------
# The real model: the KV-cached decoder against recomputing the whole decoder every step


def _real_models():
    import pytransformer

    if not hasattr(pytransformer, "Transformer"):
        pytest.skip("the model is not in this build")
    return pytransformer


def decoding_config(vocab, **overrides):
    """d_model 32, 4 heads, 2 + 2 layers, no dropout, untied embeddings."""
    return small_config(
        vocab, 32, layers=2, num_heads=4, max_len=40, dropout=0.0, tie_embeddings="none",
        **overrides,
    )


def tiny_transformer(seed=0, **kw):
    pt = _real_models()
    cfg = decoding_config(23, tgt_vocab_size=19, **kw)
    return _favour_eos(pt.Transformer(cfg, seed=seed).eval())


def tiny_lm(seed=0):
    pt = _real_models()
    cfg = decoding_config(19, num_encoder_layers=0)
    return _favour_eos(pt.TransformerLM(cfg, seed=seed).eval())


def _favour_eos(model):
    """Random weights rarely pick EOS; a little output bias makes hypotheses end at different
    lengths (with seed 1, for every search below)."""
    sd = model.state_dict()
    sd["output.bias"] = sd["output.bias"].copy()
    sd["output.bias"][model.config.eos_id] += 1.0
    model.load_state_dict(sd)
    return model


class RecomputeState:
    def __init__(self, src, lengths, batch):
        self.src, self.lengths = src, lengths
        self.prefix = np.zeros((batch, 0), dtype=np.int64)
        self.step = 0

    @property
    def batch_size(self):
        return self.prefix.shape[0]

    def reorder(self, indices):
        self.prefix = self.prefix[indices]
        if self.src is not None:
            self.src, self.lengths = self.src[indices], self.lengths[indices]


class Recompute:
    """The same model with no cache at all: each step runs the full teacher-forced forward over
    the whole prefix (and, for the Transformer, the encoder again) and keeps the last position."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def encode(self, src, lengths):
        return src, lengths

    def init_decoder_state(self, memory, lengths, max_steps, pack_weights=None):
        return RecomputeState(memory[0], lengths, memory[0].shape[0])

    def init_state(self, batch_size, max_steps, pack_weights=None):
        return RecomputeState(None, None, batch_size)

    def decode_step(self, state, tokens, *, need_attention=False):
        state.prefix = np.concatenate([state.prefix, np.asarray(tokens)[:, None]], axis=1)
        state.step += 1
        if state.src is None:
            logits = self.model.forward(state.prefix)
        else:
            logits = self.model.forward(state.src, state.lengths, state.prefix)
        return np.ascontiguousarray(logits[:, -1]), None


REAL_SOURCES = [[3, 4, 5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [4, 4],
                [21, 22, 3, 5, 7, 9, 11], [5, 6, 7]]


@pytest.mark.parametrize("beam_size,nbest", [(1, 1), (4, 2)])
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decoding_equals_full_recompute(beam_size, nbest, norm_first):
    model = tiny_transformer(seed=1, norm_first=norm_first)
    kw = dict(beam_size=beam_size, num_hypotheses=nbest, max_decoding_length=14,
              min_decoding_length=2, return_scores=True)
    cached = translate(model, REAL_SOURCES, **kw)
    full = translate(Recompute(model), REAL_SOURCES, **kw)
    lens = {len(h) for r in cached for h in r.hypotheses}
    assert len(lens) > 1  # hypotheses ended at different steps (EOS and leaving exercised)
    for c, f in zip(cached, full, strict=True):
        assert c.hypotheses == f.hypotheses
        np.testing.assert_allclose(c.scores, f.scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_lm_cached_generation_equals_full_recompute(beam_size):
    lm = tiny_lm(seed=2)
    prompts = [[1, 3, 4], [1], [1, 5, 6, 7, 8, 9, 3], [1, 10]]
    kw = dict(max_new_tokens=12, beam_size=beam_size, temperature=0 if beam_size == 1 else 1.0)
    assert generate(lm, prompts, **kw) == generate(Recompute(lm), prompts, **kw)
    sampled = dict(max_new_tokens=12, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    assert generate(lm, prompts, **sampled) == generate(Recompute(lm), prompts, **sampled)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_real_batch_invariance(beam_size):
    model = tiny_transformer(seed=3)
    kw = dict(beam_size=beam_size, num_hypotheses=min(beam_size, 2), max_decoding_length=12,
              return_scores=True, return_attention=True)
    together = translate(model, REAL_SOURCES, **kw)
    chunked = translate(model, REAL_SOURCES, max_batch_size=4, **kw)
    for i, src in enumerate(REAL_SOURCES):
        alone = translate(model, [src], **kw)[0]
        for other in (together[i], chunked[i]):
            assert other.hypotheses == alone.hypotheses
            np.testing.assert_allclose(other.scores, alone.scores, rtol=0, atol=1e-5)
            for a, b in zip(other.attention, alone.attention, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-5)
        for hyp, att in zip(alone.hypotheses, alone.attention, strict=True):
            assert att.shape == (len(hyp), len(src))
            assert (att >= 0).all()
            np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=1e-5)


def test_thread_safety():
    """4 Python threads translating different inputs with one model give the serial results."""
    import threading

    model = tiny_transformer(seed=4)
    rng = np.random.default_rng(0)
    inputs = [[rng.integers(3, 23, size=int(rng.integers(1, 15))).tolist() for _ in range(5)]
              for _ in range(4)]
    kw = [dict(beam_size=b, return_scores=True, max_decoding_length=16) for b in (1, 3, 4, 2)]
    serial = [translate(model, x, **k) for x, k in zip(inputs, kw, strict=True)]
    results: list = [None] * 4
    errors: list = []

    def work(i):
        try:
            for _ in range(3):
                out = translate(model, inputs[i], **kw[i])
                if results[i] is None:
                    results[i] = out
                assert out == results[i]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == serial


def test_real_model_validation():
    model = tiny_transformer()
    with pytest.raises(IndexError, match=r"sources\[1\]\[0\]"):
        model.translate([[3], [23]])
    with pytest.warns(UserWarning, match="truncated"):
        model.translate([[3] * 41], max_decoding_length=2)
    assert model.translate([]) == []


@pytest.mark.parametrize("beam_size", [1, 4])
def test_matches_pytorch_decoder(beam_size):
    """The same weights decoded by PyTorch (bench/torch_decode.py over tests/torch_reference.py,
    its own KV cache and search loop) give the same best hypotheses."""
    pytest.importorskip("torch")
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import torch
    import torch_decode
    from torch_reference import build_torch_model

    model = tiny_transformer(seed=1)
    tm = build_torch_model(model.config, model.state_dict()).eval()
    got = translate(model, REAL_SOURCES, beam_size=beam_size, max_decoding_length=14,
                    min_decoding_length=2, num_hypotheses=beam_size, return_scores=True)
    if beam_size == 1:
        want = torch_decode.greedy(tm, REAL_SOURCES, max_len=14, min_len=2)
        assert [r.hypotheses[0] for r in got] == want
    # torch_decode's beam is the classic one (K candidates, GNMT penalty, its own stopping
    # rule), not CTranslate2's (test_search_ct2.py checks that one); instead, PyTorch's
    # teacher-forced log-probabilities give every returned hypothesis its returned score.
    cfg = model.config
    for src, r in zip(REAL_SOURCES, got, strict=True):
        for hyp, score in zip(r.hypotheses, r.scores, strict=True):
            out = hyp + ([cfg.eos_id] if len(hyp) < 14 else [])
            with torch.no_grad():
                logits = tm(np.array([src]), np.array([len(src)]), np.array([[cfg.bos_id] + hyp]))
            x = torch.as_tensor(logits)[0, : len(out)].double()
            x[:2, cfg.eos_id] = -float("inf")  # min_decoding_length=2 masks EOS first
            lp = torch.log_softmax(x, dim=1)[torch.arange(len(out)), torch.tensor(out)]
            assert score == pytest.approx(float(lp.sum()) / len(out), abs=1e-4)


def _torch_cross_attention(tm, src, tgt_in, layer):
    """Per-head cross-attention (H, T, S) of decoder layer `layer` of the torch reference model,
    computed from the inputs its cross-attention module receives in a teacher-forced forward."""
    import torch

    seen = {}
    mod = tm.decoder.layers[layer].cross_attn
    handle = mod.register_forward_hook(lambda m, args, out: seen.update(args=args))
    with torch.no_grad():
        tm(np.array([src]), np.array([len(src)]), np.array([tgt_in]))
        handle.remove()
        x, memory = seen["args"][0], seen["args"][1]
        B, T, C = x.shape
        H = tm.cfg.num_heads
        q = mod.q(x).view(B, T, H, C // H).transpose(1, 2)
        k, _ = mod.project(memory)
        p = torch.softmax(q @ k.transpose(-1, -2) / (C // H) ** 0.5, dim=-1)
    return p[0].numpy()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_attention_of_a_chosen_layer_and_heads_matches_torch(beam_size):
    pytest.importorskip("torch")
    from torch_reference import build_torch_model

    model = tiny_transformer(seed=5)
    tm = build_torch_model(model.config, model.state_dict()).eval()
    bos, H = model.config.bos_id, model.config.num_heads
    kw = dict(beam_size=beam_size, max_decoding_length=10, return_attention=True)
    for layer in (0, 1, -2):
        heads = translate(model, REAL_SOURCES, attention_layer=layer, attention_heads=True, **kw)
        mean = translate(model, REAL_SOURCES, attention_layer=layer, **kw)
        for src, r, m in zip(REAL_SOURCES, heads, mean, strict=True):
            hyp, att = r.hypotheses[0], r.attention[0]
            assert att.shape == (H, len(hyp), len(src)) and att.dtype == np.float32
            np.testing.assert_allclose(m.attention[0], att.mean(axis=0), atol=1e-6)
            if hyp:
                ref = _torch_cross_attention(tm, src, [bos] + hyp[:-1], layer)
                np.testing.assert_allclose(att, ref, atol=2e-5)
    last = translate(model, REAL_SOURCES, **kw)
    explicit = translate(model, REAL_SOURCES, attention_layer=1, **kw)
    for a, b in zip(last, explicit, strict=True):
        np.testing.assert_array_equal(a.attention[0], b.attention[0])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(attention_layer=2), ValueError, "attention_layer"),
        (dict(attention_layer=-3), ValueError, "attention_layer"),
        (dict(attention_layer=1.0), TypeError, "attention_layer"),
        (dict(attention_heads="yes"), TypeError, "attention_heads"),
    ],
)
def test_attention_options_are_checked(kwargs, exc, match):
    model = tiny_transformer(seed=5)
    with pytest.raises(exc, match=match):
        translate(model, REAL_SOURCES, return_attention=True, **kwargs)


def test_default_batches_are_bounded(monkeypatch):
    """Without max_batch_size, sentences are decoded DEFAULT_MAX_BATCH_SIZE at a time (every row
    preallocates caches for the whole decoding length), with the same results as one batch."""
    model = tiny_transformer(seed=3)
    rng = np.random.default_rng(4)
    sources = [rng.integers(3, 23, size=int(n)).tolist() for n in rng.integers(1, 9, size=150)]
    sizes = []
    real = type(model).init_decoder_state

    def recording(self, memory, lengths, max_steps, **kw):
        sizes.append(memory.shape[0])
        return real(self, memory, lengths, max_steps, **kw)

    monkeypatch.setattr(type(model), "init_decoder_state", recording)
    default = translate(model, sources, beam_size=2, max_decoding_length=6)
    assert sizes == [64, 64, 22]
    whole = translate(model, sources, beam_size=2, max_decoding_length=6, max_batch_size=150)
    assert sizes[3:] == [150]
    assert [r.hypotheses for r in default] == [r.hypotheses for r in whole]
