"""pytransformer.ops.matmul against float64 numpy, under every ISA path and thread count."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytransformer as pt
from pytransformer import _C
from pytransformer.ops import PackedWeight, matmul

# Sizes around every block edge (MR=6 or 12, NR=16, MC=144, KC=256, small-M cut at 32), 1 and
# primes.
SIZES = [1, 2, 3, 5, 6, 7, 11, 12, 13, 15, 16, 17, 25, 31, 32, 33, 47, 97, 143, 145]
K_SIZES = [1, 2, 7, 8, 9, 16, 31, 61, 255, 256, 257, 263, 520]


@pytest.fixture
def isa(gemm_isa):
    """Every test here runs under each of the float GEMM's kernel sets (avx512 included)."""
    return gemm_isa


def op(x: np.ndarray, trans: bool) -> np.ndarray:
    return np.swapaxes(x, -1, -2) if trans else x


def reference(a, b, trans_a=False, trans_b=False, bias=None, activation=None, out=None):
    """The product in float64, and an error scale: 1e-5 * sqrt(K) * (|op(a)| @ |op(b)| + |bias|)."""
    r = ref.matmul(a, b, trans_a, trans_b, bias, activation, out)
    A = np.abs(op(a, trans_a).astype(np.float64))
    scale = A @ np.abs(op(b, trans_b).astype(np.float64))
    if out is not None:
        scale = scale + np.abs(out)
    if bias is not None:
        scale = scale + np.abs(bias)
    k = A.shape[-1]
    return r, scale * 1e-5 * math.sqrt(max(k, 1)) + 1e-6


def assert_close(c, r, tol):
    assert c.dtype == np.float32
    assert c.shape == r.shape
    # The relative error of the whole result, bounded by the sqrt(K)-scaled norm...
    err = np.linalg.norm((c - r).ravel())
    assert err <= np.linalg.norm(tol.ravel()), (err, np.linalg.norm(tol.ravel()))
    # ...and no single element far off (catches a wrong tile hidden by a large norm).
    assert np.all(np.abs(c - r) <= 10 * tol)


def rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def operands(rng, M, N, K, trans_a, trans_b, batch=None):
    pre = () if batch is None else (batch,)
    a = rand(rng, pre + ((K, M) if trans_a else (M, K)))
    b = rand(rng, pre + ((N, K) if trans_b else (K, N)))
    return a, b


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.sampled_from(SIZES),
    N=st.sampled_from(SIZES),
    K=st.sampled_from(K_SIZES),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    use_bias=st.booleans(),
    activation=st.sampled_from([None, "relu", "gelu"]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64(isa, M, N, K, trans_a, trans_b, use_bias, activation, seed):
    rng = np.random.default_rng(seed)
    a, b = operands(rng, M, N, K, trans_a, trans_b)
    bias = rand(rng, N) if use_bias else None
    c = matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=activation)
    r, tol = reference(a, b, trans_a, trans_b, bias, activation)
    assert_close(c, r, tol)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25)
@given(
    batch=st.sampled_from([1, 2, 3]),
    M=st.sampled_from([1, 5, 33, 40]),
    N=st.sampled_from([1, 17, 40]),
    K=st.sampled_from([1, 9, 260]),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    form=st.sampled_from(["3d@3d", "3d@2d", "2d@3d"]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batched(isa, batch, M, N, K, trans_a, trans_b, form, use_bias, seed):
    rng = np.random.default_rng(seed)
    a, b = operands(rng, M, N, K, trans_a, trans_b, batch)
    if form == "3d@2d":
        b = b[0]
    elif form == "2d@3d":
        a = a[0]
    bias = rand(rng, N) if use_bias else None
    c = matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias)
    r, tol = reference(a, b, trans_a, trans_b, bias)
    assert c.shape == (batch, M, N)
    assert_close(c, r, tol)


@pytest.mark.parametrize(
    "M,N,K",
    [
        (40, 4100, 5),  # N wider than NC: two column blocks
        (300, 70, 600),  # three K blocks, three M blocks
        (1, 4097, 33),  # small M, many panels, ragged last panel
        (32, 50, 1030),  # small M, K over four blocks
        (33, 8, 64),  # just past the small-M cut
    ],
)
@pytest.mark.parametrize(
    "trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)]
)
def test_block_edges(isa, rng, M, N, K, trans_a, trans_b):
    a, b = operands(rng, M, N, K, trans_a, trans_b)
    bias = rand(rng, N)
    c = matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation="gelu")
    r, tol = reference(a, b, trans_a, trans_b, bias, "gelu")
    assert_close(c, r, tol)


