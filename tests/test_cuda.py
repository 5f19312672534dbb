"""pytransformer.cuda: argument checking (runs everywhere) and GPU kernels against the float64
references of reference.py and the CPU ops.

The GPU tests need the extension built with -DPYTRANSFORMER_CUDA=ON, a CUDA device and PyTorch
with CUDA or CuPy (used to move arrays to and from the device); without them they skip, unless
PYTRANSFORMER_REQUIRE_GPU=1 (tools/cuda_check.sh sets it) turns the missing device into a failure.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from pytransformer import cuda, ops

try:
    import torch
except ImportError:  # pragma: no cover - torch is a test-only dependency
    torch = None


# ------------------------------------------------------------------ argument checks (no GPU needed)


class FakeCudaArray:
    """Carries only a __cuda_array_interface__ (a bogus pointer): enough for the Python checks."""

    def __init__(self, shape, dtype="float32", strides=None, readonly=False, ptr=0x10000):
        dtype = np.dtype(dtype)
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": dtype.str,
            "data": (ptr, readonly),
            "strides": None if strides is None else tuple(s * dtype.itemsize for s in strides),
            "version": 3,
        }


def F(*shape, **kw):
    return FakeCudaArray(shape, **kw)


@pytest.fixture
def no_extension(monkeypatch):
    """Pretends the CUDA extension is not built."""
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_IMPORT_ERROR", "simulated")


def test_not_available_without_extension(no_extension):
    assert cuda.device_count() == 0
    assert cuda.is_available() is False
    with pytest.raises(RuntimeError, match="not built"):
        cuda.synchronize()
    with pytest.raises(RuntimeError, match="not built"):
        cuda.matmul(F(4, 3), F(3, 5))
    with pytest.raises(RuntimeError, match="not built"):
        cuda.layer_norm(F(4, 3), F(3), F(3))


def test_is_available_matches_the_build_and_the_machine():
    """Against what the file system and PyTorch say, not against cuda's own _ext: no extension
    file means not available; with one, the devices PyTorch's CUDA runtime counts (or, without a
    CUDA PyTorch, the NVIDIA driver's device files) decide. A built extension that fails to load
    on a machine with a GPU fails here."""
    if importlib.util.find_spec("pytransformer._cuda") is None:
        assert cuda.is_available() is False and cuda.device_count() == 0
        return
    if torch is not None and torch.version.cuda is not None:
        assert cuda.device_count() == torch.cuda.device_count()
        assert cuda.is_available() == (torch.cuda.device_count() > 0)
    elif "CUDA_VISIBLE_DEVICES" not in os.environ:
        assert cuda.is_available() == bool(glob.glob("/dev/nvidia[0-9]*"))
    else:
        pytest.skip("CUDA_VISIBLE_DEVICES is set and PyTorch has no CUDA to count with")


@pytest.mark.skipif(cuda.is_available(), reason="a CUDA device is present")
def test_valid_call_without_device_raises_runtime_error():
    with pytest.raises(RuntimeError, match="pytransformer.cuda"):
        cuda.matmul(F(4, 3), F(3, 5))


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((np.zeros((2, 2), np.float32), F(2, 2)), {}, TypeError, "a: expected a CUDA array"),
        ((F(2, 2, dtype="float64"), F(2, 2)), {}, TypeError, "a: expected float32"),
        ((F(2, 2), F(2, 2, dtype="int32")), {}, TypeError, "b: expected float32"),
        ((F(2), F(2, 2)), {}, ValueError, "a: expected a 2-D or 3-D"),
        ((F(2, 3, strides=(1, 2)), F(3, 2)), {}, ValueError, "a: must be C-contiguous"),
        ((F(2, 3), F(4, 2)), {}, ValueError, "inner dimensions"),
        ((F(3, 2), F(2, 4)), {"trans_a": True}, ValueError, "inner dimensions"),
        ((F(2, 3, 4), F(3, 4, 5)), {}, ValueError, "batch sizes differ"),
        ((F(2, 3), F(3, 4)), {"bias": F(5)}, ValueError, "bias: expected shape"),
        ((F(2, 3), F(3, 4)), {"activation": "tanh"}, ValueError, "activation"),
        ((F(2, 3), F(3, 4)), {"accumulate": True}, ValueError, "out: accumulate"),
        (
            (F(2, 3), F(3, 4)),
            {"accumulate": True, "out": F(2, 4), "activation": "relu"},
            ValueError,
            "activation",
        ),
        ((F(2, 3), F(3, 4)), {"out": F(4, 2)}, ValueError, "out: expected shape"),
        ((F(2, 3), F(3, 4)), {"out": F(2, 4, readonly=True, ptr=0x90000)}, ValueError, "read-only"),
        (
            (F(2, 3), F(3, 4, ptr=0x20000)),
            {"out": F(2, 4, ptr=0x20010)},
            ValueError,
            "shares memory with b",
        ),
        ((F(2, 3), F(3, 4)), {"stream": -1}, ValueError, "stream"),
        ((F(2, 3), F(3, 4)), {"stream": True}, TypeError, "stream"),
        (
            (F(2, 3), F(3, 4)),
            {"bias": F(4, ptr=0x30000), "out": F(2, 4, ptr=0x30008)},
            ValueError,
            "shares memory with bias",
        ),
    ],
)
def test_matmul_argument_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cuda.matmul(*args, **kwargs)


def test_matmul_shapes_accepted_up_to_the_device(no_extension):
    # Shapes the contract allows get past every check and stop only at the missing extension.
    for args, kwargs in [
        ((F(5, 3), F(3, 4)), {}),
        ((F(3, 5), F(4, 3)), {"trans_a": True, "trans_b": True}),
        ((F(2, 5, 3), F(3, 4)), {"bias": F(4), "activation": "gelu"}),
        ((F(5, 3), F(2, 3, 4)), {}),
        ((F(2, 5, 3), F(2, 3, 4)), {"out": F(2, 5, 4, ptr=0x80000), "accumulate": True}),
    ]:
        with pytest.raises(RuntimeError, match="not built"):
            cuda.matmul(*args, **kwargs)


def test_matmul_k0_with_null_pointers_passes_the_checks(no_extension):
    # CuPy and PyTorch give an empty array a null pointer: K = 0 (out = bias) must get through.
    for args in [(F(5, 0, ptr=0), F(0, 4, ptr=0)), (F(2, 5, 0, ptr=0), F(2, 0, 4, ptr=0))]:
        with pytest.raises(RuntimeError, match="not built"):
            cuda.matmul(*args, bias=F(4))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: cuda.layer_norm(F(4, 3), F(4), F(3)), ValueError, "gamma: expected shape"),
        (
            lambda: cuda.layer_norm(F(4, 3), F(3), F(3, dtype="float16")),
            TypeError,
            "beta: expected float32",
        ),
        (lambda: cuda.layer_norm(F(0, 3), F(3), F(3)), ValueError, "x: empty"),
        (lambda: cuda.layer_norm(F(4, 3), F(3), F(3), eps=-1.0), ValueError, "eps"),
        (
            lambda: cuda.layer_norm(F(4, 3, strides=(4, 1)), F(3), F(3)),
            ValueError,
            "x: must be C-contiguous",
        ),
        (
            lambda: cuda.layer_norm_backward(F(4, 2), F(4, 3), F(3), F(4), F(4)),
            ValueError,
            "dy: expected shape",
        ),
        (
            lambda: cuda.layer_norm_backward(F(4, 3), F(4, 3), F(3), F(5), F(4)),
            ValueError,
            "mean: expected shape",
        ),
        (
            lambda: cuda.layer_norm_backward(F(4, 3), F(4, 3), F(3), F(4), F(4, 1)),
            ValueError,
            "rstd: expected a 1-D",
        ),
    ],
)
def test_layer_norm_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


Q4 = (2, 5, 3, 8)  # (B, L, H, D)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: cuda.attention(F(2, 5, 3), F(*Q4), F(*Q4)), ValueError, "q: expected a 4-D"),
        (lambda: cuda.attention(F(*Q4), F(2, 6, 3, 8), F(*Q4)), ValueError, "v: expected shape"),
        (
            lambda: cuda.attention(F(*Q4), F(2, 6, 3, 9), F(2, 6, 3, 9)),
            ValueError,
            "k: expected shape",
        ),
        (
            lambda: cuda.attention(F(2, 5, 3, 129), F(2, 5, 3, 129), F(2, 5, 3, 129)),
            ValueError,
            "limit",
        ),
        (
            lambda: cuda.attention(F(0, 5, 3, 8), F(0, 5, 3, 8), F(0, 5, 3, 8)),
            ValueError,
            "q: empty",
        ),
        (
            lambda: cuda.attention(F(*Q4), F(*Q4), F(*Q4, dtype="float16")),
            TypeError,
            "v: expected float32",
        ),
        (
            lambda: cuda.attention(F(*Q4), F(*Q4), F(*Q4), key_lengths=[5, 6]),
            ValueError,
            "key_lengths: value 6",
        ),
        (
            lambda: cuda.attention(F(*Q4), F(*Q4), F(*Q4), key_lengths=[5]),
            ValueError,
            "key_lengths: expected shape",
        ),
        (
            lambda: cuda.attention(F(*Q4), F(*Q4), F(*Q4), key_lengths=[1.0, 2.0]),
            TypeError,
            "key_lengths",
        ),
        (
            lambda: cuda.attention(F(*Q4), F(*Q4), F(*Q4), key_lengths=F(2, dtype="int32")),
            TypeError,
            "host",
        ),
        (
            lambda: cuda.attention(F(*Q4), F(*Q4), F(*Q4), query_offset=-1),
            ValueError,
            "query_offset",
        ),
        (lambda: cuda.attention(F(*Q4), F(*Q4), F(*Q4), scale=float("nan")), ValueError, "scale"),
        (
            lambda: cuda.attention_backward(
                F(2, 5, 3, 7), F(*Q4), F(*Q4), F(*Q4), F(*Q4), F(2, 3, 5)
            ),
            ValueError,
            "dout",
        ),
        (
            lambda: cuda.attention_backward(F(*Q4), F(*Q4), F(*Q4), F(*Q4), F(*Q4), F(2, 5, 3)),
            ValueError,
            "lse",
        ),
    ],
)
def test_attention_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_attention_accepts_strided_views(no_extension):
    # q, k, v as views into one fused (B, L, 3, H, D) projection: strides are not C-contiguous.
    B, L, H, D = 2, 5, 3, 8
    fused = (L * 3 * H * D, 3 * H * D, D, 1)
    q, k, v = (F(B, L, H, D, strides=fused, ptr=0x10000 + 4 * i * H * D) for i in range(3))
    with pytest.raises(RuntimeError, match="not built"):
        cuda.attention(q, k, v, key_lengths=np.array([5, 0]), causal=True, query_offset=2)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: cuda.softmax_cross_entropy(F(4, 5), F(4, dtype="float32")),
            TypeError,
            "targets: expected int32",
        ),
        (
            lambda: cuda.softmax_cross_entropy(F(4, 5), F(3, dtype="int64")),
            ValueError,
            "targets: expected shape",
        ),
        (
            lambda: cuda.softmax_cross_entropy(F(4, 5, 1), F(4, dtype="int64")),
            ValueError,
            "logits: expected a 2-D",
        ),
        (
            lambda: cuda.softmax_cross_entropy(F(0, 5), F(0, dtype="int64")),
            ValueError,
            "logits: empty",
        ),
        (
            lambda: cuda.softmax_cross_entropy(F(4, 5), F(4, dtype="int64"), label_smoothing=1.5),
            ValueError,
            "label_smoothing",
        ),
        (
            lambda: cuda.softmax_cross_entropy(
                F(4, 5, readonly=True), F(4, dtype="int64"), inplace=True
            ),
            ValueError,
            "read-only",
        ),
        (
            lambda: cuda.adam_step(F(3, 4), F(3, 4), F(3, 4), F(4, 3), lr=1e-3, step=1),
            ValueError,
            "v: expected shape",
        ),
        (
            lambda: cuda.adam_step(F(3, 4), F(3, 4), F(3, 4), F(3, 4), lr=1e-3, step=0),
            ValueError,
            "step",
        ),
        (
            lambda: cuda.adam_step(
                F(3, 4), F(3, 4, dtype="float64"), F(3, 4), F(3, 4), lr=1e-3, step=1
            ),
            TypeError,
            "grad",
        ),
        (
            lambda: cuda.adam_step(F(3, 4), F(3, 4), F(3, 4), F(3, 4), lr=1e-3, beta2=1.0, step=1),
            ValueError,
            "beta",
        ),
        (
            lambda: cuda.adam_step(F(3, 4), F(3, 4), F(3, 4), F(3, 4), lr=float("inf"), step=1),
            ValueError,
            "lr",
        ),
    ],
)
def test_loss_and_optimizer_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------- GPU against the CPU ops


def _array_lib() -> str | None:
    """The library that moves test arrays to the device: torch with CUDA, else CuPy, else None."""
    if torch is not None and torch.cuda.is_available():
        return "torch"
    try:
        import cupy

        return "cupy" if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # not installed, or no driver
        return None


GPU_LIB = _array_lib() if cuda.is_available() else None
gpu = pytest.mark.skipif(
    GPU_LIB is None, reason="needs pytransformer._cuda, a CUDA device and torch with CUDA or CuPy"
)


def test_gpu_tests_run_where_required():
    # On the GPU machine a missing torch/CuPy or a broken build would silently skip every test.
    if os.environ.get("PYTRANSFORMER_REQUIRE_GPU") == "1":
        assert GPU_LIB is not None, "PYTRANSFORMER_REQUIRE_GPU=1 but the GPU tests would skip"


def to_gpu(x: np.ndarray):
    x = np.ascontiguousarray(x)
    if GPU_LIB == "torch":
        return torch.from_numpy(x).cuda()
    import cupy

    return cupy.asarray(x)


def to_np(t) -> np.ndarray:
    cuda.synchronize()
    return t.cpu().numpy() if GPU_LIB == "torch" else t.get()


def c_contiguous(t) -> bool:
    return cuda._interface(t, "t").c_contiguous()


def randn(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@gpu
@pytest.mark.parametrize("naive", [False, True])
@pytest.mark.parametrize(
    ("batch", "M", "N", "K"),
    [(None, 1, 1, 1), (None, 65, 130, 17), (None, 128, 64, 256), (3, 33, 70, 40), (2, 7, 5, 0)],
)
@pytest.mark.parametrize(
    ("trans_a", "trans_b"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_matmul_matches_cpu(rng, naive, batch, M, N, K, trans_a, trans_b):
    lead = () if batch is None else (batch,)
    a = randn(rng, *lead, *((K, M) if trans_a else (M, K)))
    b = randn(rng, *lead, *((N, K) if trans_b else (K, N)))
    bias = randn(rng, N)
    for activation in (None, "relu", "gelu"):
        want = ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=activation)
        got = cuda.matmul(to_gpu(a), to_gpu(b), trans_a=trans_a, trans_b=trans_b, bias=to_gpu(bias),
                          activation=activation, naive=naive)  # fmt: skip
        exact = ref.matmul(a, b, trans_a, trans_b, bias=bias, activation=activation)
        np.testing.assert_allclose(to_np(got), want, rtol=1e-4, atol=1e-4 * max(1, K) ** 0.5)
        np.testing.assert_allclose(to_np(got), exact, rtol=1e-4, atol=1e-4 * max(1, K) ** 0.5)


@gpu
@pytest.mark.parametrize(
    ("batch", "M", "N", "K", "trans_a", "trans_b", "activation"),
    [
        (None, 4096, 512, 512, False, False, None),
        (None, 2048, 1536, 512, False, True, "gelu"),  # a feed-forward layer: x @ W^T + b
        (None, 3000, 512, 1536, False, True, "relu"),
        (3, 1000, 257, 130, True, False, None),
    ],
)
def test_matmul_realistic_sizes_against_float64(rng, batch, M, N, K, trans_a, trans_b, activation):
    lead = () if batch is None else (batch,)
    a = randn(rng, *lead, *((K, M) if trans_a else (M, K)))
    b = randn(rng, *lead, *((N, K) if trans_b else (K, N)))
    bias = randn(rng, N)
    got = cuda.matmul(to_gpu(a), to_gpu(b), trans_a=trans_a, trans_b=trans_b, bias=to_gpu(bias),
                      activation=activation)  # fmt: skip
    want = ref.matmul(a, b, trans_a, trans_b, bias=bias, activation=activation)
    np.testing.assert_allclose(to_np(got), want, rtol=1e-4, atol=1e-4 * K**0.5)


@gpu
def test_matmul_accumulate_and_broadcast(rng):
    a = randn(rng, 4, 37, 19)
    w = randn(rng, 23, 19)
    out = randn(rng, 4, 37, 23)
    bias = randn(rng, 23)
    want = out + ops.matmul(a, w, trans_b=True, bias=bias)
    got = to_gpu(out)
    assert (
        cuda.matmul(to_gpu(a), to_gpu(w), trans_b=True, bias=to_gpu(bias), out=got, accumulate=True)
        is got
    )
    np.testing.assert_allclose(to_np(got), want, rtol=1e-4, atol=1e-4)
    # a 2-D a broadcast over a 3-D b
    a2 = randn(rng, 6, 19)
    b3 = randn(rng, 3, 19, 8)
    np.testing.assert_allclose(
        to_np(cuda.matmul(to_gpu(a2), to_gpu(b3))), ops.matmul(a2, b3), rtol=1e-4, atol=1e-4
    )


@gpu
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 4, 256), (9, 1000), (2, 1537)])
def test_layer_norm_matches_cpu(rng, shape):
    x = randn(rng, *shape) * 3 + 5
    gamma, beta = randn(rng, shape[-1]), randn(rng, shape[-1])
    y, mean, rstd = ops.layer_norm(x, gamma, beta, 1e-5, return_stats=True)
    gy, gmean, grstd = cuda.layer_norm(
        to_gpu(x), to_gpu(gamma), to_gpu(beta), 1e-5, return_stats=True
    )
    np.testing.assert_allclose(to_np(gy), y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_np(gmean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(grstd), rstd, rtol=1e-4, atol=1e-5)
    dy = randn(rng, *shape)
    want = ops.layer_norm_backward(dy, x, gamma, mean, rstd)
    got = cuda.layer_norm_backward(to_gpu(dy), to_gpu(x), to_gpu(gamma), gmean, grstd)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(to_np(g), w, rtol=1e-3, atol=1e-3)
    check_layer_norm_against_float64(x, gamma, beta, dy, (gy, gmean, grstd), got)


def check_layer_norm_against_float64(x, gamma, beta, dy, forward, backward) -> None:
    """The GPU's (y, mean, rstd) and (dx, dgamma, dbeta) against reference.py in float64."""
    y, mean, rstd = ref.layer_norm(x, gamma, beta, 1e-5)
    for got, want in zip(forward, (y, mean, rstd), strict=True):
        np.testing.assert_allclose(to_np(got), want, rtol=1e-4, atol=1e-4)
    # dgamma, dbeta are sums over all rows: their error grows with sqrt(rows)
    sum_atol = 1e-4 * (x.size // x.shape[-1]) ** 0.5
    want = ref.layer_norm_backward(dy, x, gamma, 1e-5)
    for got, w, atol in zip(backward, want, (1e-4, sum_atol, sum_atol), strict=True):
        np.testing.assert_allclose(to_np(got), w, rtol=1e-4, atol=atol)


@gpu
@pytest.mark.parametrize("C", [40, 80, 512, 1024])
@pytest.mark.parametrize("N", [4096, 10007])
def test_layer_norm_realistic_sizes_against_float64(rng, N, C):
    """Thousands of rows (the backward's parameter gradients reduce over many row chunks, a
    last chunk partly filled at N = 10007) and C = 40, 80 (a partly filled second 32-column
    tile), against the float64 reference; the parameter gradients are the same bits twice."""
    x = randn(rng, N, C) * 3 + 5
    gamma, beta, dy = randn(rng, C), randn(rng, C), randn(rng, N, C)
    gx, gg, gdy = to_gpu(x), to_gpu(gamma), to_gpu(dy)
    forward = cuda.layer_norm(gx, gg, to_gpu(beta), 1e-5, return_stats=True)
    backward = cuda.layer_norm_backward(gdy, gx, gg, forward[1], forward[2])
    check_layer_norm_against_float64(x, gamma, beta, dy, forward, backward)
    again = cuda.layer_norm_backward(gdy, gx, gg, forward[1], forward[2])
    for first, second in zip(backward, again, strict=True):
        assert to_np(first).tobytes() == to_np(second).tobytes()


@gpu
@pytest.mark.parametrize("naive", [False, True])
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_k0_gives_bias(rng, naive, batch, accumulate):
    """K = 0: a and b are empty (null pointers from torch and CuPy); out = act(bias), or
    out + bias when accumulating."""
    lead = () if batch is None else (batch,)
    a, b = np.zeros((*lead, 37, 0), np.float32), np.zeros((*lead, 0, 70), np.float32)
    bias, start = randn(rng, 70), randn(rng, *lead, 37, 70)
    for activation in [None] if accumulate else [None, "relu", "gelu"]:
        out = to_gpu(start) if accumulate else None
        got = cuda.matmul(to_gpu(a), to_gpu(b), bias=to_gpu(bias), activation=activation,
                          out=out, accumulate=accumulate, naive=naive)  # fmt: skip
        want = ref.matmul(a, b, bias=bias, activation=activation, out=start if accumulate else None)
        np.testing.assert_allclose(to_np(got), want, rtol=1e-6, atol=1e-6)


@gpu
@pytest.mark.parametrize("naive", [False, True])
def test_relu_keeps_nan(rng, naive):
    """NaN through the ReLU epilogue stays NaN (as on the CPU), it does not become 0."""
    a, b, bias = randn(rng, 70, 33), randn(rng, 33, 65), randn(rng, 65)
    a[3, 5] = np.nan  # row 3 of the product
    bias[7] = np.nan  # column 7
    got = to_np(cuda.matmul(to_gpu(a), to_gpu(b), bias=to_gpu(bias), activation="relu",
                            naive=naive))  # fmt: skip
    want = ref.matmul(a, b, bias=bias, activation="relu")
    assert np.isnan(want).sum() == 70 + 65 - 1
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.isnan(ops.matmul(a, b, bias=bias, activation="relu")),
                                  np.isnan(want))  # fmt: skip


