"""Embedding, activations' backward, dropout, Adam and gradient-norm clipping against float64
references, finite differences and torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytransformer import _C, ops

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
ISAS = ["generic"] + (["avx2"] if _C.cpu_has_avx2_fma() else [])


def f32(rng, shape, scale=1.0):
    return np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32)


# ---------------------------------------------------------------- embedding


@fixture_ok
@given(
    ids_shape=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    V=st.integers(1, 50),
    C=st.integers(1, 150),
    scale=st.sampled_from([1.0, 0.5, 22.627417]),
    dtype=st.sampled_from([np.int32, np.int64]),
)
def test_embedding_forward_backward(isa, ids_shape, V, C, scale, dtype):
    rng = np.random.default_rng(V * 1000 + C)
    w = f32(rng, (V, C))
    ids = rng.integers(0, V, ids_shape).astype(dtype)
    y = ops.embedding(w, ids, scale=scale)
    assert y.shape == (*ids_shape, C) and y.dtype == np.float32
    np.testing.assert_array_equal(y, w[ids] * np.float32(scale))
    dout = f32(rng, y.shape)
    dw0 = f32(rng, (V, C))
    dw = dw0.copy()
    assert ops.embedding_backward(dout, ids, dw, scale=scale) is None
    want = ref.embedding_backward(dout, ids, dw0, scale)
    magnitude = ref.embedding_backward(np.abs(dout), ids, np.abs(dw0), abs(scale))  # sum |terms|
    # float32 sums of k terms in sequence: error below (k + 2) u * sum|terms| (repeated ids
    # can cancel to a small result, so a relative tolerance on the result is not enough).
    k = np.bincount(ids.reshape(-1), minlength=V)[:, None]
    assert np.all(np.abs(dw - want) <= (k + 2) * 2.0**-24 * magnitude + 1e-30)


def test_embedding_backward_is_the_adjoint(rng):
    # <embedding(w), dout> is linear in w with gradient embedding_backward(dout): a directional
    # finite difference checks the scatter against the gather.
    w, ids = f32(rng, (11, 9)), rng.integers(0, 11, (4, 6))
    dout, direction = f32(rng, (4, 6, 9)), f32(rng, (11, 9))
    dw = np.zeros_like(w)
    ops.embedding_backward(dout, ids, dw, scale=1.5)

    def f(t):
        return float(
            (ops.embedding(w + t * direction, ids, scale=1.5).astype(np.float64) * dout).sum()
        )

    assert (f(1e-2) - f(-1e-2)) / 2e-2 == pytest.approx(float((dw * direction).sum()), rel=1e-3)


def test_embedding_backward_thread_invariance(threads, isa, rng):
    V, C = 40, 203
    ids = rng.integers(0, V, 3000)  # many repeats per row
    dout = f32(rng, (3000, C))
    results = []
    for n in (1, 2, 3):
        threads(n)
        dw = np.zeros((V, C), np.float32)
        ops.embedding_backward(dout, ids, dw, scale=0.7)
        results.append(dw)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_embedding_bad_inputs(rng):
    w = f32(rng, (5, 4))
    with pytest.raises(IndexError, match="id 5 at flat position 2"):
        ops.embedding(w, np.array([[0, 1], [5, 7]]))
    with pytest.raises(IndexError, match="id -1 at flat position 0"):
        ops.embedding(w, np.array([-1, 9]))
    with pytest.raises(TypeError, match="ids:"):
        ops.embedding(w, np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="weight:"):
        ops.embedding(w.astype(np.float64), np.array([0]))
    with pytest.raises(ValueError, match="weight:"):
        ops.embedding(w[None], np.array([0]))
    dw = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="dout:"):
        ops.embedding_backward(np.zeros((2, 3), np.float32), np.array([0, 1]), dw)
    with pytest.raises(IndexError, match="id 6 at flat position 1"):
        ops.embedding_backward(np.zeros((2, 4), np.float32), np.array([0, 6]), dw)
    with pytest.raises(ValueError, match="dweight:"):
        ops.embedding_backward(
            np.zeros((2, 4), np.float32), np.array([0, 1]), np.zeros((8, 5), np.float32)[:, :4]
        )
    ro = dw.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="dweight:"):
        ops.embedding_backward(np.zeros((2, 4), np.float32), np.array([0, 1]), ro)
    np.testing.assert_array_equal(dw, 0)  # nothing written on failure


# ---------------------------------------------------------------- Adam


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("n", [1, 7, 8, 33, 40000])
def test_adam_matches_float64(isa, rng, decoupled, n):
    p, m, v = f32(rng, n), f32(rng, n, 0.1), np.abs(f32(rng, n, 0.01))
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.05)
    for step in (1, 2, 7):
        g = f32(rng, n)
        want = ref.adam_step(
            p,
            g,
            m,
            v,
            hp["lr"],
            hp["beta1"],
            hp["beta2"],
            hp["eps"],
            hp["weight_decay"],
            step,
            decoupled,
        )
        ops.adam_step(p, g, m, v, step=step, decoupled=decoupled, **hp)
        for got, w in zip((p, m, v), want, strict=True):
            np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-7)
        p, m, v = (w.astype(np.float32) for w in want)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_matches_torch(rng, decoupled):
    shape = (13, 29)
    p0 = f32(rng, shape)
    grads = [f32(rng, shape) for _ in range(4)]
    tp = torch.tensor(p0, requires_grad=True)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([tp], lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    p, m, v = p0.copy(), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for step, g in enumerate(grads, 1):
        tp.grad = torch.tensor(g)
        opt.step()
        ops.adam_step(
            p, g, m, v, lr=3e-3, eps=1e-9, weight_decay=0.01, step=step, decoupled=decoupled
        )
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    state = opt.state[tp]
    np.testing.assert_allclose(m, state["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, state["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)


def test_adam_thread_invariance(threads, rng):
    n = 100003
    start = [f32(rng, n), f32(rng, n), f32(rng, n, 0.1), np.abs(f32(rng, n, 0.01))]
    results = []
    for t in (1, 2):
        threads(t)
        p, g, m, v = (a.copy() for a in start)
        ops.adam_step(p, g, m, v, lr=1e-3, step=3, weight_decay=0.1, decoupled=True)
        results.append((p, m, v))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_adam_bad_inputs(rng):
    p, g, m, v = (np.zeros(6, np.float32) for _ in range(4))
    kw = dict(lr=1e-3, step=1)
    with pytest.raises(ValueError, match="step:"):
        ops.adam_step(p, g, m, v, lr=1e-3, step=0)
    with pytest.raises(ValueError, match="grad:"):
        ops.adam_step(p, g[:5], m, v, **kw)
    with pytest.raises(ValueError, match="v:"):
        ops.adam_step(p, g, m, np.zeros(7, np.float32), **kw)
    with pytest.raises(TypeError, match="m:"):
        ops.adam_step(p, g, m.astype(np.float64), v, **kw)
    with pytest.raises(ValueError, match="param:"):
        ops.adam_step(np.zeros(12, np.float32)[::2], g, m, v, **kw)
    with pytest.raises(ValueError, match="beta2:"):
        ops.adam_step(p, g, m, v, lr=1e-3, step=1, beta2=1.0)
    with pytest.raises(ValueError, match="lr:"):
        ops.adam_step(p, g, m, v, lr=float("nan"), step=1)
    with pytest.raises(ValueError, match="m, v:"):
        ops.adam_step(p, g, p, v, **kw)


# ---------------------------------------------------------------- gradient norm


def test_global_norm_matches_float64(threads, rng):
    arrays = [f32(rng, s) for s in [(3,), (1000, 37), (0,), (70000,), (5, 5, 5)]]
    arrays.append(f32(rng, (64, 80))[:, ::3])  # non-contiguous is fine for reading
    want = ref.global_norm(arrays)
    norms = []
    for t in (1, 2, 3):
        threads(t)
        norms.append(ops.global_norm(arrays))
    assert norms[0] == pytest.approx(want, rel=1e-12)
    assert norms[0] == norms[1] == norms[2]
    assert ops.global_norm([]) == 0.0


def test_clip_grad_norm(rng):
    arrays = [f32(rng, (30, 7)), f32(rng, (100,))]
    norm = ops.global_norm(arrays)
    before = [a.copy() for a in arrays]
    assert ops.clip_grad_norm(arrays, norm * 2) == norm  # below the limit: untouched
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert ops.clip_grad_norm(arrays, 1.0) == norm
    for a, want in zip(arrays, ref.clip_grad_norm(before, 1.0)[1], strict=True):
        np.testing.assert_allclose(a, want, rtol=1e-6)
    assert ops.global_norm(arrays) == pytest.approx(1.0, rel=1e-5)
    if torch is not None:
        ts = [torch.tensor(b) for b in before]
        for t in ts:
            t.grad = t.clone()
        total = torch.nn.utils.clip_grad_norm_(ts, 1.0)
        assert float(total) == pytest.approx(norm, rel=1e-6)
        for a, t in zip(arrays, ts, strict=True):
            np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-6, atol=1e-8)


def test_norm_bad_inputs(rng):
    a = f32(rng, 5)
    with pytest.raises(TypeError, match=r"arrays\[1\]:"):
        ops.global_norm([a, a.astype(np.float64)])
    with pytest.raises(TypeError, match="arrays:"):
        ops.global_norm(a)
    with pytest.raises(TypeError, match="arrays:"):
        _C.global_norm(a)
    with pytest.raises(ValueError, match=r"arrays\[1\]:"):
        ops.clip_grad_norm([a, f32(rng, 10)[::2]], 1.0)
    with pytest.raises(ValueError, match=r"arrays\[1\]:"):
        ops.clip_grad_norm([a, a], 1.0)
    with pytest.raises(ValueError, match="max_norm:"):
        ops.clip_grad_norm([a], 0.0)


# ---------------------------------------------------------------- activations


@fixture_ok
@given(shape=st.lists(st.integers(0, 40), max_size=3), scale=st.sampled_from([1.0, 4.0]))
def test_gelu_forward_backward(isa, shape, scale):
    rng = np.random.default_rng(sum(shape) + len(shape))
    x, dout = f32(rng, shape, scale), f32(rng, shape)
    y = ops.gelu(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, ref.gelu(x), rtol=1e-5, atol=1e-6)
    dx = ops.gelu_backward(dout, x)
    np.testing.assert_allclose(dx, dout * ref.gelu_grad(x), rtol=1e-5, atol=1e-6)


def test_gelu_extremes_and_finite_differences(isa):
    x = np.array([-1e4, -40, -9, -3, -1e-3, 0, 1e-3, 0.5, 3, 9, 40, 1e4], np.float32)
    np.testing.assert_allclose(ops.gelu(x), ref.gelu(x), rtol=1e-6, atol=1e-6)
    h = 1e-5
    num = (ref.gelu(x.astype(np.float64) + h) - ref.gelu(x.astype(np.float64) - h)) / (2 * h)
    np.testing.assert_allclose(ops.gelu_backward(np.ones_like(x), x), num, rtol=1e-4, atol=1e-6)


def test_gelu_out_and_thread_invariance(threads, rng):
    x = f32(rng, (300, 257), 3.0)
    results = []
    for t in (1, 2):
        threads(t)
        results.append((ops.gelu(x), ops.gelu_backward(x, x)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    out = np.empty_like(x)
    assert ops.gelu(x, out=out) is out
    np.testing.assert_array_equal(out, results[0][0])
    np.testing.assert_allclose(out, ref.gelu(x), rtol=1e-5, atol=1e-6)
    if torch is not None:
        xt = torch.tensor(x, requires_grad=True)
        yt = torch.nn.functional.gelu(xt)
        yt.backward(torch.tensor(x))
        # torch's float32 erf is itself ~1e-6 off in the negative tail (x near -3).
        np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(results[0][1], xt.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_relu_backward(isa, rng):
    pre = f32(rng, (7, 33))
    pre[0, :5] = 0.0
    out = np.maximum(pre, 0)
    dout = f32(rng, pre.shape)
    np.testing.assert_array_equal(ops.relu_backward(dout, out), ref.relu_backward(dout, out))


def test_activation_bad_inputs(rng):
    x = f32(rng, (3, 4))
    with pytest.raises(TypeError, match="x:"):
        ops.gelu(x.astype(np.float64))
    with pytest.raises(ValueError, match="out:"):
        ops.gelu(x, out=np.empty((4, 3), np.float32))
    with pytest.raises(ValueError, match="x:"):
        ops.gelu_backward(x, x[:2])
    with pytest.raises(ValueError, match="out:"):
        ops.relu_backward(x, x.T)
    with pytest.raises(TypeError, match="dout:"):
        ops.relu_backward(x.astype(np.int32), x)


# ---------------------------------------------------------------- dropout


def test_dropout_mask_properties(isa, rng):
    n, p = 200_000, 0.3
    x = f32(rng, n)
    y = ops.dropout(x, p, seed=42)
    kept = y != 0
    rate = kept.mean()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    scale = np.float32(1) / (np.float32(1) - np.float32(p))
    np.testing.assert_array_equal(y[kept], x[kept] * scale)
    # neighbours and other seeds are uncorrelated
    k = kept.astype(np.float64)
    assert abs(np.corrcoef(k[:-1], k[1:])[0, 1]) < 0.02
    other = ops.dropout(x, p, seed=43) != 0
    assert abs(np.corrcoef(k, other)[0, 1]) < 0.02
    # backward applies the same mask
    dy = f32(rng, n)
    np.testing.assert_array_equal(
        ops.dropout_backward(dy, p, seed=42), np.where(kept, dy * scale, 0)
    )


def test_dropout_reproducible_across_threads_and_isas(threads, rng):
    x = f32(rng, (61, 1001))
    before = _C.selected_isa()
    results = []
    try:
        for isa in ISAS:
            _C._force_isa(isa)
            for t in (1, 2):
                threads(t)
                results.append(ops.dropout(x, 0.1, seed=7, offset=123))
    finally:
        _C._force_isa(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_dropout_offset_is_a_counter(rng):
    x = np.ones(1000, np.float32)
    whole = ops.dropout(x, 0.5, seed=2**63 + 5)
    np.testing.assert_array_equal(
        ops.dropout(x[:600], 0.5, seed=2**63 + 5, offset=400), whole[400:]
    )
    # C-order flat index, whatever the strides
    grid = f32(rng, (8, 30))[:, ::2]
    np.testing.assert_array_equal(
        ops.dropout(grid, 0.5, seed=1), ops.dropout(np.ascontiguousarray(grid), 0.5, seed=1)
    )
    assert (ops.dropout(x, 0.5, seed=1) != whole).any()


def test_dropout_edge_probabilities(rng):
    x = f32(rng, (5, 9))
    np.testing.assert_array_equal(ops.dropout(x, 0.0, seed=3), x)
    np.testing.assert_array_equal(ops.dropout(x, 1.0, seed=3), 0)
    np.testing.assert_array_equal(ops.dropout_backward(x, 0.0, seed=3), x)
    assert ops.dropout(np.zeros((0, 4), np.float32), 0.5, seed=1).shape == (0, 4)


def test_dropout_bad_inputs(rng):
    x = f32(rng, 10)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p:"):
            ops.dropout(x, p, seed=1)
    with pytest.raises(ValueError, match="seed:"):
        ops.dropout(x, 0.1, seed=-1)
    with pytest.raises(ValueError, match="offset:"):
        ops.dropout(x, 0.1, seed=1, offset=2**64)
    with pytest.raises(TypeError, match="seed:"):
        ops.dropout(x, 0.1, seed=1.5)
    with pytest.raises(TypeError, match="dy:"):
        ops.dropout_backward(x.astype(np.float64), 0.1, seed=1)


# ---------------------------------------------------------------- naive siblings


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.97, 1.0])
def test_dropout_equals_naive_sibling(isa, rng, p):
    x = f32(rng, (3, 1001))
    for seed, offset in ((0, 0), (12345, 77), (2**64 - 1, 2**32 - 500)):  # offset crosses 2**32
        want = _C._naive.dropout(x, p, seed, offset)
        np.testing.assert_array_equal(ops.dropout(x, p, seed=seed, offset=offset), want)


def test_embedding_gelu_adam_equal_naive_siblings(isa, rng):
    w, ids = f32(rng, (30, 77)), rng.integers(0, 30, 500)
    np.testing.assert_array_equal(
        ops.embedding(w, ids, scale=3.0), _C._naive.embedding(w, ids, 3.0)
    )
    dout = f32(rng, (500, 77))
    got, want = np.zeros_like(w), np.zeros_like(w)
    ops.embedding_backward(dout, ids, got)  # scale 1: plain adds in token order, exact
    _C._naive.embedding_backward(dout, ids, want)
    np.testing.assert_array_equal(got, want)
    x = f32(rng, 999, 3.0)
    np.testing.assert_allclose(ops.gelu(x), _C._naive.gelu(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ops.gelu_backward(dout[0], x[:77]),
        _C._naive.gelu_backward(dout[0], x[:77]),
        rtol=1e-5,
        atol=1e-6,
    )
    state = [f32(rng, 1001), f32(rng, 1001), f32(rng, 1001, 0.1), np.abs(f32(rng, 1001, 0.01))]
    a, b = [s.copy() for s in state], [s.copy() for s in state]
    ops.adam_step(*a, lr=1e-2, weight_decay=0.1, step=5, decoupled=True)
    _C._naive.adam_step(*b, 1e-2, 0.9, 0.98, 1e-9, 0.1, 5, True)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- packed rows <-> padded layout


def _padded_reference(x, lengths, L):
    """numpy's fancy indexing: the rows of x at the real positions of a (B, L) batch."""
    rows = np.flatnonzero(np.arange(L)[None, :] < np.asarray(lengths)[:, None])
    out = np.zeros((len(lengths) * L,) + x.shape[1:], np.float32)
    out[rows] = x
    return out.reshape((len(lengths), L) + x.shape[1:]), rows


