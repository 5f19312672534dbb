"""Layer norm and the fused residual-add layer norm against float64 references, finite
differences and torch."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytransformer import ops

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is optional
    torch = None

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def make(rng, shape, scale=1.0, offset=0.0):
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


def params(rng, C):
    return make(rng, C, 0.5, 1.0), make(rng, C, 0.3)


@fixture_ok
@given(
    rows=st.lists(st.integers(0, 9), min_size=0, max_size=2),
    C=st.integers(1, 300),
    eps=st.sampled_from([1e-5, 1e-6]),
    offset=st.sampled_from([0.0, 3.0]),
)
def test_forward_matches_float64(isa, rows, C, eps, offset):
    rng = np.random.default_rng(C)
    x = make(rng, (*rows, C), 2.0, offset)
    g, b = params(rng, C)
    y, mean, rstd = ops.layer_norm(x, g, b, eps, return_stats=True)
    y_ref, m_ref, r_ref = ref.layer_norm(x, g, b, eps)
    assert y.shape == x.shape and mean.shape == rstd.shape == x.shape[:-1]
    assert y.dtype == mean.dtype == rstd.dtype == np.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=3e-5)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rstd, r_ref, rtol=1e-4)
    np.testing.assert_array_equal(ops.layer_norm(x, g, b, eps), y)  # stats do not change y


@fixture_ok
@given(rows=st.integers(1, 40), C=st.integers(1, 200))
def test_backward_matches_analytic(isa, rows, C):
    rng = np.random.default_rng(rows * 1000 + C)
    x, dy = make(rng, (rows, C), 1.5, 0.5), make(rng, (rows, C))
    g, b = params(rng, C)
    _, mean, rstd = ops.layer_norm(x, g, b, return_stats=True)
    dx, dg, db = ops.layer_norm_backward(dy, x, g, mean, rstd)
    dx_ref, dg_ref, db_ref = ref.layer_norm_backward(dy, x, g, 1e-5)
    # dx is a difference of terms of size rstd * |dy * g|: errors scale with that, not with dx.
    scale = np.abs(dy * g).max() * ref.layer_norm(x, g, b, 1e-5)[2].max()
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(dg, dg_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-4)


def numeric_grad(f, a, h=1e-6):
    """Central differences of the scalar f at the float64 array a."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        hi = f()
        a[i] = old - h
        lo = f()
        a[i] = old
        grad[i] = (hi - lo) / (2 * h)
    return grad


@pytest.mark.parametrize("shape", [(3, 5), (2, 2, 11), (1, 17)])
def test_backward_matches_finite_differences(isa, rng, shape):
    C = shape[-1]
    x, dy = make(rng, shape), make(rng, shape)
    g, b = params(rng, C)
    x64, g64, b64 = x.astype(np.float64), g.astype(np.float64), b.astype(np.float64)

    def loss():
        return float((ref.layer_norm(x64, g64, b64, 1e-5)[0] * dy).sum())

    _, mean, rstd = ops.layer_norm(x, g, b, return_stats=True)
    dx, dg, db = ops.layer_norm_backward(dy, x, g, mean, rstd)
    np.testing.assert_allclose(dx, numeric_grad(loss, x64), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dg, numeric_grad(loss, g64), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(db, numeric_grad(loss, b64), rtol=1e-3, atol=1e-4)


@fixture_ok
@given(rows=st.integers(0, 30), C=st.integers(1, 130), stats=st.booleans())
def test_add_layer_norm_matches_separate_ops(isa, rows, C, stats):
    rng = np.random.default_rng(rows + 7 * C)
    x, r = make(rng, (rows, C)), make(rng, (rows, C))
    g, b = params(rng, C)
    s_ref = x + r  # float32 add, as the kernel
    got = ops.add_layer_norm(x, r, g, b, return_stats=stats)
    want = ops.layer_norm(s_ref, g, b, return_stats=stats)
    if not stats:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        return
    y, s, mean, rstd = got
    np.testing.assert_array_equal(s, s_ref)
    for a, w in zip((y, mean, rstd), want, strict=True):
        np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, ref.layer_norm(s_ref, g, b, 1e-5)[0], rtol=1e-5, atol=3e-5)


