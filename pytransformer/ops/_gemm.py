"""Matrix product with a fused epilogue (bias, ReLU/GELU, accumulate)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .._native import _C

__all__ = ["PackedWeight", "matmul"]


class PackedWeight:
    """A weight matrix W (out_features, in_features) laid out once for many products.

    ``matmul(x, PackedWeight(W), bias=b)`` equals ``matmul(x, W, trans_b=True, bias=b)`` but skips
    rearranging W on every call, which is most of a product's memory traffic when x has few rows
    (decoding): 1.3-2.1x numpy at 8-32 rows in bench/bench_gemm.py. With 1-3 rows the product
    only streams W once either way and the unpacked call is as fast or faster. The packed copy
    (``data``, about W's size) does not follow later changes to W: pack again after W changes.

    Raises:
        TypeError: weight is not a float32 numpy array.
        ValueError: weight is not 2-D or is empty.
    """

    __slots__ = ("data", "out_features", "in_features")

    def __init__(self, weight: np.ndarray) -> None:
        self.data: np.ndarray = _C.pack_weight(weight)
        self.out_features, self.in_features = (int(d) for d in weight.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features): the shape of the W it packs."""
        return self.out_features, self.in_features

    def __repr__(self) -> str:
        return f"PackedWeight(out_features={self.out_features}, in_features={self.in_features})"


def matmul(
    a: np.ndarray,
    b: np.ndarray | PackedWeight,
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

    ``b`` may be a `PackedWeight` of W: op(b) is then W^T (no ``trans_a``, ``trans_b`` or
    ``accumulate``); the result has the same bits as ``matmul(a, W, trans_b=True)`` when
    op(a) has more than 16 rows.

    K = 0 gives ``act(bias)`` (or zeros). The result's bits do not depend on the thread count.
    The GIL is released while computing.

    Raises:
        TypeError: an argument is not a numpy array, or not float32.
        ValueError: wrong rank, mismatched inner or batch dimensions (both shapes are named),
            a bias or out of the wrong shape, a non-contiguous or read-only ``out``, an unknown
            activation, or ``accumulate`` without ``out`` / with an activation.
    """
    if isinstance(b, PackedWeight):
        if trans_a or trans_b or accumulate:
            raise ValueError(
                "b: a PackedWeight already stands for W^T; trans_a, trans_b and accumulate "
                "are not supported with it"
            )
        return _C.matmul_prepacked(
            a, b.data, b.out_features, bias=bias, activation=activation, out=out
        )
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
