"""Layer norm (plain and fused with a residual add), softmax cross-entropy and log-softmax.

All arrays are float32; inputs may have any strides (non-contiguous ones are copied), outputs are
new C-contiguous arrays unless stated. Arguments are checked in the native layer, which raises
TypeError (dtype / not an array), ValueError (shape, range) or IndexError (targets) naming the
argument; kernels release the GIL and give the same bits for any thread count.
"""

from __future__ import annotations

import numpy as np

from .._native import _C
from ..checks import check_int

__all__ = [
    "layer_norm",
    "layer_norm_backward",
    "add_layer_norm",
    "softmax_cross_entropy",
    "log_softmax",
    "log_softmax_topk",
]


def layer_norm(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 1e-5,
    *,
    return_stats: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer normalisation over the last axis: ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    x is (..., C) and gamma, beta are (C,); var is the biased variance (as torch). Returns y
    (shape of x), or ``(y, mean, rstd)`` with mean and rstd = 1/sqrt(var + eps) of shape
    ``x.shape[:-1]`` when ``return_stats`` (what :func:`layer_norm_backward` needs).
    out: a C-contiguous float32 array of x's shape, sharing no memory with the inputs, that
    receives y (reusing a buffer saves faulting in a new one on every call).
    """
    _check_out(out, x, gamma, beta)
    return _C.layer_norm(x, gamma, beta, eps, return_stats=return_stats, out=out)


def layer_norm_backward(
    dy: np.ndarray, x: np.ndarray, gamma: np.ndarray, mean: np.ndarray, rstd: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`layer_norm`: returns ``(dx, dgamma, dbeta)``.

    dy and x are (..., C) (x the forward's input), gamma (C,), mean and rstd ``x.shape[:-1]`` as
    returned by the forward with ``return_stats=True``. dgamma and dbeta are new (C,) arrays (sum
    over all rows; accumulate them into parameter gradients yourself).
    """
    return _C.layer_norm_backward(dy, x, gamma, mean, rstd)


def add_layer_norm(
    x: np.ndarray,
    residual: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 1e-5,
    *,
    return_stats: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fused residual add and layer norm: ``y = layer_norm(x + residual)`` in one sweep.

    Returns y, or ``(y, s, mean, rstd)`` with ``s = x + residual`` (the ``x`` that
    :func:`layer_norm_backward` needs; the gradient of s flows to both x and residual).
    out: as in :func:`layer_norm`.
    """
    _check_out(out, x, residual, gamma, beta)
    return _C.add_layer_norm(x, residual, gamma, beta, eps, return_stats=return_stats, out=out)


def _check_out(out: object, *inputs: object) -> None:
    """out must not overlap an input, which would be read after parts of it were written."""
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy array, got {type(out).__name__}")
    if any(isinstance(a, np.ndarray) and np.may_share_memory(out, a) for a in inputs):
        raise ValueError("out: must not share memory with the inputs")


def softmax_cross_entropy(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    inplace: bool = False,
) -> tuple[float, np.ndarray]:
    """Mean label-smoothed cross-entropy and its gradient, as ``torch.nn.functional.cross_entropy``.

    logits (N, V) float32, targets (N,) int32/int64 in [0, V) or equal to ``ignore_index``.
    loss = mean over non-ignored rows of ``(1 - eps) * nll + eps * mean_v(-log p_v)`` with
    ``eps = label_smoothing``; dlogits = d loss / d logits (ignored rows are zero; when every row
    is ignored the loss is 0.0 and the gradient zero). Each row is read once for its statistics
    (online max and sum) and once to write the gradient. ``inplace=True`` writes dlogits into
    ``logits`` (which must be writable and C-contiguous) and returns that same array, so the
    (N, V) buffer is not duplicated. Targets out of range raise IndexError naming the first one.
    """
    return _C.softmax_cross_entropy(
        logits, targets, label_smoothing=label_smoothing, ignore_index=ignore_index, inplace=inplace
    )


def log_softmax(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``x - logsumexp(x)`` over the last axis (for decoding). ``out`` (writable, C-contiguous,
    shape of x; may be x itself) receives the result when given and is returned."""
    return _C.log_softmax(x, out=out)


def log_softmax_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of ``log_softmax(x)``, without writing the rows:
    ``(indices, values)``, both (N, k), best first with ties by the lower index (NaN ranks as
    -inf). ``values`` are the bits `log_softmax` gives at those indices. x: (N, V) float32; a
    strided x is copied. The GIL is released.

    Raises:
        TypeError: x is not a float32 numpy array, or k is not an int.
        ValueError: x is not 2-D, or k is outside [1, V].
    """
    return _C.log_softmax_topk(x, check_int("k", k))