def test_eps_is_used(rng):
    # A constant row has zero variance, so y = beta and rstd = 1/sqrt(eps) for any eps.
    x = np.full((2, 24), 3.0, np.float32)
    g, b = params(rng, 24)
    for eps in (1e-5, 1e-6, 0.25):
        y, _, rstd = ops.layer_norm(x, g, b, eps, return_stats=True)
        np.testing.assert_allclose(rstd, 1 / np.sqrt(eps), rtol=1e-6)
        np.testing.assert_allclose(y, np.broadcast_to(b, y.shape), atol=1e-6)


def test_small_variance_large_mean_with_eps_1e6(isa, rng):
    x = make(rng, (64, 512), 1e-2, 100.0)
    g, b = params(rng, 512)
    y = ops.layer_norm(x, g, b, 1e-6)
    np.testing.assert_allclose(y, ref.layer_norm(x, g, b, 1e-6)[0], rtol=1e-3, atol=2e-3)


def test_strided_input(rng):
    base = make(rng, (6, 40))
    x = base[::2, 3:33]  # not contiguous
    g, b = params(rng, 30)
    np.testing.assert_allclose(
        ops.layer_norm(x, g, b), ref.layer_norm(x, g, b, 1e-5)[0], rtol=1e-5, atol=3e-5
    )


def test_thread_count_invariance(threads, isa, rng):
    x, dy = make(rng, (517, 203)), make(rng, (517, 203))
    r = make(rng, (517, 203))
    g, b = params(rng, 203)
    runs = []
    for n in (1, 2, 3):
        threads(n)
        y, s, mean, rstd = ops.add_layer_norm(x, r, g, b, return_stats=True)
        runs.append((y, s, mean, rstd, *ops.layer_norm_backward(dy, s, g, mean, rstd)))
    for other in runs[1:]:
        for a, w in zip(other, runs[0], strict=True):
            np.testing.assert_array_equal(a, w)


def test_zero_rows():
    g, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    x = np.zeros((0, 8), np.float32)
    y, mean, rstd = ops.layer_norm(x, g, b, return_stats=True)
    assert y.shape == (0, 8) and mean.shape == (0,)
    dx, dg, db = ops.layer_norm_backward(x, x, g, mean, rstd)
    assert dx.shape == (0, 8)
    np.testing.assert_array_equal(dg, 0)
    np.testing.assert_array_equal(db, 0)


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_matches_torch(rng):
    x, dy = make(rng, (4, 9, 77), 2.0), make(rng, (4, 9, 77))
    g, b = params(rng, 77)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    yt = F.layer_norm(xt, (77,), gt, bt, eps=1e-6)
    yt.backward(torch.tensor(dy))
    y, mean, rstd = ops.layer_norm(x, g, b, 1e-6, return_stats=True)
    dx, dg, db = ops.layer_norm_backward(dy, x, g, mean, rstd)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=3e-5)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_bad_inputs(rng):
    x = make(rng, (3, 8))
    g, b = params(rng, 8)
    _, mean, rstd = ops.layer_norm(x, g, b, return_stats=True)
    with pytest.raises(TypeError, match="x:"):
        ops.layer_norm(x.astype(np.float64), g, b)
    with pytest.raises(TypeError, match="x:"):
        ops.layer_norm(x.tolist(), g, b)
    with pytest.raises(ValueError, match="gamma:"):
        ops.layer_norm(x, g[:7], b)
    with pytest.raises(ValueError, match="beta:"):
        ops.layer_norm(x, g, b[None])
    with pytest.raises(ValueError, match="x:"):
        ops.layer_norm(np.ones((), np.float32), g, b)
    with pytest.raises(ValueError, match="x:"):
        ops.layer_norm(np.ones((3, 0), np.float32), g[:0], b[:0])
    with pytest.raises(ValueError, match="eps:"):
        ops.layer_norm(x, g, b, -1.0)
    with pytest.raises(ValueError, match="residual:"):
        ops.add_layer_norm(x, x[:2], g, b)
    with pytest.raises(TypeError, match="residual:"):
        ops.add_layer_norm(x, None, g, b)
    with pytest.raises(ValueError, match="dy:"):
        ops.layer_norm_backward(x[:2], x, g, mean, rstd)
    with pytest.raises(ValueError, match="mean:"):
        ops.layer_norm_backward(x, x, g, mean[:2], rstd)
    with pytest.raises(ValueError, match="rstd:"):
        ops.layer_norm_backward(x, x, g, mean, rstd[None])
    with pytest.raises(TypeError, match="gamma:"):
        ops.layer_norm_backward(x, x, g.astype(np.float16), mean, rstd)