@gpu
@settings(max_examples=40, deadline=None)
@given(
    batch=st.sampled_from([None, 1, 3]),
    M=st.integers(1, 150),
    N=st.integers(1, 150),
    K=st.integers(0, 150),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
)
def test_matmul_shapes_property(batch, M, N, K, trans_a, trans_b):
    rng = np.random.default_rng(M * 10007 + N * 101 + K)
    lead = () if batch is None else (batch,)
    a = randn(rng, *lead, *((K, M) if trans_a else (M, K)))
    b = randn(rng, *lead, *((N, K) if trans_b else (K, N)))
    want = ref.matmul(a, b, trans_a, trans_b)
    got = cuda.matmul(to_gpu(a), to_gpu(b), trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(to_np(got), want, rtol=1e-4, atol=1e-4 * max(1, K) ** 0.5)


def fused_qkv(rng, B, Lq, Lk, H, D):
    """q from its own array, k and v as strided views into one fused (B, Lk, 2, H, D) tensor."""
    q = randn(rng, B, Lq, H, D)
    kv = randn(rng, B, Lk, 2, H, D)
    tkv = to_gpu(kv)
    return q, kv[:, :, 0], kv[:, :, 1], to_gpu(q), tkv[:, :, 0], tkv[:, :, 1]


def check_attention(rng, B, Lq, Lk, H, D, kw, against_cpu=True) -> None:
    """GPU forward and backward against the float64 reference (and the CPU ops when asked)."""
    q, k, v, gq, gk, gv = fused_qkv(rng, B, Lq, Lk, H, D)
    dout = randn(rng, B, Lq, H, D)
    gout, glse = cuda.attention(gq, gk, gv, return_lse=True, **kw)
    grads = cuda.attention_backward(to_gpu(dout), gq, gk, gv, gout, glse, **kw)
    assert all(c_contiguous(g) for g in grads)
    got = [to_np(t) for t in (gout, glse, *grads)]
    wants = [(*ref.attention(q, k, v, **kw), *ref.attention_backward(dout, q, k, v, **kw))]
    if against_cpu:
        out, lse = ops.attention(q, k, v, return_lse=True, **kw)
        wants.append((out, lse, *ops.attention_backward(dout, q, k, v, out, lse, **kw)))
    tolerances = [(1e-4, 1e-5), (1e-5, 1e-5)] + [(1e-3, 1e-4)] * 3
    for want in wants:
        for g, w, (rtol, atol) in zip(got, want, tolerances, strict=True):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def key_lengths(rng, B, Lk):
    lengths = rng.integers(0, Lk + 1, size=B)
    lengths[0] = 0  # a fully masked batch item: zeros out, -inf lse, zero grads
    return lengths


@gpu
@pytest.mark.parametrize(
    ("B", "Lq", "Lk", "H", "D"),
    [(1, 1, 1, 1, 1), (2, 7, 9, 3, 16), (2, 33, 70, 2, 40), (2, 33, 70, 2, 64), (2, 9, 45, 3, 80),
     (1, 5, 40, 1, 128)],
)  # fmt: skip
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("causal", "query_offset"), [(False, 0), (True, 0), (True, 3)])
def test_attention_matches_float64_and_cpu(rng, B, Lq, Lk, H, D, masked, causal, query_offset):
    # D = 40 and 80: the accumulators' second (or third) 32-lane chunk is partly filled
    lengths = key_lengths(rng, B, Lk) if masked else None
    kw = dict(key_lengths=lengths, causal=causal, query_offset=query_offset)
    check_attention(rng, B, Lq, Lk, H, D, kw)