@pytest.mark.parametrize(
    "view",
    ["step_rows", "step_cols", "negative", "broadcast", "fortran", "batch_slice"],
)
@pytest.mark.parametrize("M", [3, 70])
def test_non_contiguous_inputs(isa, rng, view, M):
    N, K = 37, 45
    if view == "step_rows":
        a, b = rand(rng, (2 * M, K))[::2], rand(rng, (2 * K, N))[::2]
    elif view == "step_cols":
        a, b = rand(rng, (M, 3 * K))[:, ::3], rand(rng, (K, 2 * N))[:, ::2]
    elif view == "negative":
        a, b = rand(rng, (M, K))[::-1, ::-1], rand(rng, (K, N))[::-1]
    elif view == "broadcast":
        a = np.broadcast_to(rand(rng, (1, K)), (M, K))
        b = np.broadcast_to(rand(rng, (K, 1)), (K, N))
    elif view == "fortran":
        a, b = np.asfortranarray(rand(rng, (M, K))), np.asfortranarray(rand(rng, (K, N)))
    else:
        a, b = rand(rng, (3, M, K + 4))[:, :, 2:-2], rand(rng, (3, K, N))
    bias = rand(rng, 2 * N)[::2]  # a strided bias too
    c = matmul(a, b, bias=bias, activation="relu")
    r, tol = reference(a, b, bias=bias, activation="relu")
    assert_close(c, r, tol)
    assert c.flags.c_contiguous


@pytest.mark.parametrize("M", [4, 100])
@pytest.mark.parametrize("trans_b", [False, True])
def test_out_written_in_place(isa, rng, M, trans_b):
    N, K = 40, 30
    a, b = operands(rng, M, N, K, False, trans_b)
    out = np.full((M, N), np.nan, np.float32)
    res = matmul(a, b, trans_b=trans_b, out=out)
    assert res is out
    r, tol = reference(a, b, False, trans_b)
    assert_close(out, r, tol)


@pytest.mark.parametrize("M", [4, 100])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_accumulate(isa, rng, M, trans_a, trans_b):
    N, K = 33, 300
    a, b = operands(rng, M, N, K, trans_a, trans_b)
    bias = rand(rng, N)
    start = rand(rng, (M, N))
    out = start.copy()
    res = matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, out=out, accumulate=True)
    assert res is out
    r, tol = reference(a, b, trans_a, trans_b, bias, out=start)
    assert_close(out, r, tol)
    # a second accumulation adds the product again (gradient accumulation over micro-batches)
    matmul(a, b, trans_a=trans_a, trans_b=trans_b, out=out, accumulate=True)
    r2, tol2 = reference(a, b, trans_a, trans_b, out=r)
    assert_close(out, r2, 2 * tol2)


