"""Training kernels: activation gradients, embedding, dropout, Adam and gradient-norm clipping.

All arrays are float32 (ids int32/int64); inputs may have any strides (non-contiguous ones are
copied), arrays updated in place must be writable and C-contiguous. The native layer raises
TypeError / ValueError / IndexError naming the argument; kernels release the GIL and give the
same bits for any thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._native import _C
from ..checks import check_int

__all__ = [
    "gelu",
    "gelu_backward",
    "relu_backward",
    "swish",
    "swish_backward",
    "embedding",
    "embedding_backward",
    "dropout",
    "dropout_backward",
    "adam_step",
    "global_norm",
    "clip_grad_norm",
    "pad_rows",
    "pack_rows",
    "add_column_sums",
]

_U64 = 1 << 64


def _counter(value: object, name: str) -> int:
    """A seed or offset: an int in [0, 2**64)."""
    return check_int(name, value, 0, _U64 - 1)


def _array_list(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The arrays as a list; a single ndarray is refused (iterating it would yield its rows)."""
    if isinstance(arrays, np.ndarray):
        raise TypeError("arrays: expected a sequence of numpy arrays, got a single ndarray")
    return list(arrays)


def gelu(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Exact GELU ``x * Phi(x)`` (erf form, as torch's default). ``out`` (writable,
    C-contiguous, shape of x; may be x) receives the result when given and is returned."""
    return _C.gelu(x, out=out)


def gelu_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``dout * gelu'(x)`` where x is the pre-activation the forward saw."""
    return _C.gelu_backward(dout, x)


def swish(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """SiLU ``x * sigmoid(x)`` (Marian's "swish"). ``out`` as for `gelu`."""
    return _C.swish(x, out=out)


def swish_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``dout * swish'(x)`` where x is the pre-activation the forward saw."""
    return _C.swish_backward(dout, x)


def relu_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``dout`` where the ReLU output ``out`` is positive, 0 elsewhere."""
    return _C.relu_backward(dout, out)


def embedding(weight: np.ndarray, ids: np.ndarray, *, scale: float = 1.0) -> np.ndarray:
    """``weight[ids] * scale``: weight (V, C), ids int32/int64 of any shape → ``ids.shape + (C,)``.

    ids outside [0, V) raise IndexError naming the first bad id and its flat position.
    """
    return _C.embedding(weight, ids, scale=scale)


def embedding_backward(
    dout: np.ndarray, ids: np.ndarray, dweight: np.ndarray, *, scale: float = 1.0
) -> None:
    """Scatter-add ``dweight[ids[i]] += scale * dout[i]`` in place; dweight (V, C) writable and
    C-contiguous, dout ``ids.shape + (C,)``. Rows repeated in ids add up in token order, the same
    bits for any thread count (no atomics)."""
    _C.embedding_backward(dout, ids, dweight, scale=scale)


def dropout(x: np.ndarray, p: float, *, seed: int, offset: int = 0) -> np.ndarray:
    """Inverted dropout: each element is kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``, else zeroed (p = 0 copies; p = 1 zeroes everything).

    The mask of element i (C-order flat index) is a counter-based hash of ``(seed, offset + i)``,
    so it is reproducible on any thread count and ISA; give each call a distinct ``offset`` range
    (or seed) to draw fresh masks. ``dropout_backward`` with the same arguments applies the same
    mask.
    """
    return _C.dropout(x, p, seed=_counter(seed, "seed"), offset=_counter(offset, "offset"))


def dropout_backward(dy: np.ndarray, p: float, *, seed: int, offset: int = 0) -> np.ndarray:
    """Gradient of :func:`dropout` called with the same ``p``, ``seed`` and ``offset``."""
    seed, offset = _counter(seed, "seed"), _counter(offset, "offset")
    return _C.dropout_backward(dy, p, seed=seed, offset=offset)


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.98,
    eps: float = 1e-9,
    weight_decay: float = 0.0,
    step: int,
    decoupled: bool = False,
) -> None:
    """One Adam update in place on param, m and v (same shape, writable, C-contiguous).

    As ``torch.optim.Adam`` (``decoupled=False``: weight decay added to the gradient, L2) or
    ``torch.optim.AdamW`` (``decoupled=True``: param *= 1 - lr * weight_decay), with bias
    correction for ``step`` >= 1 (the number of this update, counting from 1).
    """
    step = check_int("step", step)
    _C.adam_step(
        param,
        grad,
        m,
        v,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        decoupled=decoupled,
    )


def global_norm(arrays: Sequence[np.ndarray]) -> float:
    """``sqrt(sum of squares of every element of every array)``, accumulated in float64 over
    fixed blocks added in a fixed order (same result for any thread count). Empty → 0.0."""
    return _C.global_norm(_array_list(arrays))


def clip_grad_norm(arrays: Sequence[np.ndarray], max_norm: float) -> float:
    """Returns the global norm before clipping; when it exceeds ``max_norm`` every array
    (writable, C-contiguous, each at most once) is scaled in place by
    ``max_norm / (norm + 1e-6)`` as ``torch.nn.utils.clip_grad_norm_``. A NaN norm scales
    nothing: check the returned value."""
    return _C.clip_grad_norm(_array_list(arrays), max_norm)


def pad_rows(x: np.ndarray, lengths: np.ndarray, L: int) -> np.ndarray:
    """The packed rows x (N, R) of a batch's real positions laid out as (B, L, R): batch row b
    gets the next ``lengths[b]`` rows of x, then zeros. ``lengths`` (B,) ints in [0, L] summing to
    N. Parallel over batch rows (a copy: the bits are x's)."""
    return _C.pad_rows(x, lengths, check_int("L", L, 0))


def add_column_sums(out: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``out += x.sum(axis=0)``, the rows summed in order from zero (numpy's order for x with
    more than one column, so the same bits), in parallel over columns with the GIL released: a
    bias gradient. x (M, N) float32 with unit inner stride (else copied); out (N,) float32,
    contiguous, writable, not sharing memory with x. Returns out."""
    if isinstance(out, np.ndarray) and isinstance(x, np.ndarray) and np.may_share_memory(out, x):
        raise ValueError("out: must not share memory with x")
    return _C.add_column_sums(out, x)


def pack_rows(
    y: np.ndarray, lengths: np.ndarray, *, out: np.ndarray | None = None
) -> np.ndarray:
    """The real positions of a padded y (B, L, R), ``y[b, :lengths[b]]`` for b in order, as
    (N, R) rows; the inverse of `pad_rows`. ``out`` (N, R) float32, writable, unit inner stride,
    any row stride (e.g. a column slice of a wider array), not sharing memory with y: written in
    place and returned."""
    return _C.pack_rows(y, lengths, out=out)

