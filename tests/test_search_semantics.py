"""The search rules (CTranslate2's, see pytransformer.decode.search) against brute force.

The model is test_decoding's table model (next-token logits from tables indexed by the previous
token, a hash of the whole history and the source), so every expectation below is computed by
re-running it from scratch on each sequence: a plain per-sentence re-implementation of the beam
rules with the logit processors written as loops over the history, exhaustive enumeration, and
the sampling distributions (chi-square against the renormalised top-k / top-p softmax).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoding import ToyConfig, ToySeq2Seq

from pytransformer.decode import length_penalty, translate

BOS, EOS = 1, 2
SOURCES = [[3, 4, 5], [8], [5, 6, 7, 8, 3, 4], [4, 4], [7, 3, 5, 6]]


def model_of(v=11, seed=0, eos_bias=0.8, max_len=40):
    return ToySeq2Seq(ToyConfig(tgt_vocab_size=v, max_len=max_len), seed=seed, eos_bias=eos_bias)


# ----------------------------------------------------------------------------------------------
# Brute force: logits from scratch, processors as loops, the beam rules per sentence


def ref_logits(model, src, seq):
    mem = model.encode(np.array([src]), np.array([len(src)]))
    state = model.init_decoder_state(mem, np.array([len(src)]), len(seq))
    for tok in seq:
        logits, _ = ToySeq2Seq.decode_step(model, state, np.array([tok]))
    return logits[0].astype(np.float64)


def processed_logp(model, src, out, opt):
    """log-softmax of the next-token logits after output tokens `out`, with every rule."""
    x = ref_logits(model, src, [BOS] + out)
    p = opt.get("repetition_penalty", 1.0)
    for tok in set(out):
        x[tok] = x[tok] * p if x[tok] < 0 else x[tok] / p
    n = opt.get("no_repeat_ngram_size", 0)
    if n and len(out) >= n:
        for i in range(len(out) - n + 1):
            if out[i : i + n - 1] == out[len(out) - n + 1 :]:
                x[out[i + n - 1]] = -np.inf
    for s in opt.get("suppress_sequences", []):
        if len(s) == 1 or (len(out) >= len(s) - 1 and out[len(out) - len(s) + 1 :] == s[:-1]):
            x[s[-1]] = -np.inf
    ends = opt.get("ends", [EOS])
    if len(out) < opt.get("min_decoding_length", 0):
        x[ends] = -np.inf
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def finalize(hyps, nh, alpha, ends=(EOS,), kind="power"):
    """(cum, tokens) -> best-first (score, returned tokens: without trailing end tokens)."""

    def strip(t):
        while t and t[-1] in ends:
            t = t[:-1]
        return t

    scored = [(cum / length_penalty(len(t), alpha, kind), strip(t)) for cum, t in hyps]
    scored.sort(key=lambda h: -h[0])
    return scored[:nh]


def ref_beam(model, src, K, nh, alpha, opt, max_len, prefix=(), patience=1.0, rule=None):
    """CTranslate2's beam search, one sentence, from scratch; rule: whether only the best
    candidate may end at the first free step (default: when there is a prefix; CTranslate2
    applies it to every sentence of a batch where one has a prefix)."""
    ends = opt.get("ends", [EOS])
    prefix = list(prefix)
    beams = [(0.0, [])]
    done, top_ended = [], False
    cap = int(np.floor(K * patience + 0.5))
    for step in range(max_len):
        last = step + 1 == max_len
        if step < len(prefix):
            beams = [(0.0, prefix[: step + 1])]
            continue
        cands = []
        for cum, toks in beams:
            lp = processed_logp(model, src, toks, opt)
            cands += [(cum + lp[t], toks, t) for t in range(lp.size) if lp[t] > -np.inf]
        cands.sort(key=lambda c: -c[0])
        cands = cands[: 2 * K]
        if (bool(prefix) if rule is None else rule) and step == len(prefix):
            cands = [c if i == 0 or c[2] not in ends else (-1e10, c[1], 0)
                     for i, c in enumerate(cands)]
        # Replacements: the non-end candidates past the first K, then (fewer than 2K possible
        # extensions) dead ones; with none at all the ended candidate itself goes on.
        spare = [c for c in cands[K:] if c[2] not in ends] + [None] * (2 * K - len(cands))
        beams = []
        for i, (val, toks, t) in enumerate(cands[:K]):
            if t in ends or last:
                done.append((val, toks + [t]))
                top_ended |= i == 0
                if spare:
                    c = spare.pop(0)
                    if c is None:
                        continue
                    val, toks, t = c
            beams.append((val, toks + [t]))
        if last or not beams:
            break
        if alpha == 0 and top_ended and len(done) >= nh:
            break
        if alpha != 0 and len(done) >= cap:
            break
    return finalize(done, nh, alpha, ends)


def ref_greedy(model, src, alpha, opt, max_len, prefix=()):
    out = list(prefix)
    cum = 0.0
    ends = opt.get("ends", [EOS])
    while len(out) < max_len:
        lp = processed_logp(model, src, out, opt)
        t = int(lp.argmax())
        cum += lp[t]
        out.append(t)
        if t in ends:
            break
    return finalize([(cum, out)], 1, alpha, ends)


def check(res, refs):
    for r, ref in zip(res, refs, strict=True):
        assert r.hypotheses == [h for _, h in ref]
        np.testing.assert_allclose(r.scores, [s for s, _ in ref], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Beam search


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0, 2.0])
@pytest.mark.parametrize("K,nh", [(2, 1), (3, 3), (4, 2)])
def test_beam_equals_brute_force(K, nh, alpha):
    model = model_of(seed=3, eos_bias=2.0)
    kw = dict(beam_size=K, num_hypotheses=nh, length_penalty=alpha, max_decoding_length=8,
              return_scores=True)
    refs = [ref_beam(model, s, K, nh, alpha, {}, 8) for s in SOURCES]
    check(translate(model, SOURCES, **kw), refs)
    if nh == 3:
        assert len({len(h) for r in refs for _, h in r}) > 3  # EOS at many steps


@settings(max_examples=30, deadline=None)
@given(v=st.integers(4, 9), K=st.integers(1, 4), seed=st.integers(0, 10_000),
       alpha=st.sampled_from([0.0, 0.5, 1.0]), max_len=st.integers(1, 7),
       min_len=st.integers(0, 3), patience=st.sampled_from([1.0, 1.5, 2.0]))
def test_beam_equals_brute_force_property(v, K, seed, alpha, max_len, min_len, patience):
    model = model_of(v=v, seed=seed, eos_bias=seed % 4 - 1.0)
    min_len = min(min_len, max_len)
    nh = 1 + seed % int(np.floor(K * patience + 0.5))
    opt = {"min_decoding_length": min_len}
    res = translate(model, SOURCES[:3], beam_size=K, num_hypotheses=nh, length_penalty=alpha,
                    max_decoding_length=max_len, min_decoding_length=min_len, patience=patience,
                    return_scores=True)
    if K == 1:  # greedy search, which repeats its one hypothesis (as CTranslate2's)
        refs = [ref_greedy(model, s, alpha, opt, max_len) * nh for s in SOURCES[:3]]
    else:
        refs = [ref_beam(model, s, K, nh, alpha, opt, max_len, patience=patience)
                for s in SOURCES[:3]]
    check(res, refs)


def test_patience_waits_for_more_hypotheses():
    model = model_of(seed=5, eos_bias=1.0)
    kw = dict(beam_size=2, length_penalty=1.0, max_decoding_length=12, return_scores=True)
    b = translate(model, SOURCES, patience=3.0, num_hypotheses=6, **kw)
    check(b, [ref_beam(model, s, 2, 6, 1.0, {}, 12, patience=3.0) for s in SOURCES])
    assert max(len(r.hypotheses) for r in b) > 2  # more finished hypotheses than beams


def test_gnmt_kind():
    model = model_of(seed=6)
    res = translate(model, SOURCES, beam_size=3, num_hypotheses=2, length_penalty=0.6,
                    length_penalty_kind="gnmt", max_decoding_length=8, return_scores=True)
    for src, r in zip(SOURCES, res, strict=True):
        for hyp, score in zip(r.hypotheses, r.scores, strict=True):
            out = hyp + ([EOS] if len(hyp) < 8 else [])
            cum = sum(processed_logp(model, src, out[:i], {})[t] for i, t in enumerate(out))
            assert score == pytest.approx(cum / ((5 + len(out)) / 6) ** 0.6, abs=1e-5)


def test_coverage_penalty():
    model = model_of(seed=7)
    kw = dict(beam_size=1, max_decoding_length=8, return_scores=True, return_attention=True)
    plain = translate(model, SOURCES, length_penalty=0.0, return_end_token=True, **kw)
    cov = translate(model, SOURCES, length_penalty=0.0, coverage_penalty=0.4, **kw)
    for p, c in zip(plain, cov, strict=True):
        assert p.hypotheses[0][: len(c.hypotheses[0])] == c.hypotheses[0]  # greedy: same tokens
        mass = p.attention[0].sum(axis=0)  # every output token's step, the EOS's too
        want = p.scores[0] + 0.4 * np.log(np.minimum(mass[mass > 0], 1.0)).sum()
        assert c.scores[0] == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Logit processors, end tokens, prefixes


PROCESSOR_CASES = [
    dict(repetition_penalty=2.5),
    dict(repetition_penalty=0.5),
    dict(no_repeat_ngram_size=1),
    dict(no_repeat_ngram_size=2),
    dict(suppress_sequences=[[4], [5, 6], [3, 7, 8]]),
    dict(end_token=[EOS, 7]),
    dict(end_token=[EOS, 3, 4, 5, 6, 7, 8, 9]),  # beams run out of non-end candidates
    dict(min_decoding_length=4, end_token=[EOS, 3]),
]


def _opt(kw):
    opt = {k: v for k, v in kw.items() if k != "end_token"}
    if "end_token" in kw:
        opt["ends"] = kw["end_token"]
    return opt


@pytest.mark.parametrize("kw", PROCESSOR_CASES, ids=lambda kw: "-".join(map(str, kw)))
@pytest.mark.parametrize("K", [1, 3])
def test_processors_equal_brute_force(K, kw):
    model = model_of(seed=8, eos_bias=0.3)
    res = translate(model, SOURCES, beam_size=K, num_hypotheses=min(K, 2), length_penalty=1.0,
                    max_decoding_length=9, return_scores=True, **kw)
    opt = _opt(kw)
    if K == 1:
        refs = [ref_greedy(model, s, 1.0, opt, 9) for s in SOURCES]
    else:
        refs = [ref_beam(model, s, K, 2, 1.0, opt, 9) for s in SOURCES]
    check(res, refs)


@pytest.mark.parametrize("K", [1, 3])
def test_processors_change_something(K):
    """The processor cases above are not vacuous: each changes some hypothesis."""
    model = model_of(seed=8, eos_bias=0.3)
    base = translate(model, SOURCES, beam_size=K, max_decoding_length=9)
    for kw in PROCESSOR_CASES:
        assert translate(model, SOURCES, beam_size=K, max_decoding_length=9, **kw) != base, kw


@pytest.mark.parametrize("K", [1, 3])
def test_target_prefix_equals_brute_force(K):
    model = model_of(seed=9, eos_bias=1.0)
    prefixes = [[5], [6, 7], [], [3, 3, 3], [EOS, 4]]
    res = translate(model, SOURCES, target_prefix=prefixes, beam_size=K, num_hypotheses=min(K, 2),
                    length_penalty=0.6, max_decoding_length=8, return_scores=True,
                    repetition_penalty=1.5)
    opt = {"repetition_penalty": 1.5}
    if K == 1:
        refs = [ref_greedy(model, s, 0.6, opt, 8, p) for s, p in zip(SOURCES, prefixes,
                                                                      strict=True)]
    else:
        refs = [ref_beam(model, s, K, 2, 0.6, opt, 8, p, rule=True)
                for s, p in zip(SOURCES, prefixes, strict=True)]
    check(res, refs)
    for r, p in zip(res, prefixes, strict=True):
        assert all(h[: len(p)] == p for h in r.hypotheses)
    # a prefix at the maximum length is the whole answer
    full = translate(model, [SOURCES[0]], target_prefix=[[4, 5, 6]], max_decoding_length=3,
                     return_scores=True)[0]
    assert full.hypotheses == [[4, 5, 6]] and full.scores == [0.0]


def test_return_end_token():
    model = model_of(seed=10, eos_bias=1.5)
    a = translate(model, SOURCES, beam_size=2, max_decoding_length=9, return_scores=True)
    b = translate(model, SOURCES, beam_size=2, max_decoding_length=9, return_scores=True,
                  return_end_token=True)
    for x, y in zip(a, b, strict=True):
        h = x.hypotheses[0]
        assert y.hypotheses[0] == (h + [EOS] if len(h) < 9 else h)
        assert x.scores == y.scores
    assert any(len(x.hypotheses[0]) < 9 for x in a)


def test_alternatives_equal_brute_force():
    model = model_of(seed=11, eos_bias=0.5)
    prefixes = [[5], [], [6, 7], [4], []]
    res = translate(model, SOURCES, target_prefix=prefixes, return_alternatives=True,
                    num_hypotheses=3, beam_size=1, max_decoding_length=7, length_penalty=1.0,
                    return_scores=True, min_alternative_expansion_prob=0.02)
    for src, p, r in zip(SOURCES, prefixes, res, strict=True):
        lp = processed_logp(model, src, p, {"min_decoding_length": len(p) + 1})
        order = np.argsort(-lp, kind="stable")[:3]
        order = [t for t in order if np.exp(lp[t]) >= 0.02]
        assert [h[len(p)] for h in r.hypotheses] == order
        for h, score, t in zip(r.hypotheses, r.scores, order, strict=True):
            # the continuation is greedy after p + [t], scored on its own
            out, cum = list(p) + [int(t)], 0.0
            while len(out) < 7:
                x = processed_logp(model, src, out, {})
                nxt = int(x.argmax())
                cum += x[nxt]
                out.append(nxt)
                if nxt == EOS:
                    break
            n = len(out) - len(p) - 1
            want = lp[t] + cum / n
            assert h == [tok for tok in out if tok != EOS]
            assert score == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Sampling


def test_topk_1_is_greedy():
    model = model_of(seed=12)
    greedy = translate(model, SOURCES, beam_size=1, max_decoding_length=9, return_scores=True)
    for kw in (dict(sampling_topk=1, sampling_temperature=3.0),
               dict(sampling_topk=0, sampling_temperature=0.0)):
        assert translate(model, SOURCES, beam_size=1, max_decoding_length=9, return_scores=True,
                         seed=4, **kw) == greedy


def _allowed(lp, topk, topp, temp):
    order = np.argsort(-lp, kind="stable")
    keep = order[:topk] if topk else order
    p = np.exp((lp[keep] - lp[keep].max()) / temp)
    p /= p.sum()
    before = np.cumsum(p) - p
    keep, p = keep[before < topp], p[before < topp]
    return keep, p / p.sum()


@pytest.mark.parametrize("topk,topp,temp", [(3, 1.0, 1.0), (0, 0.6, 1.3), (5, 0.8, 0.7)])
def test_sampled_tokens_stay_in_the_allowed_set(topk, topp, temp):
    model = model_of(seed=13, eos_bias=-1.0)
    res = translate(model, SOURCES * 4, beam_size=1, max_decoding_length=8, sampling_topk=topk,
                    sampling_topp=topp, sampling_temperature=temp, seed=5, min_decoding_length=2)
    for src, r in zip(SOURCES * 4, res, strict=True):
        out = r.hypotheses[0]
        for i, tok in enumerate(out):
            lp = processed_logp(model, src, out[:i], {"min_decoding_length": 2})
            assert tok in _allowed(lp, topk, topp, temp)[0]


# The 0.999 quantiles of the chi-square distribution, by degrees of freedom (scipy may be absent).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
            8: 26.124, 9: 27.877, 10: 29.588}


@pytest.mark.parametrize("topk,topp,temp", [(4, 1.0, 0.7), (0, 0.9, 1.0), (6, 0.85, 1.5)])
def test_sampling_distribution_chi_square(topk, topp, temp):
    """4000 first tokens of one source, each sentence drawing from its own generator: the counts
    fit the renormalised top-k / top-p distribution (chi-square at 0.1 %, fixed seed) and no
    token outside it appears."""
    model = model_of(seed=14)
    n, src = 4000, SOURCES[2]
    res = translate(model, [src] * n, beam_size=1, max_decoding_length=1, sampling_topk=topk,
                    sampling_topp=topp, sampling_temperature=temp, seed=21, max_batch_size=n,
                    min_decoding_length=1)
    keep, p = _allowed(processed_logp(model, src, [], {"min_decoding_length": 1}), topk, topp,
                       temp)
    counts = np.bincount([r.hypotheses[0][0] for r in res], minlength=model.config.tgt_vocab_size)
    assert counts[np.setdiff1d(np.arange(counts.size), keep)].sum() == 0
    assert keep.size >= 3  # a distribution worth testing
    stat = float(((counts[keep] - n * p) ** 2 / (n * p)).sum())
    assert stat < CHI2_999[keep.size - 1], (stat, keep.size)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_seed_reproducible_whatever_the_batching(beam_size):
    model = model_of(seed=15, eos_bias=0.2)
    kw = dict(beam_size=beam_size, max_decoding_length=10, sampling_topk=6, sampling_topp=0.9,
              sampling_temperature=1.2, return_scores=True,
              num_hypotheses=2 if beam_size > 1 else 3)
    a = translate(model, SOURCES, seed=7, **kw)
    assert a == translate(model, SOURCES, seed=7, max_batch_size=1, **kw)
    assert a == translate(model, SOURCES, seed=7, max_batch_size=8, batch_type="tokens", **kw)
    assert a != translate(model, SOURCES, seed=8, **kw)
    for src, r in zip(SOURCES, a, strict=True):  # every sample carries its true score
        assert r.scores == sorted(r.scores, reverse=True)
        for hyp, score in zip(r.hypotheses, r.scores, strict=True):
            out = hyp + ([EOS] if len(hyp) < 10 else [])
            cum = sum(processed_logp(model, src, out[:i], {})[t] for i, t in enumerate(out))
            assert score == pytest.approx(cum / len(out), abs=1e-5)


def test_tokens_batches():
    model = model_of(seed=16)
    srcs = SOURCES * 3
    sizes = []
    real = type(model).init_decoder_state

    def recording(self, memory, lengths, max_steps, **kw):
        sizes.append((memory.shape[0], int(lengths.max())))
        return real(self, memory, lengths, max_steps, **kw)

    model.init_decoder_state = recording.__get__(model)
    got = translate(model, srcs, max_batch_size=10, batch_type="tokens", beam_size=2)
    assert all(b * w <= 10 or b == 1 for b, w in sizes) and sum(b for b, _ in sizes) == len(srcs)
    sizes.clear()
    assert translate(model, srcs, batch_type="tokens", beam_size=2) == got
    assert sizes[0][0] == len(srcs)  # no max_batch_size: the default number of sentences
    model.init_decoder_state = real.__get__(model)
    assert got == translate(model, srcs, beam_size=2)


class SubsetModel(ToySeq2Seq):
    """Takes vocab_subset as a real model does: logits outside it are -inf."""

    def init_decoder_state(self, memory, src_lengths, max_steps, pack_weights=None,
                           vocab_subset=None):
        state = super().init_decoder_state(memory, src_lengths, max_steps)
        state.subset = vocab_subset
        return state

    def decode_step(self, state, tokens, **kw):
        logits, attn = super().decode_step(state, tokens, **kw)
        if state.subset is not None:
            out = np.full_like(logits, -np.inf)
            out[:, state.subset] = logits[:, state.subset]
            logits = out
        return logits, attn


def test_vocab_subset_fn():
    model = SubsetModel(ToyConfig(tgt_vocab_size=11, max_len=40), seed=17, eos_bias=0.5)
    seen = []

    def subset(srcs):
        seen.append([s.tolist() for s in srcs])
        return np.array([EOS, 4, 5, 6])

    for K in (1, 3):
        res = translate(model, SOURCES, beam_size=K, max_decoding_length=8, use_vmap=True,
                        vocab_subset_fn=subset)
        assert {t for r in res for t in r.hypotheses[0]} <= {4, 5, 6}
    assert sorted(map(sorted, seen[0])) == sorted(map(sorted, SOURCES))
    free = translate(model, SOURCES, max_decoding_length=8, vocab_subset_fn=subset)
    assert len(seen) == 2  # without use_vmap the function is not called
    assert {t for r in free for t in r.hypotheses[0]} - {4, 5, 6}


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("alternatives,max_len", [(False, 8), (True, 8), (True, 3)])
def test_attention_rows_follow_the_tokens(K, alternatives, max_len):
    """One row per returned token, the prefix's included (as CTranslate2): row i is the
    attention of the step fed the token before it, whatever the mode."""
    from test_decoding import ref_attention

    model = model_of(seed=18, eos_bias=0.5)
    prefixes = [[5, 6], [7], [4, 4], [6, 5], [3, 9]]
    res = translate(model, SOURCES, target_prefix=prefixes, beam_size=K,
                    num_hypotheses=2 if alternatives or K > 1 else 1, max_decoding_length=max_len,
                    return_alternatives=alternatives, return_attention=True)
    for src, p, r in zip(SOURCES, prefixes, res, strict=True):
        assert len(r.attention) == len(r.hypotheses)
        for hyp, att in zip(r.hypotheses, r.attention, strict=True):
            assert hyp[: len(p)] == p and len(hyp) <= max_len
            np.testing.assert_allclose(att, ref_attention(model, src, hyp), atol=1e-6)
