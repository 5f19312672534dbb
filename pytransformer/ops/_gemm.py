"""Matrix product with a fused epilogue (bias, ReLU/GELU, accumulate)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .._native import _C

__all__ = ["matmul"]


def matmul(
    a: np.ndarray,
    b: np.ndarray,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    bias: np.ndarray | None = None,
    activation: Literal["relu", "gelu"] | None = None,
    out: np.ndarray | None = None,
    accumulate: bool = False,
) -> np.ndarray:
    """``act(op(a) @ op(b) + bias)`` in float32, or ``out += op(a) @ op(b) + bias``.

    ``op(x)`` is ``x`` or, with ``trans_x=True``, its last two axes swapped (read through the
    strides, never copied). Shapes: ``op(a)`` is (M, K) or (batch, M, K); ``op(b)`` is (K, N) or
    (batch, K, N). A 3-D ``a`` with a 2-D ``b`` multiplies every batch item by the same ``b``
    (a Linear layer: ``matmul(x, W, trans_b=True, bias=b)`` with ``W`` stored
    (out_features, in_features)); a 2-D ``a`` with a 3-D ``b`` broadcasts ``a``. The result is
    (M, N), or (batch, M, N) when either input is 3-D.

    Args:
        a, b: float32 arrays of any strides (transposed or sliced views are fine).
        trans_a, trans_b: use the transpose of the last two axes.
        bias: (N,) float32, added to every row before the activation.
        activation: None, ``"relu"`` or ``"gelu"`` (exact erf form, as torch's default),
            applied while the result is written, not in a second pass.
        out: float32 C-contiguous array of the result's shape, written in place and returned;
            it must not share memory with the inputs.
        accumulate: add the product (and bias) to ``out`` instead of overwriting it; needs
            ``out`` and no activation (gradient accumulation: ``dW += dy^T x``).

    K = 0 gives ``act(bias)`` (or zeros). The result's bits do not depend on the thread count.
    The GIL is released while computing.

    Raises:
        TypeError: an argument is not a numpy array, or not float32.
        ValueError: wrong rank, mismatched inner or batch dimensions (both shapes are named),
            a bias or out of the wrong shape, a non-contiguous or read-only ``out``, an unknown
            activation, or ``accumulate`` without ``out`` / with an activation.
    """
    return _C.matmul(
        a,
        b,
        trans_a=bool(trans_a),
        trans_b=bool(trans_b),
        bias=bias,
        activation=activation,
        out=out,
        accumulate=bool(accumulate),
    )