@fixture_ok
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=7),
    extra=st.integers(0, 3),
    R=st.integers(1, 37),
    in_strided=st.booleans(),
    out_step=st.integers(1, 3),
)
def test_pad_and_pack_rows_match_fancy_indexing(threads, lengths, extra, R, in_strided, out_step):
    rng = np.random.default_rng(sum(lengths) + R)
    L = max(lengths) + extra
    N = sum(lengths)
    for t in (1, 3):
        threads(t)
        wide = f32(rng, (N, 2 * R))
        x = wide[:, ::2] if in_strided else wide[:, :R]  # inner stride 2 (copied) or row stride 2R
        expected, rows = _padded_reference(np.ascontiguousarray(x), lengths, L)
        padded = ops.pad_rows(x, np.array(lengths), L)
        assert padded.shape == (len(lengths), L, R) and padded.flags.c_contiguous
        np.testing.assert_array_equal(padded, expected)
        y = f32(rng, (len(lengths), L + 1, R))[:, :L]  # a strided view of the padded layout
        want = y.reshape(-1, R)[rows] if L else np.zeros((0, R), np.float32)
        np.testing.assert_array_equal(ops.pack_rows(y, np.array(lengths, np.int32)), want)
        # into every out_step-th row group of a wider array: rows strided, the rest untouched
        big = np.full((N, out_step, R), 7.0, np.float32)
        ops.pack_rows(y, np.array(lengths), out=big[:, 0])
        np.testing.assert_array_equal(big[:, 0], want)
        assert (big[:, 1:] == 7.0).all()


