"""pytransformer.cuda: argument checking (runs everywhere) and GPU kernels against the CPU ops.

The GPU tests need the extension built with -DPYTRANSFORMER_CUDA=ON, a CUDA device and PyTorch
with CUDA (used to move arrays to and from the device); without them they skip.
"""

from __future__ import annotations

import numpy as np
import pytest

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


def test_is_available_matches_the_build():
    if cuda._ext is None:
        assert not cuda.is_available()
    else:
        assert cuda.is_available() == (cuda._ext.device_count() > 0)


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
        ((F(2, 3), F(3, 4)), {"stream": -1}, TypeError, "stream"),
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


# ------------------------------------------------------------------------- GPU against the CPU ops


def _gpu_ready() -> bool:
    return cuda.is_available() and torch is not None and torch.cuda.is_available()


gpu = pytest.mark.skipif(
    not _gpu_ready(), reason="needs pytransformer._cuda, a CUDA device and torch with CUDA"
)


def to_gpu(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x)).cuda()


def to_np(t) -> np.ndarray:
    torch.cuda.synchronize()
    return t.cpu().numpy()


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
        np.testing.assert_allclose(to_np(got), want, rtol=1e-4, atol=1e-4 * max(1, K) ** 0.5)


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
