"""Optional CUDA kernels: the contracts of :mod:`pytransformer.ops` on GPU arrays.

Built only with ``-DPYTRANSFORMER_CUDA=ON`` (``pip install . --config-settings=
cmake.define.PYTRANSFORMER_CUDA=ON``), as the extension ``pytransformer._cuda``. Arrays are taken
without copies through ``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors, Numba
device arrays); new outputs are allocated with the library of the first array argument (CuPy or
PyTorch), on its device. Kernels are queued on the legacy default stream (what PyTorch and CuPy use
unless told otherwise) or on the stream handle passed as ``stream=``; like any CUDA call they
return before the GPU is done, except :func:`softmax_cross_entropy` which returns the loss as a
Python float and so waits. Everything a call needs besides its arrays is ordered on that same
stream: host key lengths are copied with cudaMemcpyAsync from pinned staging memory, and
scratch buffers come from a per-device pool (:func:`memory_pool_stats`) instead of
cudaMalloc/cudaFree, which would synchronise the device.

Inputs are validated here (dtype, rank, shape, contiguity, value ranges), before any work on the
device: TypeError / ValueError / IndexError name the argument, as in :mod:`pytransformer.ops`.
When the extension is not built or no CUDA device is present, :func:`is_available` is False and
every kernel call raises RuntimeError after its arguments are checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .checks import check_bool, check_float, check_int

try:
    from . import _cuda as _ext
except ImportError as exc:  # the default, CPU-only build
    _ext = None
    _IMPORT_ERROR: str = str(exc)
else:
    _IMPORT_ERROR = ""

__all__ = [
    "is_available",
    "device_count",
    "synchronize",
    "matmul",
    "layer_norm",
    "layer_norm_backward",
    "attention",
    "attention_backward",
    "softmax_cross_entropy",
    "adam_step",
    "memory_pool_stats",
    "empty_memory_pool",
]

ATTN_MAX_D = 128  # head dimension limit of the attention kernels (kAttnMaxD in csrc/cuda/kernels.h)
_INT32_MAX = 2**31 - 1
_GEMM_MAX_ROWS = 65535 * 64  # grid.y limit times the row tile of the SGEMM kernel
_ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2}


def device_count() -> int:
    """Number of CUDA devices the extension sees (0 when it is not built or there is no driver)."""
    return 0 if _ext is None else int(_ext.device_count())


def is_available() -> bool:
    """True when ``pytransformer._cuda`` is built and at least one CUDA device is present."""
    return device_count() > 0


def _module() -> Any:
    """The extension, or RuntimeError saying why the kernels cannot run."""
    if _ext is None:
        raise RuntimeError(
            "pytransformer.cuda: the CUDA extension pytransformer._cuda is not built "
            f"({_IMPORT_ERROR}); rebuild with -DPYTRANSFORMER_CUDA=ON on a machine with nvcc"
        )
    if _ext.device_count() == 0:
        raise RuntimeError("pytransformer.cuda: no CUDA device is available")
    return _ext


def synchronize() -> None:
    """Waits for every queued kernel on the current device; RuntimeError on a device error."""
    _module().synchronize()


def memory_pool_stats() -> dict[str, dict[str, int]]:
    """The scratch-memory pool of the current device, per kind ("device", "pinned_host").

    The kernels take their temporary buffers (attention's row sums, layer norm's partial
    column sums, the cross-entropy's per-row losses, the key lengths and their pinned host
    staging) from a small per-device cache instead of cudaMalloc/cudaFree on every call, which
    synchronise the device. Each kind reports ``allocations`` (blocks made so far), ``reuses``
    (blocks lent from the cache), ``cached_bytes`` (held now) and ``lent_blocks`` (in use now).
    At most 64 MiB per kind stay cached. See csrc/cuda/pool.h for the ordering rules.
    """
    stats = _module().memory_pool_stats()
    return {kind: {k: int(v) for k, v in d.items()} for kind, d in stats.items()}


def empty_memory_pool() -> None:
    """Frees the cached scratch blocks of the current device (waits for work that used them)."""
    _module().empty_memory_pool()


@dataclass
class _Array:
    """What the kernels need from one ``__cuda_array_interface__`` object."""

    obj: Any
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    strides: tuple[int, ...]  # in elements
    readonly: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def c_contiguous(self) -> bool:
        expect = 1
        for n, s in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True


def _interface(obj: Any, name: str) -> _Array:
    """Reads ``obj.__cuda_array_interface__``; TypeError naming ``name`` when it has none."""
    try:
        iface = obj.__cuda_array_interface__
    except AttributeError:
        raise TypeError(
            f"{name}: expected a CUDA array (CuPy array or PyTorch CUDA tensor), "
            f"got {type(obj).__name__}"
        ) from None
    except RuntimeError as exc:  # e.g. a torch tensor that requires grad
        raise TypeError(f"{name}: cannot export the CUDA array interface: {exc}") from None
    shape = tuple(int(n) for n in iface["shape"])
    dtype = np.dtype(iface["typestr"])
    ptr, readonly = iface["data"]
    raw = iface.get("strides")
    if raw is None:
        strides, expect = [], 1
        for n in reversed(shape):
            strides.append(expect)
            expect *= n
        elem = tuple(reversed(strides))
    else:
        if any(s % dtype.itemsize for s in raw):
            raise ValueError(f"{name}: strides {tuple(raw)} are not multiples of the item size")
        elem = tuple(int(s) // dtype.itemsize for s in raw)
    return _Array(obj, int(ptr or 0), shape, dtype, elem, bool(readonly))


def _f32(
    obj: Any, name: str, ndims: tuple[int, ...], *, contiguous: bool = True, writable: bool = False
) -> _Array:
    """A float32 CUDA array of one of the ranks ``ndims``, C-contiguous unless told otherwise."""
    arr = _interface(obj, name)
    if arr.dtype != np.float32:
        raise TypeError(f"{name}: expected float32, got {arr.dtype}")
    if len(arr.shape) not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}: expected a {want} array, got shape {arr.shape}")
    if contiguous and not arr.c_contiguous():
        raise ValueError(
            f"{name}: must be C-contiguous (shape {arr.shape}, strides {arr.strides} elements)"
        )
    if writable and arr.readonly:
        raise ValueError(f"{name}: array is read-only")
    return arr


def _require_shape(arr: _Array, name: str, shape: tuple[int, ...]) -> None:
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")


def _require_nonempty(arr: _Array, name: str) -> None:
    if arr.size == 0:
        raise ValueError(f"{name}: empty array (shape {arr.shape})")


def _require_int32_range(name: str, value: int) -> None:
    if value > _INT32_MAX:
        raise ValueError(f"{name}: {value} exceeds the kernels' int32 limit")


def _empty(ref: Any, shape: tuple[int, ...], name: str, zero: bool = False) -> Any:
    """A new float32 C-contiguous array of ``shape`` from the library of ``ref``, on its device."""
    lib = type(ref).__module__.split(".")[0]
    if lib == "torch":
        import torch

        make = torch.zeros if zero else torch.empty
        return make(shape, dtype=torch.float32, device=ref.device)
    if lib == "cupy":
        import cupy

        with cupy.cuda.Device(ref.device.id):
            return (cupy.zeros if zero else cupy.empty)(shape, dtype=cupy.float32)
    raise TypeError(
        f"{name}: cannot allocate an output like a {type(ref).__name__}; "
        "use CuPy arrays or PyTorch CUDA tensors"
    )


def _overlaps(x: _Array, y: _Array) -> bool:
    """Whether the byte ranges of two C-contiguous arrays intersect."""
    x_end = x.ptr + x.size * x.dtype.itemsize
    y_end = y.ptr + y.size * y.dtype.itemsize
    return x.size > 0 and y.size > 0 and x.ptr < y_end and y.ptr < x_end


def _stream(stream: int) -> int:
    return check_int("stream (a cudaStream_t handle)", stream, 0)


# --------------------------------------------------------------------------------------------- GEMM


def matmul(
    a: Any,
    b: Any,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    bias: Any | None = None,
    activation: Literal["relu", "gelu"] | None = None,
    out: Any | None = None,
    accumulate: bool = False,
    naive: bool = False,
    stream: int = 0,
) -> Any:
    """``act(op(a) @ op(b) + bias)`` or ``out += op(a) @ op(b) + bias`` on the GPU (see ops.matmul).

    a is (M, K) / (batch, M, K) as stored, or (K, M) / (batch, K, M) with ``trans_a``; b is
    (K, N) / (batch, K, N), or (N, K) / (batch, N, K) with ``trans_b``. A 2-D operand is broadcast
    over the batch of a 3-D one. Unlike the CPU op, a and b must be C-contiguous (express a
    transposed view with ``trans_a`` / ``trans_b``). ``naive=True`` runs the one-thread-per-output
    oracle kernel instead of the tiled one. Returns ``out`` (allocated when not given).
    """
    A = _f32(a, "a", (2, 3))
    B = _f32(b, "b", (2, 3))
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected None, 'relu' or 'gelu', got {activation!r}")
    if accumulate and activation is not None:
        raise ValueError("activation: not allowed with accumulate=True")
    if accumulate and out is None:
        raise ValueError("out: accumulate=True needs out")
    M, Ka = (A.shape[-1], A.shape[-2]) if trans_a else (A.shape[-2], A.shape[-1])
    Kb, N = (B.shape[-1], B.shape[-2]) if trans_b else (B.shape[-2], B.shape[-1])
    if Ka != Kb:
        raise ValueError(f"a, b: inner dimensions differ: op(a) is {(M, Ka)}, op(b) is {(Kb, N)}")
    batch_sizes = [X.shape[0] for X in (A, B) if len(X.shape) == 3]
    if len(batch_sizes) == 2 and batch_sizes[0] != batch_sizes[1]:
        raise ValueError(f"a, b: batch sizes differ: a {A.shape}, b {B.shape}")
    three_d = bool(batch_sizes)
    batch = batch_sizes[0] if three_d else 1
    for label, value in (("M", M), ("N", N), ("K", Ka), ("batch", batch)):
        _require_int32_range(f"a, b: {label}", value)
    if M > _GEMM_MAX_ROWS:
        raise ValueError(f"a: M = {M} exceeds the kernel's limit of {_GEMM_MAX_ROWS} rows")
    stride_a = M * Ka if len(A.shape) == 3 else 0
    stride_b = Ka * N if len(B.shape) == 3 else 0
    if bias is not None:
        Bias = _f32(bias, "bias", (1,))
        _require_shape(Bias, "bias", (N,))
    out_shape = (batch, M, N) if three_d else (M, N)
    if out is not None:
        Out = _f32(out, "out", (len(out_shape),), writable=True)
        _require_shape(Out, "out", out_shape)
        others = [(A, "a"), (B, "b")] + ([(Bias, "bias")] if bias is not None else [])
        for other, label in others:
            if _overlaps(Out, other):
                raise ValueError(f"out: shares memory with {label}")
    stream = _stream(stream)
    ext = _module()
    if out is None:
        out = _empty(a, out_shape, "out")
        Out = _interface(out, "out")
    if batch * M * N == 0:
        return out
    ext.matmul(
        Out.ptr, A.ptr, B.ptr, 0 if bias is None else Bias.ptr, batch, M, N, Ka, stride_a, stride_b,
        bool(trans_a), bool(trans_b), bool(accumulate), _ACTIVATIONS[activation], bool(naive),
        stream,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ layer norm


def _rows(x: _Array, name: str) -> tuple[int, int]:
    """(rows, C) of a (..., C) array, checked non-empty and within the kernels' limits."""
    _require_nonempty(x, name)
    C = x.shape[-1]
    _require_int32_range(f"{name}: C", C)
    return x.size // C, C