def test_matches_naive_sibling(isa, rng):
    from pytransformer import _C

    x, dy = make(rng, (37, 203), 2.0, 1.0), make(rng, (37, 203))
    g, b = params(rng, 203)
    y, mean, rstd = ops.layer_norm(x, g, b, 1e-6, return_stats=True)
    for a, w in zip((y, mean, rstd), _C._naive.layer_norm(x, g, b, 1e-6), strict=True):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=2e-5)
    got = ops.layer_norm_backward(dy, x, g, mean, rstd)
    for a, w in zip(got, _C._naive.layer_norm_backward(dy, x, g, mean, rstd), strict=True):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4)


def test_concurrent_python_threads(rng):
    # The kernels release the GIL and share no scratch: calls from several Python threads at
    # once give the same results as one after another.
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for i in range(8):
        x, dy = make(rng, (64 + i, 96)), make(rng, (64 + i, 96))
        g, b = params(rng, 96)
        cases.append((x, dy, g, b))

    def run(case):
        x, dy, g, b = case
        y, mean, rstd = ops.layer_norm(x, g, b, return_stats=True)
        logits = np.ascontiguousarray(x)
        loss, dlogits = ops.softmax_cross_entropy(logits, np.arange(len(x)) % 96)
        return (y, *ops.layer_norm_backward(dy, x, g, mean, rstd), np.float32(loss), dlogits)

    serial = [run(c) for c in cases]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, cases * 3))
    for got, want in zip(parallel, serial * 3, strict=True):
        for a, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, w)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("stats", [False, True])
def test_out_receives_y(isa, rng, fused, stats):
    x = rng.standard_normal((37, 3, 40)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    g = rng.standard_normal(40).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    call = (lambda **kw: ops.add_layer_norm(x, r, g, b, return_stats=stats, **kw)) if fused else (
        lambda **kw: ops.layer_norm(x, g, b, return_stats=stats, **kw))
    want = call()
    out = np.full(x.shape, np.nan, np.float32)
    got = call(out=out)
    if stats:
        assert got[0] is out
        for a, w in zip(got[1:], want[1:], strict=True):
            np.testing.assert_array_equal(a, w)
        want = want[0]
    else:
        assert got is out
    np.testing.assert_array_equal(out, want)


def test_out_is_checked(rng):
    x = rng.standard_normal((6, 8)).astype(np.float32)
    g, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    cases = [
        (np.empty((6, 9), np.float32), ValueError, "out"),
        (np.empty((6, 8), np.float64), TypeError, "out"),
        (np.empty((8, 6), np.float32).T, ValueError, "out"),
        (np.empty((6, 8), np.float32), None, None),  # a valid out
        (x, ValueError, "share memory"),
        ([[0.0] * 8] * 6, TypeError, "out"),
    ]
    for out, exc, match in cases:
        if exc is None:
            ops.layer_norm(x, g, b, out=out)
            continue
        with pytest.raises(exc, match=match):
            ops.layer_norm(x, g, b, out=out)
    ro = np.empty((6, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        ops.layer_norm(x, g, b, out=ro)
