"""Softmax cross-entropy (label smoothing, ignore index, in place) and log-softmax against float64
references, finite differences and torch."""

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


def make_case(rng, N, V, ignore_frac=0.2, ignore=-100, scale=3.0):
    logits = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < ignore_frac] = ignore
    return logits, targets


@fixture_ok
@given(
    N=st.integers(0, 12),
    V=st.integers(1, 300),
    eps=st.sampled_from([0.0, 0.1, 0.35]),
    ignore=st.sampled_from([-100, 0]),
    dtype=st.sampled_from([np.int64, np.int32]),
)
def test_matches_float64(isa, N, V, eps, ignore, dtype):
    rng = np.random.default_rng(N * 1000 + V)
    logits, targets = make_case(rng, N, V, ignore=ignore)
    targets = targets.astype(dtype)
    loss, grad = ops.softmax_cross_entropy(
        logits, targets, label_smoothing=eps, ignore_index=ignore
    )
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits, targets, eps, ignore)
    assert isinstance(loss, float)
    assert grad.shape == logits.shape and grad.dtype == np.float32
    assert loss == pytest.approx(loss_ref, rel=2e-6, abs=2e-6)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_gradient_matches_finite_differences(isa, rng):
    logits, targets = make_case(rng, 4, 13, ignore_frac=0.0)
    targets[1] = -100
    x64 = logits.astype(np.float64)
    _, grad = ops.softmax_cross_entropy(logits, targets, label_smoothing=0.2)
    num = np.zeros_like(x64)
    h = 1e-6
    for i in np.ndindex(x64.shape):
        old = x64[i]
        x64[i] = old + h
        hi = ref.softmax_cross_entropy(x64, targets, 0.2)[0]
        x64[i] = old - h
        lo = ref.softmax_cross_entropy(x64, targets, 0.2)[0]
        x64[i] = old
        num[i] = (hi - lo) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-7)


def test_inplace_reuses_the_buffer(isa, rng):
    logits, targets = make_case(rng, 9, 1001)
    want_loss, want = ops.softmax_cross_entropy(logits, targets, label_smoothing=0.1)
    buf = logits.copy()
    loss, grad = ops.softmax_cross_entropy(buf, targets, label_smoothing=0.1, inplace=True)
    assert grad is buf
    assert loss == want_loss
    np.testing.assert_array_equal(buf, want)


def test_all_ignored_and_empty():
    logits = np.ones((3, 5), np.float32)
    loss, grad = ops.softmax_cross_entropy(logits, np.full(3, -100))
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0)
    loss, grad = ops.softmax_cross_entropy(np.zeros((0, 5), np.float32), np.zeros(0, np.int64))
    assert loss == 0.0 and grad.shape == (0, 5)


def test_large_logits_are_stable(isa, rng):
    logits, targets = make_case(rng, 5, 67, ignore_frac=0.0, scale=30.0)
    logits += 5e3
    loss, grad = ops.softmax_cross_entropy(logits, targets)
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits, targets)
    assert np.isfinite(loss) and loss == pytest.approx(loss_ref, rel=1e-4)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-3, atol=1e-6)
    y = ops.log_softmax(logits)
    np.testing.assert_allclose(y, ref.log_softmax(logits), rtol=1e-5, atol=2e-3)


def test_thread_count_invariance(threads, isa, rng):
    logits, targets = make_case(rng, 301, 517)
    runs = []
    for n in (1, 2, 3):
        threads(n)
        runs.append(
            ops.softmax_cross_entropy(logits, targets, label_smoothing=0.1)
            + (ops.log_softmax(logits),)
        )
    for loss, grad, lsm in runs[1:]:
        assert loss == runs[0][0]
        np.testing.assert_array_equal(grad, runs[0][1])
        np.testing.assert_array_equal(lsm, runs[0][2])


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("eps,ignore", [(0.0, -100), (0.1, -100), (0.1, 3), (0.5, 0)])
def test_matches_torch(rng, eps, ignore):
    logits, targets = make_case(rng, 37, 211, ignore=ignore)
    lt = torch.tensor(logits, requires_grad=True)
    want = F.cross_entropy(lt, torch.tensor(targets), label_smoothing=eps, ignore_index=ignore)
    want.backward()
    loss, grad = ops.softmax_cross_entropy(
        logits, targets, label_smoothing=eps, ignore_index=ignore
    )
    assert loss == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(grad, lt.grad.numpy(), rtol=1e-4, atol=1e-7)


@fixture_ok
@given(rows=st.lists(st.integers(0, 6), max_size=2), V=st.integers(1, 200))
def test_log_softmax_matches_float64(isa, rows, V):
    rng = np.random.default_rng(V)
    x = (rng.standard_normal((*rows, V)) * 4).astype(np.float32)
    y = ops.log_softmax(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, ref.log_softmax(x), rtol=1e-5, atol=2e-6)