def test_pad_and_pack_rows_bad_inputs(rng):
    x = f32(rng, (5, 3))
    with pytest.raises(ValueError, match="sum\\(lengths\\) = 4 rows, got 5"):
        ops.pad_rows(x, np.array([2, 2]), 3)
    with pytest.raises(ValueError, match="lengths: entry 4 at position 1 is outside \\[0, 3\\]"):
        ops.pad_rows(x, np.array([1, 4]), 3)
    with pytest.raises(ValueError, match="lengths: entry -1"):
        ops.pad_rows(x, np.array([6, -1]), 6)
    with pytest.raises(TypeError, match="x"):
        ops.pad_rows(x.astype(np.float64), np.array([5]), 5)
    with pytest.raises(ValueError, match="x"):
        ops.pad_rows(x[None], np.array([5]), 5)
    with pytest.raises(TypeError, match="lengths"):
        ops.pad_rows(x, np.array([2.0, 3.0]), 3)
    with pytest.raises(ValueError, match="L"):
        ops.pad_rows(x, np.array([5]), -1)
    y = f32(rng, (2, 3, 4))
    with pytest.raises(ValueError, match="lengths: expected 2 entries"):
        ops.pack_rows(y, np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="lengths: entry 4"):
        ops.pack_rows(y, np.array([4, 1]))
    with pytest.raises(ValueError, match="out: expected shape \\(3, 4\\)"):
        ops.pack_rows(y, np.array([2, 1]), out=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="out: rows must be unit-stride"):
        ops.pack_rows(y, np.array([2, 1]), out=np.zeros((4, 3), np.float32).T[:3])
    with pytest.raises(ValueError, match="out"):
        ops.pack_rows(y, np.array([2, 1]), out=np.zeros((3, 4), np.float32)[::-1])
    frozen = np.zeros((3, 4), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        ops.pack_rows(y, np.array([2, 1]), out=frozen)


# ---------------------------------------------------------------------------- column sums


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.integers(0, 300),
    N=st.sampled_from([1, 7, 63, 64, 65, 128, 200, 513]),
    row_pad=st.sampled_from([0, 3]),
    nthreads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_add_column_sums_is_numpys_axis_0_sum(threads, M, N, row_pad, nthreads, seed):
    """A bias gradient: out += x.sum(axis=0), the same bits as numpy at any thread count, for
    rows read through a row stride (a column slice of a wider array)."""
    threads(nthreads)
    rng = np.random.default_rng(seed)
    wide = (rng.standard_normal((M, N + row_pad)) * 10).astype(np.float32)
    x = wide[:, :N]
    start = rng.standard_normal(N).astype(np.float32)
    out = start.copy()
    assert ops.add_column_sums(out, x) is out
    rows = np.zeros(N, np.float32)
    for row in x:  # the documented order: rows in turn, from zero
        rows += row
    np.testing.assert_array_equal(out.view(np.uint32), (start + rows).view(np.uint32))
    if N > 1:  # numpy sums axis 0 in that order too (a single column it sums pairwise)
        np.testing.assert_array_equal(out.view(np.uint32), (start + x.sum(axis=0)).view(np.uint32))
    np.testing.assert_allclose(out, start + x.astype(np.float64).sum(axis=0), rtol=1e-4,
                               atol=1e-3 * max(1, M) ** 0.5)


def test_add_column_sums_bad_input():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="out"):
        ops.add_column_sums(np.zeros(4, np.float32), x)  # wrong length
    with pytest.raises(TypeError, match="out"):
        ops.add_column_sums(np.zeros(3, np.float64), x)
    with pytest.raises(TypeError, match="x"):
        ops.add_column_sums(np.zeros(3, np.float32), x.astype(np.float64))
    with pytest.raises(ValueError, match="out"):
        ops.add_column_sums(np.zeros(6, np.float32)[::2], x)  # not contiguous
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        ops.add_column_sums(ro, x)
    with pytest.raises(ValueError, match="share memory"):
        ops.add_column_sums(x[0], x)
    with pytest.raises(ValueError, match="x"):
        ops.add_column_sums(np.zeros(3, np.float32), np.ones(3, np.float32))  # not 2-D
