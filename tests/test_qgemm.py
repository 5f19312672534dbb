"""The int8 GEMM (pytransformer.ops.qmatmul_s32 / qlinear) against exact numpy int64 products,
under every kernel set the CPU runs (generic, AVX2, AVX-512 VNNI) and several thread counts, at
the edges of the integer range."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import QGEMM_ISAS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytransformer import _C, ops
from pytransformer.ops import QuantizedWeight, qlinear, qmatmul_s32

# Row tiles 6 (AVX2) and 12 (VNNI), row block 96, panel width 16, k-pairs and k-quads: 1, primes
# and sizes either side of each.
M_SIZES = [1, 2, 5, 6, 7, 11, 12, 13, 17, 24, 25, 31, 64, 95, 96, 97, 131]
N_SIZES = [1, 2, 7, 15, 16, 17, 31, 33, 47, 64, 97]
K_SIZES = [1, 2, 3, 4, 5, 6, 7, 16, 31, 61, 127, 256, 257, 258, 521]


def int8(rng, shape, low=-128, high=127):
    return rng.integers(low, high + 1, size=shape).astype(np.int8)


def weight(q: np.ndarray) -> QuantizedWeight:
    return QuantizedWeight(q, np.ones(q.shape[0], np.float32))


def exact(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ q.astype(np.int64).T


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.sampled_from(M_SIZES) | st.integers(1, 140),
    N=st.sampled_from(N_SIZES) | st.integers(1, 100),
    K=st.sampled_from(K_SIZES) | st.integers(1, 600),
    seed=st.integers(0, 2**32 - 1),
)
def test_int32_sums_are_exact(qisa, M, N, K, seed):
    rng = np.random.default_rng(seed)
    a, q = int8(rng, (M, K)), int8(rng, (N, K))
    c = qmatmul_s32(a, weight(q))
    assert c.dtype == np.int32 and c.shape == (M, N)
    np.testing.assert_array_equal(c, exact(a, q))


@pytest.mark.parametrize(
    "a_value, w_value",
    [(-128, -128), (127, 127), (-128, 127), (127, -128), (-127, 127)],
)
def test_saturation_edge_all_equal(qisa, a_value, w_value):
    """Every product at the int8 extremes: the u8 x s8 vpmaddubsw route saturates here (two
    products of 255 x 127 exceed 32767); the int16-pair route and vpdpbusd (its int32 sums wrap
    past 2^31 at large K before the w + 128 correction) must stay exact."""
    M, N, K = 7, 33, 1001
    a = np.full((M, K), a_value, np.int8)
    q = np.full((N, K), w_value, np.int8)
    c = qmatmul_s32(a, weight(q))
    assert (c == K * a_value * w_value).all()


def test_saturation_edge_alternating_signs(qisa):
    M, N, K = 13, 17, 515
    signs = np.where(np.arange(K) % 2 == 0, 1, -1)
    a = (np.tile(signs, (M, 1)) * 127).astype(np.int8)
    a[::2] = -128
    q = (np.tile(signs, (N, 1)) * -128).clip(-128, 127).astype(np.int8)
    q[1::3] = (q[1::3].astype(np.int16) * -1).clip(-128, 127).astype(np.int8)
    np.testing.assert_array_equal(qmatmul_s32(a, weight(q)), exact(a, q))


def test_largest_k_is_exact_and_one_more_is_refused():
    """K = QMAX_K at -128 x -128 is the largest sum that fits int32; past it the call refuses."""
    K = ops.QMAX_K
    a = np.full((1, K), -128, np.int8)
    q = np.full((2, K), -128, np.int8)
    c = qmatmul_s32(a, weight(q))
    assert int(c[0, 0]) == K * 128 * 128 < 2**31
    with pytest.raises(ValueError, match="K="):
        weight(np.zeros((1, K + 1), np.int8))


@pytest.mark.parametrize("M", [1, 2, 3, 70])
def test_isas_and_thread_counts_agree(threads, rng, M):
    """int32 sums and the dequantised floats (no activation, ReLU) are bit-identical for every
    kernel set and 1, 2 or 3 threads (M <= 2 takes the two-panel decoding tiles)."""
    x = rng.standard_normal((M, 300)).astype(np.float32)
    w = QuantizedWeight.from_float(rng.standard_normal((97, 300)).astype(np.float32))
    b = rng.standard_normal(97).astype(np.float32)
    a8, _ = ops.quantize_rows(x)
    before = _C.selected_isa()
    results = []
    try:
        for isa in QGEMM_ISAS:
            _C._force_isa(isa)
            for n in (1, 2, 3):
                threads(n)
                results.append((qmatmul_s32(a8, w), qlinear(x, w, bias=b, activation="relu")))
    finally:
        _C._force_isa(before)
    for s32, y in results[1:]:
        np.testing.assert_array_equal(s32, results[0][0])
        np.testing.assert_array_equal(y, results[0][1])


def numpy_qlinear(x, w: QuantizedWeight, bias=None, activation=None):
    """Independent float64 reference of qlinear: numpy quantisation of the rows, an int64
    product, the dequantisation, bias and activation."""
    q, sx = ops.quantize_int8(x)
    acc = exact(q, w.int8_rows()).astype(np.float64)
    y = acc / (sx.astype(np.float64)[:, None] * w.scale.astype(np.float64)[None, :])
    if bias is not None:
        y = y + bias
    if activation == "relu":
        y = np.maximum(y, 0)
    elif activation == "gelu":
        from math import erf

        y = 0.5 * y * (1 + np.vectorize(erf)(y / np.sqrt(2)))
    return y


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.integers(1, 70),
    N=st.integers(1, 50),
    K=st.integers(1, 200),
    activation=st.sampled_from([None, "relu", "gelu"]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_qlinear_matches_int64_reference(qisa, M, N, K, activation, with_bias, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.01, 10)).astype(np.float32)
    w = QuantizedWeight.from_float(rng.standard_normal((N, K)).astype(np.float32))
    b = rng.standard_normal(N).astype(np.float32) if with_bias else None
    y = qlinear(x, w, bias=b, activation=activation)
    r = numpy_qlinear(x, w, b, activation)
    # Only float32 rounding of the dequantisation (and GELU) separates the two.
    np.testing.assert_allclose(y, r, rtol=2e-6, atol=2e-5 * (1 + np.abs(r).max()))


def test_qlinear_close_to_float_product(rng):
    """The quantisation error against the float product: per element at most
    sum_k |x| |dW| + |dx| |W| <= K * (half a step of x * max|W| + max|x| * half a step of W)."""
    x = rng.standard_normal((20, 256)).astype(np.float32)
    wf = rng.standard_normal((40, 256)).astype(np.float32)
    y = qlinear(x, QuantizedWeight.from_float(wf))
    r = x.astype(np.float64) @ wf.T.astype(np.float64)
    ax, aw = np.abs(x).max(1), np.abs(wf).max(1)
    bound = (np.abs(x).sum(1)[:, None] * (aw / 254)[None, :]
             + (ax / 254)[:, None] * np.abs(wf).sum(1)[None, :]) * 1.01
    assert (np.abs(y - r) <= bound).all()
    assert np.abs(y - r).max() < 0.02 * np.abs(r).max()


def test_batched_and_strided_inputs(rng):
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    w = QuantizedWeight.from_float(rng.standard_normal((24, 64)).astype(np.float32))
    y = qlinear(x, w)
    assert y.shape == (3, 5, 24)
    np.testing.assert_array_equal(y.reshape(15, 24), qlinear(x.reshape(15, 64), w))
    wide = rng.standard_normal((15, 128)).astype(np.float32)
    view = wide[:, ::2]  # non-contiguous rows
    np.testing.assert_array_equal(qlinear(view, w), qlinear(np.ascontiguousarray(view), w))
    a = int8(rng, (9, 128))[:, ::2]
    q = int8(rng, (24, 64))
    np.testing.assert_array_equal(qmatmul_s32(a, weight(q)), exact(a, q))


def test_zero_and_non_finite_rows(rng):
    w = QuantizedWeight.from_float(rng.standard_normal((8, 16)).astype(np.float32))
    b = np.arange(8, dtype=np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    x[0] = 0.0
    x[1, 3] = np.inf
    x[2, 5] = np.nan
    y = qlinear(x, w, bias=b)
    np.testing.assert_array_equal(y[0], b)
    assert np.isnan(y[1:]).all()
    q, s = ops.quantize_rows(x)
    assert s[0] == 1.0 and np.isnan(s[1:]).all() and not q[1:].any()


def test_packing_round_trip(rng):
    for n, k in [(1, 1), (17, 3), (33, 64), (5, 130)]:
        q = int8(rng, (n, k))
        w = weight(q)
        assert w.data.shape == (-(-n // 16), -(-k // 2), 32)
        np.testing.assert_array_equal(w.int8_rows(), q)


def test_input_validation(rng):
    q = int8(rng, (4, 8))
    w = weight(q)
    with pytest.raises(TypeError, match="a: expected dtype int8"):
        qmatmul_s32(np.zeros((2, 8), np.int16), w)
    with pytest.raises(TypeError, match="a: expected a numpy.ndarray"):
        qmatmul_s32([[1] * 8], w)
    with pytest.raises(ValueError, match="a: expected a 2-D"):
        qmatmul_s32(np.zeros(8, np.int8), w)
    with pytest.raises(ValueError, match="inner dimension"):
        qmatmul_s32(np.zeros((2, 9), np.int8), w)
    with pytest.raises(TypeError, match="weight: expected a QuantizedWeight"):
        qmatmul_s32(np.zeros((2, 8), np.int8), q)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        qlinear(np.zeros((2, 8)), w)
    with pytest.raises(ValueError, match="x: expected 2-D or 3-D"):
        qlinear(np.zeros(8, np.float32), w)
    with pytest.raises(ValueError, match="inner dimension"):
        qlinear(np.zeros((2, 7), np.float32), w)
    with pytest.raises(ValueError, match="bias: expected shape"):
        qlinear(np.zeros((2, 8), np.float32), w, bias=np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="bias: expected dtype float32"):
        qlinear(np.zeros((2, 8), np.float32), w, bias=np.zeros(4))
    with pytest.raises(ValueError, match="activation"):
        qlinear(np.zeros((2, 8), np.float32), w, activation="tanh")
    with pytest.raises(TypeError, match="q: expected dtype int8"):
        QuantizedWeight(q.astype(np.int32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="scale: expected shape"):
        QuantizedWeight(q, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="scale: entries must be positive"):
        QuantizedWeight(q, np.array([1, 0, 1, 1], np.float32))
    with pytest.raises(TypeError, match="scale: expected dtype float32"):
        QuantizedWeight(q, np.ones(4))
    with pytest.raises(ValueError, match="q: expected a non-empty 2-D"):
        QuantizedWeight(np.zeros((0, 8), np.int8), np.ones(0, np.float32))
    with pytest.raises(ValueError, match="packed"):
        _C.qgemm_s32(np.zeros((2, 8), np.int8), w.data, 40, 8)
    with pytest.raises(ValueError, match="k-pairs"):
        _C.qgemm_s32(np.zeros((2, 8), np.int8), w.data, 4, 10)


def test_concurrent_python_threads(rng):
    """Several Python threads running products at once (GIL released) get the serial results."""
    jobs = []
    for i in range(6):
        x = rng.standard_normal((1 + 11 * i, 96)).astype(np.float32)
        w = QuantizedWeight.from_float(rng.standard_normal((40 + i, 96)).astype(np.float32))
        jobs.append((x, w))
    expected = [qlinear(x, w, activation="relu") for x, w in jobs]
    got: list = [None] * len(jobs)

    def work(i):
        for _ in range(20):
            got[i] = qlinear(*jobs[i], activation="relu")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