def layer_norm(
    x: Any, gamma: Any, beta: Any, eps: float = 1e-5, *, return_stats: bool = False, stream: int = 0
) -> Any:
    """Layer norm over the last axis (see ops.layer_norm); x (..., C) C-contiguous, gamma/beta (C,).

    Returns y, or ``(y, mean, rstd)`` with mean, rstd of shape ``x.shape[:-1]``.
    """
    X = _f32(x, "x", tuple(range(1, 9)))
    N, C = _rows(X, "x")
    G = _f32(gamma, "gamma", (1,))
    Be = _f32(beta, "beta", (1,))
    _require_shape(G, "gamma", (C,))
    _require_shape(Be, "beta", (C,))
    check_float("eps", eps, 0.0)
    stream = _stream(stream)
    ext = _module()
    y = _empty(x, X.shape, "y")
    mean = _empty(x, X.shape[:-1], "mean")
    rstd = _empty(x, X.shape[:-1], "rstd")
    ext.layer_norm(
        _interface(y, "y").ptr, _interface(mean, "mean").ptr, _interface(rstd, "rstd").ptr,
        X.ptr, G.ptr, Be.ptr, N, C, float(eps), stream,
    )  # fmt: skip
    return (y, mean, rstd) if return_stats else y


def layer_norm_backward(
    dy: Any, x: Any, gamma: Any, mean: Any, rstd: Any, *, stream: int = 0
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`layer_norm`: ``(dx, dgamma, dbeta)``; dgamma, dbeta new (C,) arrays."""
    X = _f32(x, "x", tuple(range(1, 9)))
    N, C = _rows(X, "x")
    Dy = _f32(dy, "dy", (len(X.shape),))
    _require_shape(Dy, "dy", X.shape)
    G = _f32(gamma, "gamma", (1,))
    _require_shape(G, "gamma", (C,))
    Mean = _f32(mean, "mean", (len(X.shape) - 1,))
    _require_shape(Mean, "mean", X.shape[:-1])
    Rstd = _f32(rstd, "rstd", (len(X.shape) - 1,))
    _require_shape(Rstd, "rstd", X.shape[:-1])
    stream = _stream(stream)
    ext = _module()
    dx = _empty(x, X.shape, "dx")
    dgamma = _empty(x, (C,), "dgamma")
    dbeta = _empty(x, (C,), "dbeta")
    ext.layer_norm_backward(
        _interface(dx, "dx").ptr, _interface(dgamma, "dgamma").ptr, _interface(dbeta, "dbeta").ptr,
        Dy.ptr, X.ptr, G.ptr, Mean.ptr, Rstd.ptr, N, C, stream,
    )  # fmt: skip
    return dx, dgamma, dbeta


# ------------------------------------------------------------------------------------- attention


@dataclass
class _AttnArgs:
    q: _Array
    k: _Array
    v: _Array
    B: int
    Lq: int
    Lk: int
    H: int
    D: int
    lengths: list[int]
    causal: bool
    query_offset: int
    scale: float


def _check_attention(
    q: Any, k: Any, v: Any, key_lengths: Any, causal: bool, query_offset: int, scale: float | None
) -> _AttnArgs:
    """Checks q, k, v (any strides), key_lengths (host ints in [0, Lk]) and the flags."""
    Q = _f32(q, "q", (4,), contiguous=False)
    K = _f32(k, "k", (4,), contiguous=False)
    V = _f32(v, "v", (4,), contiguous=False)
    for arr, name in ((Q, "q"), (K, "k"), (V, "v")):
        _require_nonempty(arr, name)
    B, Lq, H, D = Q.shape
    Lk = K.shape[1]
    _require_shape(K, "k", (B, Lk, H, D))
    _require_shape(V, "v", (B, Lk, H, D))
    if D > ATTN_MAX_D:
        raise ValueError(f"q: head dimension {D} exceeds the CUDA kernels' limit of {ATTN_MAX_D}")
    if B > 65535 or H > 65535:
        raise ValueError(f"q: batch {B} and heads {H} must each be at most 65535")
    _require_int32_range("q: Lq", Lq)
    _require_int32_range("k: Lk", Lk)
    check_bool("causal", causal)
    query_offset = check_int("query_offset", query_offset, 0)
    scale = 1.0 / math.sqrt(D) if scale is None else check_float("scale", scale)
    lengths: list[int] = []
    if key_lengths is not None:
        if hasattr(key_lengths, "__cuda_array_interface__"):
            raise TypeError("key_lengths: pass a host array (numpy or list), not a device array")
        kl = np.asarray(key_lengths)
        if kl.dtype.kind not in "iu":
            raise TypeError(f"key_lengths: expected integers, got {kl.dtype}")
        if kl.shape != (B,):
            raise ValueError(f"key_lengths: expected shape {(B,)}, got {kl.shape}")
        bad = np.flatnonzero((kl < 0) | (kl > Lk))
        if bad.size:
            raise ValueError(
                f"key_lengths: value {int(kl[bad[0]])} at index {int(bad[0])} is outside [0, {Lk}]"
            )
        lengths = [int(n) for n in kl]
    return _AttnArgs(
        Q, K, V, B, Lq, Lk, H, D, lengths, bool(causal), int(query_offset), float(scale)
    )


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    key_lengths: Any = None,
    causal: bool = False,
    query_offset: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    stream: int = 0,
) -> Any:
    """Masked scaled-dot-product attention on the GPU (see ops.attention).

    q (B, Lq, H, D), k and v (B, Lk, H, D) with any strides (views into a fused projection are
    fine), D <= 128. key_lengths is a host integer array (B,) with values in [0, Lk]. Returns out
    (B, Lq, H, D) C-contiguous, or ``(out, lse)`` with lse (B, H, Lq); rows with no visible key
    give zeros (and lse = -inf).
    """
    c = _check_attention(q, k, v, key_lengths, causal, query_offset, scale)
    stream = _stream(stream)
    ext = _module()
    out = _empty(q, (c.B, c.Lq, c.H, c.D), "out")
    lse = _empty(q, (c.B, c.H, c.Lq), "lse") if return_lse else None
    ext.attention(
        _interface(out, "out").ptr, 0 if lse is None else _interface(lse, "lse").ptr,
        c.q.ptr, list(c.q.strides), c.k.ptr, list(c.k.strides), c.v.ptr, list(c.v.strides),
        c.B, c.Lq, c.Lk, c.H, c.D, c.lengths, c.causal, c.query_offset, c.scale, stream,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    key_lengths: Any = None,
    causal: bool = False,
    query_offset: int = 0,
    scale: float | None = None,
    stream: int = 0,
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`attention`: ``(dq, dk, dv)``, C-contiguous, shaped as q, k, v.

    dout and out are (B, Lq, H, D) C-contiguous (out and lse from the forward with
    ``return_lse=True``); the masking arguments must be those of the forward.
    """
    c = _check_attention(q, k, v, key_lengths, causal, query_offset, scale)
    Dout = _f32(dout, "dout", (4,))
    _require_shape(Dout, "dout", c.q.shape)
    Out = _f32(out, "out", (4,))
    _require_shape(Out, "out", c.q.shape)
    Lse = _f32(lse, "lse", (3,))
    _require_shape(Lse, "lse", (c.B, c.H, c.Lq))
    stream = _stream(stream)
    ext = _module()
    dq = _empty(q, c.q.shape, "dq")
    dk = _empty(q, c.k.shape, "dk")
    dv = _empty(q, c.v.shape, "dv")
    ext.attention_backward(
        _interface(dq, "dq").ptr, _interface(dk, "dk").ptr, _interface(dv, "dv").ptr,
        Dout.ptr, Out.ptr, Lse.ptr,
        c.q.ptr, list(c.q.strides), c.k.ptr, list(c.k.strides), c.v.ptr, list(c.v.strides),
        c.B, c.Lq, c.Lk, c.H, c.D, c.lengths, c.causal, c.query_offset, c.scale, stream,
    )  # fmt: skip
    return dq, dk, dv


# ------------------------------------------------------------------------- loss and optimizer


def softmax_cross_entropy(
    logits: Any,
    targets: Any,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    inplace: bool = False,
    stream: int = 0,
) -> tuple[float, Any]:
    """Label-smoothed cross-entropy and its gradient (see ops.softmax_cross_entropy).

    logits (N, V) float32 C-contiguous, targets (N,) int32 or int64 on the device. Returns
    ``(loss, dlogits)``; waits for the device (the loss is a Python float). ``inplace=True``
    writes dlogits over logits and returns that array.

    Raises:
        IndexError: a target outside [0, V) other than ignore_index (naming the first row).
    """
    X = _f32(logits, "logits", (2,), writable=bool(inplace))
    _require_nonempty(X, "logits")
    N, V = X.shape
    _require_int32_range("logits: V", V)
    T = _interface(targets, "targets")
    if T.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"targets: expected int32 or int64, got {T.dtype}")
    if len(T.shape) != 1 or T.shape[0] != N:
        raise ValueError(f"targets: expected shape {(N,)}, got {T.shape}")
    if not T.c_contiguous():
        raise ValueError("targets: must be contiguous")
    check_float("label_smoothing", label_smoothing, 0.0, maximum=1.0)
    check_int("ignore_index", ignore_index)
    stream = _stream(stream)
    ext = _module()
    dlogits = logits if inplace else _empty(logits, (N, V), "dlogits")
    loss, bad_row = ext.softmax_cross_entropy(
        _interface(dlogits, "dlogits").ptr, X.ptr, T.ptr, T.dtype == np.int64, N, V,
        float(label_smoothing), int(ignore_index), stream,
    )  # fmt: skip
    if bad_row >= 0:
        raise IndexError(
            f"targets: row {bad_row} holds a class outside [0, {V}) that is not ignore_index "
            f"({ignore_index})"
        )
    return float(loss), dlogits


