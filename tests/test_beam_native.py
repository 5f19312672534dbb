"""The native beam search bookkeeping (_C.beam_candidates, _C.beam_settle; csrc/decode/beam.h)
against plain numpy and Python re-statements of the rules, over random shapes, ties, -inf and
NaN values. The search itself is checked end to end against brute force and CTranslate2
(test_search_semantics.py, test_search_ct2.py); these tests pin the two pieces on inputs the
searches rarely produce (exact ties, NaN rows, many dead slots)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytransformer import _C


def ref_candidates(logits, cum, C):
    """Every candidate ranked by value (float64 of the float32 log-probability, plus cum), ties
    by slot * V + token, NaN last; the first C kept, the rest -inf / 0 / 0."""
    g, k = cum.shape
    V = logits.shape[1]
    x = logits.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        lse = np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)) + x.max(axis=1)
    lp = (logits - lse[:, None].astype(np.float32)).astype(np.float64)
    val = np.full((g, C), -np.inf)
    slot = np.zeros((g, C), np.int64)
    tok = np.zeros((g, C), np.int64)
    kk = min(C, V)
    for s in range(g):
        cands = []
        for j in range(k):
            row = lp[s * k + j]
            for v in range(V):
                cands.append((cum[s, j] + row[v], j * V + v))
        cands.sort(key=lambda c: (np.isnan(c[0]), -c[0] if not np.isnan(c[0]) else 0, c[1]))
        # Only each row's best kk are candidates: a row's (kk+1)-th can never be in the top C.
        per_row = {}
        kept = []
        for value, flat in cands:
            j = flat // V
            if per_row.get(j, 0) < kk:
                per_row[j] = per_row.get(j, 0) + 1
                kept.append((value, flat))
        for i, (value, flat) in enumerate(kept[:C]):
            val[s, i], slot[s, i], tok[s, i] = value, flat // V, flat % V
    return val, slot, tok


def matrices(draw, g, k, V):
    levels = draw(st.sampled_from([3, 1000]))  # few levels: exact ties
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.integers(0, levels, size=(g * k, V)).astype(np.float32) / 2
    if draw(st.booleans()):
        x[rng.random(x.shape) < 0.3] = -np.inf
    cum = rng.integers(-4, 1, size=(g, k)).astype(np.float64)
    if draw(st.booleans()):
        cum[rng.random(cum.shape) < 0.3] = -np.inf
    return x, cum


@st.composite
def candidate_cases(draw):
    g, k, V = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 13))
    x, cum = matrices(draw, g, k, V)
    return x, cum, draw(st.integers(1, 10))


@settings(max_examples=150, deadline=None)
@given(candidate_cases())
def test_candidates_equal_reference(case):
    x, cum, C = case
    got = _C.beam_candidates(x, cum, C)
    # The kernel's log-probabilities are its own float32 bits (test_loss pins them against
    # float64): compare ranks exactly and values to float32 precision.
    want = ref_candidates(x, cum, C)
    finite = np.isfinite(want[0])
    np.testing.assert_allclose(got[0][finite], want[0][finite], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.isfinite(got[0]), finite)
    live = want[0] > -np.inf
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(a[live], b[live])


def test_candidates_nan_rows_rank_last():
    x = np.zeros((2, 5), np.float32)
    x[0] = np.nan
    val, slot, tok = _C.beam_candidates(x, np.zeros((1, 2)), 4)
    assert np.isfinite(val[0]).all() and (slot[0] == 1).all()
    np.testing.assert_array_equal(tok[0], [0, 1, 2, 3])  # equal values: lower token first


def test_candidates_errors():
    x = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="logits"):
        _C.beam_candidates(x, np.zeros((1, 3)), 4)
    with pytest.raises(TypeError, match="cum"):
        _C.beam_candidates(x, np.zeros((1, 4), np.float32), 4)
    with pytest.raises(TypeError, match="logits"):
        _C.beam_candidates(x.astype(np.float64), np.zeros((1, 4)), 4)
    with pytest.raises(ValueError, match="C"):
        _C.beam_candidates(x, np.zeros((1, 4)), 0)


def ref_settle(c_val, c_slot, c_tok, pick, ci, k_old, k_new):
    """The rules of beam_settle as loops (see csrc/decode/beam.h)."""
    s_val, s_tok, parents = [], [], []
    for s in ci:
        cols = list(range(k_new)) if pick is None else list(pick[s, :k_new])
        v = [c_val[s, c] for c in cols]
        sl = [int(c_slot[s, c]) for c in cols]
        tk = [int(c_tok[s, c]) for c in cols]
        live = [x > -np.inf for x in v]
        src = live.index(True) if any(live) else 0
        sl = [sl[j] if live[j] else sl[src] for j in range(k_new)]
        tk = [tk[j] if live[j] else tk[src] for j in range(k_new)]
        order = list(range(k_new))
        if k_new == k_old:
            firsts = {}
            for j, p in enumerate(sl):
                firsts.setdefault(p, j)
            rest = [j for j in range(k_new) if firsts[sl[j]] != j]
            order = [firsts.get(p, -1) for p in range(k_new)]
            free = [p for p in range(k_new) if order[p] < 0]
            for p, j in zip(free, rest, strict=True):
                order[p] = j
        s_val.append([v[j] for j in order])
        s_tok.append([tk[j] for j in order])
        parents += [int(s) * k_old + sl[j] for j in order]
    parents = np.array(parents, np.int64)
    moved = parents.size != c_val.shape[0] * k_old or (parents != np.arange(parents.size)).any()
    return np.array(s_val).reshape(len(ci), k_new), np.array(s_tok), parents, bool(moved)


@st.composite
def settle_cases(draw):
    n, K = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    C = 2 * K
    k_old = draw(st.sampled_from([1, K]))
    k_new = draw(st.sampled_from([1, K]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    c_val = -rng.random((n, C)) * 5
    c_val[rng.random((n, C)) < draw(st.sampled_from([0.0, 0.3, 0.9]))] = -np.inf
    c_slot = rng.integers(0, k_old, size=(n, C))
    c_tok = rng.integers(0, 50, size=(n, C))
    pick = None if draw(st.booleans()) else rng.integers(0, C, size=(n, K))
    ci = np.sort(rng.choice(n, size=draw(st.integers(1, n)), replace=False))
    return c_val, c_slot, c_tok, pick, ci, k_old, k_new


@settings(max_examples=200, deadline=None)
@given(settle_cases())
def test_settle_equals_reference(case):
    got = _C.beam_settle(*case)
    want = ref_settle(*case)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1].reshape(got[1].shape))
    np.testing.assert_array_equal(got[2], want[2])
    assert got[3] == want[3]


def test_settle_identity_does_not_move():
    c_val = np.array([[-1.0, -2.0, -3.0, -4.0]])
    c_slot = np.array([[0, 1, 0, 1]])
    c_tok = np.arange(4)[None]
    _, _, parents, moved = _C.beam_settle(c_val, c_slot, c_tok, None, np.array([0]), 2, 2)
    np.testing.assert_array_equal(parents, [0, 1])
    assert not moved


def test_settle_errors():
    c_val, c_slot, c_tok = np.zeros((2, 4)), np.zeros((2, 4), np.int64), np.zeros((2, 4), np.int64)
    ci = np.array([0, 1])
    with pytest.raises(ValueError, match="c_slot"):
        _C.beam_settle(c_val, c_slot + 2, c_tok, None, ci, 2, 2)
    with pytest.raises(ValueError, match="ci"):
        _C.beam_settle(c_val, c_slot, c_tok, None, np.array([2]), 2, 2)
    with pytest.raises(ValueError, match="pick"):
        _C.beam_settle(c_val, c_slot, c_tok, np.full((2, 2), 4), ci, 2, 2)
    with pytest.raises(ValueError, match="k_new"):
        _C.beam_settle(c_val, c_slot, c_tok, None, ci, 2, 5)
    with pytest.raises(ValueError, match="c_tok"):
        _C.beam_settle(c_val, c_slot, c_tok[:1], None, ci, 2, 2)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_move_cache_rows_matches_fancy_indexing(data):
    """In place, rows [0, B2) positions [0, t) of every cache become the rows `indices` of
    the old caches (duplicates, rows dropped, chains and swaps of moved rows); everything else
    stays. Head-major views (the decoder's layout) and plain C-contiguous arrays."""
    rows = data.draw(st.integers(1, 9))
    cap, H, D = (data.draw(st.integers(1, n)) for n in (7, 3, 5))
    B2 = data.draw(st.integers(1, rows))
    indices = np.array(data.draw(st.lists(st.integers(0, rows - 1), min_size=B2, max_size=B2)))
    t = data.draw(st.integers(0, cap))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    head_major = data.draw(st.booleans())
    caches = []
    for _ in range(data.draw(st.integers(1, 3))):
        if head_major:
            c = np.empty((rows, 2, H, cap, D), np.float32).transpose(0, 3, 1, 2, 4)
            c[...] = rng.standard_normal(c.shape)
        else:
            c = rng.standard_normal((rows, cap, 2, H, D)).astype(np.float32)
        caches.append(c)
    expected = [c.copy() for c in caches]
    for e, c in zip(expected, caches, strict=True):
        e[:B2, :t] = c[indices, :t]
    _C.move_cache_rows(caches, indices, t)
    for e, c in zip(expected, caches, strict=True):
        np.testing.assert_array_equal(c, e)


def test_move_cache_rows_checks_its_arguments():
    c = np.zeros((3, 4, 2, 2, 2), np.float32)
    with pytest.raises(ValueError, match="indices"):
        _C.move_cache_rows([c], np.array([0, 1, 2, 0]), 2)
    with pytest.raises(ValueError, match="outside"):
        _C.move_cache_rows([c], np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="t:"):
        _C.move_cache_rows([c], np.array([0, 1]), 5)
    with pytest.raises(ValueError, match="different shapes"):
        _C.move_cache_rows([c, np.zeros((3, 5, 2, 2, 2), np.float32)], np.array([1]), 1)
    with pytest.raises(ValueError, match="at least one"):
        _C.move_cache_rows([], np.array([0]), 1)
    with pytest.raises(TypeError):
        _C.move_cache_rows([c.astype(np.float64)], np.array([0]), 1)
    with pytest.raises(ValueError):
        _C.move_cache_rows([c[:, :, :, :, ::2]], np.array([0]), 1)
    ro = c.copy()
    ro.flags.writeable = False
    with pytest.raises((ValueError, TypeError)):
        _C.move_cache_rows([ro], np.array([0]), 1)