@gpu
@pytest.mark.parametrize("D", [40, 64, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_realistic_sizes_against_float64(rng, D, causal):
    """Hundreds of queries and keys over many 32-key tiles, several heads, padded batch items."""
    B, Lq, Lk, H = 4, 256, 300, 4
    kw = dict(key_lengths=key_lengths(rng, B, Lk), causal=causal, query_offset=Lk - Lq)
    check_attention(rng, B, Lq, Lk, H, D, kw, against_cpu=False)


@gpu
@pytest.mark.parametrize(("N", "V"), [(1, 1), (7, 5), (64, 1000), (3, 3001)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("inplace", [False, True])
def test_softmax_cross_entropy_matches_cpu(rng, N, V, smoothing, dtype, inplace):
    logits = randn(rng, N, V) * 4
    targets = rng.integers(0, V, size=N).astype(dtype)
    targets[rng.random(N) < 0.3] = -100
    want_loss, want_grad = ops.softmax_cross_entropy(logits, targets, label_smoothing=smoothing)
    glogits = to_gpu(logits)
    loss, grad = cuda.softmax_cross_entropy(
        glogits, to_gpu(targets), label_smoothing=smoothing, inplace=inplace
    )
    assert (grad is glogits) == inplace
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(to_np(grad), want_grad, rtol=1e-4, atol=1e-7)
    exact_loss, exact_grad = ref.softmax_cross_entropy(logits, targets, smoothing)
    assert loss == pytest.approx(exact_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(to_np(grad), exact_grad, rtol=1e-4, atol=1e-7)


@gpu
def test_softmax_cross_entropy_all_ignored_and_bad_target(rng):
    logits = randn(rng, 4, 6)
    loss, grad = cuda.softmax_cross_entropy(to_gpu(logits), to_gpu(np.full(4, -100, np.int64)))
    assert loss == 0.0
    assert not to_np(grad).any()
    with pytest.raises(IndexError, match="row 2"):
        cuda.softmax_cross_entropy(to_gpu(logits), to_gpu(np.array([0, 5, 6, -1], np.int64)))


@gpu
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_adam_step_matches_cpu(rng, decoupled, n):
    param, grad = randn(rng, n), randn(rng, n)
    m, v = randn(rng, n) * 0.1, np.abs(randn(rng, n)) * 0.01
    gp, gg, gm, gv = (to_gpu(x) for x in (param, grad, m, v))
    kw = dict(lr=1e-2, weight_decay=0.05, decoupled=decoupled)
    exact = (param, m, v)
    for step in (1, 2, 3):
        exact = ref.adam_step(*exact[:1], grad, *exact[1:], beta1=0.9, beta2=0.98, eps=1e-9,
                              step=step, **kw)  # fmt: skip
        ops.adam_step(param, grad, m, v, step=step, **kw)
        cuda.adam_step(gp, gg, gm, gv, step=step, **kw)
    for g, w, e in zip((gp, gm, gv), (param, m, v), exact, strict=True):
        np.testing.assert_allclose(to_np(g), w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(to_np(g), e, rtol=1e-4, atol=1e-5)  # as the CPU's fuzz test


# ---------------------------------------------------------------- streams and the scratch pool


def side_stream():
    """(context that makes a new non-default stream current, its cudaStream_t handle)."""
    if GPU_LIB == "torch":
        s = torch.cuda.Stream()
        return torch.cuda.stream(s), s.cuda_stream
    import cupy

    s = cupy.cuda.Stream(non_blocking=True)
    return s, s.ptr


@gpu
def test_key_lengths_are_copied_on_the_callers_stream(rng):
    """Thirty calls queued back to back on a side stream, each with its own key lengths and no
    wait in between: every result matches the float64 reference for its own lengths, so no
    call read lengths staged for another (the pinned staging block outlives its copy)."""
    B, Lq, Lk, H, D = 3, 17, 40, 2, 40
    q, k, v = randn(rng, B, Lq, H, D), randn(rng, B, Lk, H, D), randn(rng, B, Lk, H, D)
    all_lengths = [rng.integers(0, Lk + 1, size=B) for _ in range(30)]
    context, handle = side_stream()
    with context:
        gq, gk, gv = to_gpu(q), to_gpu(k), to_gpu(v)
        outs = [cuda.attention(gq, gk, gv, key_lengths=n, stream=handle) for n in all_lengths]
    for n, got in zip(all_lengths, outs, strict=True):
        want, _ = ref.attention(q, k, v, key_lengths=n)
        np.testing.assert_allclose(to_np(got), want, rtol=1e-4, atol=1e-5)


@gpu
def test_scratch_pool_reuses_its_blocks(rng):
    """After a warm-up call, repeated calls of the same sizes take their scratch (device blocks
    and pinned staging) from the pool: no new allocation, nothing left lent."""
    B, Lq, Lk, H, D = 2, 33, 70, 2, 64
    q, k, v, gq, gk, gv = fused_qkv(rng, B, Lq, Lk, H, D)
    lengths = np.array([70, 31])
    logits, targets = to_gpu(randn(rng, 64, 100)), to_gpu(rng.integers(0, 100, 64))
    x, gamma = to_gpu(randn(rng, 300, 80)), to_gpu(randn(rng, 80))
    _, mean, rstd = cuda.layer_norm(x, gamma, gamma, return_stats=True)

    def calls():
        out, lse = cuda.attention(gq, gk, gv, key_lengths=lengths, return_lse=True)
        cuda.synchronize()  # the forward's pinned staging block is free again: it is reused
        cuda.attention_backward(out, gq, gk, gv, out, lse, key_lengths=lengths)
        cuda.softmax_cross_entropy(logits, targets)
        cuda.layer_norm_backward(x, x, gamma, mean, rstd)
        cuda.synchronize()

    calls()
    before = cuda.memory_pool_stats()
    for _ in range(20):
        calls()
    after = cuda.memory_pool_stats()
    for kind in ("device", "pinned_host"):
        assert after[kind]["allocations"] == before[kind]["allocations"], kind
        assert after[kind]["reuses"] >= before[kind]["reuses"] + 20, kind
        assert after[kind]["lent_blocks"] == 0, kind
    cuda.empty_memory_pool()
    assert cuda.memory_pool_stats()["device"]["cached_bytes"] == 0