def adam_step(
    param: Any,
    grad: Any,
    m: Any,
    v: Any,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.98,
    eps: float = 1e-9,
    weight_decay: float = 0.0,
    step: int,
    decoupled: bool = False,
    stream: int = 0,
) -> None:
    """One Adam (AdamW with ``decoupled=True``) update in place on param, m, v (see ops.adam_step).

    All four arrays float32, C-contiguous, of one shape; step >= 1 (bias correction).
    """
    P = _f32(param, "param", tuple(range(1, 9)), writable=True)
    G = _f32(grad, "grad", (len(P.shape),))
    Mo = _f32(m, "m", (len(P.shape),), writable=True)
    Vo = _f32(v, "v", (len(P.shape),), writable=True)
    for arr, name in ((G, "grad"), (Mo, "m"), (Vo, "v")):
        _require_shape(arr, name, P.shape)
    check_float("lr", lr)
    check_float("eps", eps)
    check_float("beta1", beta1, 0.0, 1.0)
    check_float("beta2", beta2, 0.0, 1.0)
    check_float("weight_decay", weight_decay, 0.0)
    check_int("step", step, 1)
    stream = _stream(stream)
    ext = _module()
    if P.size == 0:
        return
    ext.adam_step(
        P.ptr, G.ptr, Mo.ptr, Vo.ptr, P.size, float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), int(step), bool(decoupled), stream,
    )  # fmt: skip