def test_accumulate_batched_weight_gradient(rng):
    # dW += dy2d^T x2d for a (batch, L, C) activation, as the Linear backward does.
    dy, x = rand(rng, (3, 7, 20)), rand(rng, (3, 7, 12))
    dw = rand(rng, (20, 12))
    expect = dw.astype(np.float64) + dy.reshape(-1, 20).T.astype(np.float64) @ x.reshape(-1, 12)
    matmul(dy.reshape(-1, 20), x.reshape(-1, 12), trans_a=True, out=dw, accumulate=True)
    np.testing.assert_allclose(dw, expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_k_zero_gives_bias(isa, activation):
    a, b = np.zeros((4, 0), np.float32), np.zeros((0, 5), np.float32)
    bias = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], np.float32)
    c = matmul(a, b, bias=bias, activation=activation)
    r, _ = reference(a, b, bias=bias, activation=activation)
    np.testing.assert_allclose(c, r, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(matmul(a, b), np.zeros((4, 5), np.float32))
    out = np.ones((4, 5), np.float32)
    matmul(a, b, bias=bias, out=out, accumulate=True)
    np.testing.assert_array_equal(out, 1.0 + np.broadcast_to(bias, (4, 5)))


def test_empty_dimensions():
    assert matmul(np.zeros((0, 3), np.float32), np.zeros((3, 4), np.float32)).shape == (0, 4)
    assert matmul(np.zeros((2, 3), np.float32), np.zeros((3, 0), np.float32)).shape == (2, 0)
    assert matmul(np.zeros((0, 2, 3), np.float32), np.zeros((3, 4), np.float32)).shape == (0, 2, 4)


# Shapes that take each path with more than one thread, with several K blocks.
THREAD_CASES = [
    (1, 3000, 300, False),  # tiny M: streaming sweep over B
    (8, 900, 600, False),  # small M, B packed a block at a time
    (24, 900, 600, True),  # the same with B stored transposed
    (8, 900, 600, True),  # small M, dot products against B^T
    (300, 200, 600, False),  # packed path, rows split between threads
    (40, 3000, 300, True),  # packed path, columns split between threads
    (130, 200, 2900, False),  # packed path, K split between threads (a small C, a long K)
]


@pytest.mark.parametrize("M,N,K,trans_b", THREAD_CASES)
def test_bit_identical_across_thread_counts(isa, threads, rng, M, N, K, trans_b):
    a, b = operands(rng, M, N, K, False, trans_b)
    bias = rand(rng, N)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(matmul(a, b, trans_b=trans_b, bias=bias, activation="gelu"))
    for c in results[1:]:
        np.testing.assert_array_equal(c.view(np.uint32), results[0].view(np.uint32))
    r, tol = reference(a, b, False, trans_b, bias, "gelu")
    assert_close(results[0], r, tol)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(
    M=st.sampled_from([33, 47, 130, 145, 300, 512]),
    N=st.sampled_from([1, 15, 17, 130, 512]),
    K=st.sampled_from([1024, 1025, 1300, 2900, 4097]),
    mode=st.sampled_from(["accumulate", "bias", "relu", "gelu"]),
    nthreads=st.sampled_from([2, 3, 4]),
    seed=st.integers(0, 2**16),
)
def test_k_split_weight_gradients(isa, threads, M, N, K, mode, nthreads, seed):
    """A small C with a long K (a weight gradient, dW = dy^T x with K = tokens) is split along K
    between threads, each slice's sums added to C in slice order afterwards: the same bits as one
    thread, and the float64 product."""
    rng = np.random.default_rng(seed)
    a, b = operands(rng, M, N, K, True, False)
    bias = rand(rng, N) if mode != "accumulate" else None
    start = rand(rng, (M, N))
    act = mode if mode in ("relu", "gelu") else None

    def product():
        out = start.copy()
        return matmul(a, b, trans_a=True, bias=bias, activation=act, out=out,
                      accumulate=mode == "accumulate")

    threads(1)
    one = product()
    threads(nthreads)
    np.testing.assert_array_equal(product().view(np.uint32), one.view(np.uint32))
    r, tol = reference(a, b, True, False, bias, act, start if mode == "accumulate" else None)
    assert_close(one, r, tol)


def _under(level, fn):
    """fn() with the ISA forced to `level`, then the previous level restored."""
    before = _C.selected_isa()
    try:
        assert _C._force_isa(level) == level
        return fn()
    finally:
        _C._force_isa(before)


@pytest.mark.skipif(not _C.cpu_has_avx512(), reason="the CPU has no AVX-512 F/VL/BW/DQ")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(
    M=st.sampled_from(SIZES + [150, 290, 300]),
    N=st.sampled_from(SIZES + [4100]),
    K=st.sampled_from(K_SIZES),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    strided=st.booleans(),
    use_bias=st.booleans(),
    mode=st.sampled_from([None, "relu", "gelu", "accumulate", "packed"]),
    nthreads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_avx512_gives_the_avx2_bits(threads, M, N, K, trans_a, trans_b, strided, use_bias, mode,
                                    nthreads, seed):
    """The 12 x 16 AVX-512 micro-kernel sums every element in the same order as the 6 x 16 AVX2
    one, so every path (small M, blocked, prepacked; any strides, epilogue, thread count) gives
    the same bits; NaN-free inputs, so the comparison is exact."""
    threads(nthreads)
    rng = np.random.default_rng(seed)
    a, b = operands(rng, M, N, K * (2 if strided else 1), trans_a, trans_b)
    if strided:  # a column (or row) stride of 2 along K
        a = a[::2] if trans_a else a[:, ::2]
        b = b[:, ::2] if trans_b else b[::2]
    bias = rand(rng, N) if use_bias else None
    start = rand(rng, (M, N))
    act = mode if mode in ("relu", "gelu") else None

    def product():
        if mode == "packed":
            w = b if trans_b else b.T
            return matmul(a.T if trans_a else a, PackedWeight(w), bias=bias)
        if mode == "accumulate":
            out = start.copy()
            return matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, out=out,
                          accumulate=True)
        return matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=act)

    wide, narrow = _under("avx512", product), _under("avx2", product)
    np.testing.assert_array_equal(wide.view(np.uint32), narrow.view(np.uint32))