def test_log_softmax_out(rng):
    x = rng.standard_normal((4, 50)).astype(np.float32)
    want = ops.log_softmax(x)
    out = np.empty_like(x)
    assert ops.log_softmax(x, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert ops.log_softmax(x, out=x) is x  # in place
    np.testing.assert_array_equal(x, want)
    if torch is not None:
        np.testing.assert_allclose(want, torch.log_softmax(torch.tensor(x), -1).numpy(), atol=1e-5)


def test_bad_inputs(rng):
    logits, targets = make_case(rng, 4, 10, ignore_frac=0.0)
    with pytest.raises(TypeError, match="logits:"):
        ops.softmax_cross_entropy(logits.astype(np.float64), targets)
    with pytest.raises(ValueError, match="logits:"):
        ops.softmax_cross_entropy(logits[None], targets)
    with pytest.raises(TypeError, match="targets:"):
        ops.softmax_cross_entropy(logits, targets.astype(np.float32))
    with pytest.raises(ValueError, match="targets:"):
        ops.softmax_cross_entropy(logits, targets[:3])
    bad = targets.copy()
    bad[2], bad[3] = 10, -1
    with pytest.raises(IndexError, match=r"targets\[2\] = 10"):
        ops.softmax_cross_entropy(logits, bad)
    bad[2] = 0
    with pytest.raises(IndexError, match=r"targets\[3\] = -1"):
        ops.softmax_cross_entropy(logits, bad)
    with pytest.raises(ValueError, match="label_smoothing:"):
        ops.softmax_cross_entropy(logits, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="logits:"):
        ops.softmax_cross_entropy(logits[:, ::2], targets % 5, inplace=True)
    ro = logits.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="logits:"):
        ops.softmax_cross_entropy(ro, targets, inplace=True)
    with pytest.raises(ValueError, match="logits:"):
        ops.softmax_cross_entropy(np.zeros((2, 0), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="out:"):
        ops.log_softmax(logits, out=np.empty((4, 9), np.float32))
    with pytest.raises(TypeError, match="out:"):
        ops.log_softmax(logits, out=np.empty((4, 10)))
    with pytest.raises(ValueError, match="x:"):
        ops.log_softmax(np.zeros((3, 0), np.float32))


def test_matches_naive_sibling(isa, rng):
    from pytransformer import _C

    logits, targets = make_case(rng, 23, 1037)
    loss, grad = ops.softmax_cross_entropy(logits, targets, label_smoothing=0.1)
    want_loss, want = _C._naive.softmax_cross_entropy(logits, targets, 0.1)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
        ops.log_softmax(logits), _C._naive.log_softmax(logits), rtol=1e-6, atol=2e-6
    )


def _topk_reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the whole log-softmax row, sorted by value (NaN as -inf) then index."""
    y = ops.log_softmax(x)
    key = np.where(np.isnan(y), -np.inf, y)
    order = np.lexsort((np.broadcast_to(np.arange(y.shape[1]), y.shape), -key), axis=-1)[:, :k]
    return order, np.take_along_axis(y, order, 1)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    V=st.integers(1, 300),
    kfrac=st.floats(0.0, 1.0),
    levels=st.sampled_from([0, 3, 1000]),
    neg_inf=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_log_softmax_topk_matches_brute_force(isa, rows, V, kfrac, levels, neg_inf, seed):
    """Indices and bits equal a full log-softmax sorted by value then index, with many exact ties
    (integer logits from a few levels) and masked (-inf) entries, for every k in [1, V]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, V)).astype(np.float32) * 4
    if levels:
        x = rng.integers(0, levels, (rows, V)).astype(np.float32)
    if neg_inf:
        x[rng.random((rows, V)) < 0.3] = -np.inf
        x[:, 0] = 0.0  # a row of only -inf is the NaN case below
    k = max(1, min(V, int(round(kfrac * V))))
    idx, val = ops.log_softmax_topk(x, k)
    want_idx, want_val = _topk_reference(x, k)
    assert idx.dtype == np.int64 and val.dtype == np.float32 and idx.shape == (rows, k)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(val, want_val)


def test_log_softmax_topk_degenerate_rows_and_errors():
    """A row of -inf (all -inf out) or with a NaN (all NaN out) ranks every entry equal: the first
    k indices; a strided x is read as it is; k outside [1, V] and bad arrays are refused."""
    x = np.zeros((3, 20), np.float32)
    x[0] = -np.inf
    x[1, 5] = np.nan
    x[2] = np.arange(20)
    idx, val = ops.log_softmax_topk(x, 4)
    np.testing.assert_array_equal(idx[:2], [[0, 1, 2, 3]] * 2)
    np.testing.assert_array_equal(val, np.take_along_axis(ops.log_softmax(x), idx, 1))
    assert np.isneginf(val[0]).all() and np.isnan(val[1]).all()
    np.testing.assert_array_equal(idx[2], [19, 18, 17, 16])
    wide = np.repeat(x[2:], 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(ops.log_softmax_topk(wide, 4)[0], idx[2:])
    with pytest.raises(ValueError, match="k:"):
        ops.log_softmax_topk(x, 0)
    with pytest.raises(ValueError, match="k:"):
        ops.log_softmax_topk(x, 21)
    with pytest.raises(TypeError, match="k:"):
        ops.log_softmax_topk(x, 2.0)
    with pytest.raises(TypeError, match="x"):
        ops.log_softmax_topk(x.astype(np.float64), 2)
    with pytest.raises(ValueError, match="x"):
        ops.log_softmax_topk(x[0], 2)