@pytest.mark.parametrize("M", [1, 20, 50])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_nan_propagates(isa, rng, M, activation):
    a, b = rand(rng, (M, 20)), rand(rng, (20, 30))
    a[0, 3] = np.nan
    c = matmul(a, b, activation=activation)
    assert np.all(np.isnan(c[0]))
    assert not np.any(np.isnan(c[1:]))


@pytest.mark.parametrize("M", [1, 20, 50])
def test_inf_propagates(isa, rng, M):
    a, b = rand(rng, (M, 20)), rand(rng, (20, 30))
    b[5, 7] = np.inf
    c = matmul(a, b)
    assert np.all(np.isinf(c[:, 7]))
    assert np.all(np.isfinite(np.delete(c, 7, axis=1)))


def test_naive_oracle_agrees(isa, rng):
    a, b = operands(rng, 50, 40, 300, True, False)
    bias = rand(rng, 40)
    fast = matmul(a, b, trans_a=True, bias=bias, activation="gelu")
    slow = _C._matmul_naive(a, b, trans_a=True, bias=bias, activation="gelu")
    r, tol = reference(a, b, True, False, bias, "gelu")
    assert_close(slow, r, tol)
    assert_close(fast, r, tol)


def test_concurrent_python_threads(rng):
    jobs = [operands(rng, m, 300, 200, False, tb) for m in (5, 80) for tb in (False, True)] * 3
    expected = [reference(a, b, False, i % 4 in (1, 3)) for i, (a, b) in enumerate(jobs)]
    got: dict[int, np.ndarray] = {}

    def work(i):
        a, b = jobs[i]
        for _ in range(5):
            got[i] = matmul(a, b, trans_b=i % 4 in (1, 3))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for i, (r, tol) in enumerate(expected):
        assert_close(got[i], r, tol)


def test_gelu_matches_torch(rng):
    torch = pytest.importorskip("torch")
    a, b, bias = rand(rng, (9, 20)), rand(rng, (20, 30)), rand(rng, 30)
    c = matmul(a, b, bias=bias, activation="gelu")
    t = torch.nn.functional.gelu(torch.from_numpy(a) @ torch.from_numpy(b) + torch.from_numpy(bias))
    np.testing.assert_allclose(c, t.numpy(), rtol=1e-5, atol=1e-5)


def test_readme_command():
    a = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(matmul(a, a.T), np.full((4, 4), 3.0, np.float32))
    assert pt.cpu_info()["isa"] in ("generic", "avx2", "avx512", "avx512vnni")


# ---- bad input -------------------------------------------------------------------------------

F = np.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(a=np.ones((2, 3)), b=np.ones((3, 4), F)), TypeError, "a: expected dtype float32"),
        (dict(a=np.ones((2, 3), F), b=np.ones((3, 4), np.int32)), TypeError, "b: expected dtype"),
        (dict(a=[[1.0]], b=np.ones((1, 1), F)), TypeError, "a: expected a numpy.ndarray"),
        (dict(a=np.ones(3, F), b=np.ones((3, 4), F)), ValueError, "a: expected 2-D or 3-D"),
        (dict(a=np.ones((1, 2, 3, 4), F), b=np.ones((4, 4), F)), ValueError, "a: expected 2-D"),
        (dict(a=np.ones((2, 3), F), b=np.ones((4, 5), F)), ValueError, r"\(2, 3\).*\(4, 5\)"),
        (
            dict(a=np.ones((2, 3), F), b=np.ones((5, 4), F), trans_b=True),
            ValueError,
            r"op\(a\) is \(2, 3\) and op\(b\) is \(4, 5\)",
        ),
        (dict(a=np.ones((2, 2, 3), F), b=np.ones((3, 3, 4), F)), ValueError, "batch sizes differ"),
        (
            dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), bias=np.ones(3, F)),
            ValueError,
            r"bias: expected shape \(4,\), got \(3,\)",
        ),
        (
            dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), bias=np.ones(4)),
            TypeError,
            "bias: expected dtype float32",
        ),
        (
            dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), bias=np.ones((1, 4), F)),
            ValueError,
            "bias: expected 1-D",
        ),
        (
            dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), activation="tanh"),
            ValueError,
            "activation:",
        ),
        (dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), activation=1), TypeError, "activation:"),
        (
            dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), out=np.ones((4, 2), F)),
            ValueError,
            r"out: expected shape \(2, 4\), got \(4, 2\)",
        ),
        (
            dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), out=np.ones((2, 4))),
            TypeError,
            "out: expected dtype float32",
        ),
        (
            dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), out=np.ones((4, 2), F).T),
            ValueError,
            "out: expected a C-contiguous",
        ),
        (dict(a=np.ones((2, 3), F), b=np.ones((3, 4), F), accumulate=True), ValueError, "out:"),
        (
            dict(
                a=np.ones((2, 3), F),
                b=np.ones((3, 4), F),
                out=np.ones((2, 4), F),
                accumulate=True,
                activation="relu",
            ),
            ValueError,
            "activation: must be None",
        ),
    ],
)
def test_bad_input(kwargs, exc, match):
    a, b = kwargs.pop("a"), kwargs.pop("b")
    with pytest.raises(exc, match=match):
        matmul(a, b, **kwargs)


def test_out_must_be_writable_and_separate():
    a, b = np.ones((4, 4), F), np.ones((4, 4), F)
    ro = np.ones((4, 4), F)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: array is read-only"):
        matmul(a, b, out=ro)
    with pytest.raises(ValueError, match="out: must not share memory"):
        matmul(a, b, out=a)
    big = np.ones((8, 4), F)
    with pytest.raises(ValueError, match="out: must not share memory"):
        matmul(big[:4], b, out=big[2:6])


@pytest.mark.skipif(not _C.cpu_has_avx512(), reason="the CPU has no AVX-512 F/VL/BW/DQ")
def test_avx512_training_and_decoding_give_the_avx2_bits():
    """A training step (forward, loss, backward: every GEMM layout the model uses) and a beam
    search give the same bits at both levels, so training reproduces across machines."""
    from model_cases import random_batch, small_config

    cfg = small_config(vocab=61, d_model=48, layers=2, num_heads=4, d_ff=80, dropout=0.1)
    batch = random_batch(cfg, np.random.default_rng(0), B=37, S=13, T=11)

    def run():
        model = pt.Transformer(cfg, seed=3)
        model.train()
        loss, _ = model.loss_and_grad(batch, label_smoothing=0.1, dropout_seed=7)
        grads = {k: g.copy() for k, g in model.gradients().items()}
        model.eval()
        hyps = model.translate(batch.src[:5].tolist(), beam_size=3, max_decoding_length=9)
        return loss, grads, hyps

    loss_w, grads_w, hyps_w = _under("avx512", run)
    loss_n, grads_n, hyps_n = _under("avx2", run)
    assert loss_w == loss_n
    assert grads_w.keys() == grads_n.keys()
    for k in grads_w:
        np.testing.assert_array_equal(grads_w[k].view(np.uint32), grads_n[k].view(np.uint32), k)
    assert hyps_w == hyps_n
