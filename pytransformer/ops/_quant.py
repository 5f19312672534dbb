"""8-bit inference: weight and activation quantization and the int8 matrix product.

The scheme is CTranslate2's ``int8``: symmetric, one float32 scale per row,
``q = round(x * scale)`` with ``scale = 127 / max|row|`` (1 for an all-zero row), so
``x ~= q / scale`` within half a step (``0.5 / scale``). Weights are quantized per output row
once; activations per row (per token) before every product. The product multiplies int8 by int8
with exact int32 sums (int16 pairs through ``vpmaddwd`` on AVX2, which never saturates, unlike
the u8 x s8 ``vpmaddubsw`` route; ``vpdpbusd`` where the CPU has AVX-512 VNNI, with the same
int32 results), then dequantizes, adds the bias and applies the activation as it writes the
float32 result.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .._native import _C

__all__ = [
    "QMAX_K",
    "QuantizedWeight",
    "dequantize_int8",
    "qlinear",
    "qmatmul_s32",
    "quantize_int8",
    "quantize_rows",
]

#: Largest inner dimension of an int8 product: past it the int32 sums could overflow.
QMAX_K = 131071


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization of a float matrix (N, K).

    Returns ``(q, scale)``: ``q`` (N, K) int8 in [-127, 127] and ``scale`` (N,) float32 with
    ``q = round(weight * scale[:, None])`` (half to even) and ``scale = 127 / max|row|``
    (1 for an all-zero row). ``dequantize_int8(q, scale)`` is within ``0.5 / scale`` of
    ``weight`` per element.

    Raises:
        TypeError: weight is not a floating numpy array.
        ValueError: weight is not 2-D, is empty, or holds inf or NaN.
    """
    w = _float_matrix("weight", weight)
    amax = np.abs(w).max(axis=1)
    safe = np.where(amax > 0, amax, 1)
    scale = np.where(amax > 0, np.float32(127.0) / safe, 1).astype(np.float32)
    q = np.rint(w * scale[:, None])
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q / scale[:, None]`` as float32: the inverse of `quantize_int8` up to rounding.

    Raises:
        TypeError: q is not int8 or scale is not float32.
        ValueError: q is not 2-D, or scale is not (q.shape[0],) with positive finite entries.
    """
    _check_int8("q", q, 2)
    scale = _check_scale(scale, q.shape[0])
    return (q.astype(np.float32) / scale[:, None]).astype(np.float32)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-row quantization of activations x (M, K) float32, as `qlinear` does it
    internally: returns ``(q (M, K) int8, scale (M,) float32)`` with the scheme of
    `quantize_int8`. A row holding inf or NaN gets scale NaN (and zeros in q).

    Raises:
        TypeError: x is not a float32 numpy array.
        ValueError: x is not 2-D.
    """
    return _C.quantize_rows(x)


class QuantizedWeight:
    """A Linear weight W (out_features, in_features) as int8 rows and float32 scales, packed once
    into the panels the int8 product reads.

    Build it from int8 rows and their scales (``QuantizedWeight(q, scale)``, e.g. weights read
    from an int8 checkpoint, kept as they are) or from a float matrix with
    `QuantizedWeight.from_float`. ``data`` is the packed form (about W's size in bytes:
    out_features rounded up to 16 times in_features rounded up to 2); ``int8_rows()`` recovers q.

    Raises:
        TypeError: q is not int8, or scale is not float32.
        ValueError: q is not 2-D or is empty, in_features exceeds `QMAX_K`, or scale is not
            (out_features,) with positive finite entries.
    """

    __slots__ = ("data", "scale", "inv_scale", "out_features", "in_features")

    def __init__(self, q: np.ndarray, scale: np.ndarray) -> None:
        _check_int8("q", q, 2)
        self.scale: np.ndarray = _check_scale(scale, q.shape[0]).copy()
        self.scale.flags.writeable = False
        # 1 / scale, what the product's write-back multiplies by (IEEE division, as the kernel's
        # 1 / x_scale for the activations).
        self.inv_scale: np.ndarray = np.float32(1.0) / self.scale
        self.data: np.ndarray = _C.qpack_weight(q)
        self.out_features, self.in_features = (int(d) for d in q.shape)

    @classmethod
    def from_float(cls, weight: np.ndarray) -> QuantizedWeight:
        """Quantizes a float (out_features, in_features) weight with `quantize_int8`."""
        return cls(*quantize_int8(weight))

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features): the shape of the W it stands for."""
        return self.out_features, self.in_features

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed panels and the scales."""
        return int(self.data.nbytes + self.scale.nbytes + self.inv_scale.nbytes)

    def int8_rows(self) -> np.ndarray:
        """The int8 rows q (out_features, in_features) the panels were packed from."""
        panels, pairs, _ = self.data.shape
        rows = self.data.reshape(panels, pairs, 16, 2).transpose(0, 2, 1, 3)
        rows = rows.reshape(panels * 16, pairs * 2)[: self.out_features, : self.in_features]
        return np.ascontiguousarray(rows)

    def dequantize_rows(self, ids: np.ndarray, *, scale: float = 1.0) -> np.ndarray:
        """Rows ``ids`` of the float W times ``scale``: ``q[ids] * (scale / self.scale[ids])``,
        float32 of shape ``ids.shape + (in_features,)``. Gathers the int8 bytes straight from
        the panels, so an embedding table shared with an output projection is stored once.

        Raises:
            TypeError: ids is not an integer numpy array.
            IndexError: an id is outside [0, out_features).
        """
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
            what = ids.dtype if isinstance(ids, np.ndarray) else type(ids).__name__
            raise TypeError(f"ids: expected an integer numpy array, got {what}")
        if ids.dtype not in (np.int32, np.int64):  # other integer kinds: the kernel reads int64
            ids = ids.astype(np.int64)
        out = _C.qgather_rows(
            self.data, self.out_features, self.in_features, self.scale, ids, float(scale)
        )
        return out.reshape(ids.shape + (self.in_features,))

    def dequantize(self) -> np.ndarray:
        """The float32 W this weight approximates: ``q / scale[:, None]``."""
        return dequantize_int8(self.int8_rows(), self.scale)

    def __repr__(self) -> str:
        return f"QuantizedWeight(out_features={self.out_features}, in_features={self.in_features})"


def qmatmul_s32(a: np.ndarray, weight: QuantizedWeight) -> np.ndarray:
    """The exact int32 sums ``a @ q^T`` of int8 activations a (M, K) with the int8 rows q of
    ``weight`` (M, out_features); scales are not applied. Any int8 value, -128 included, gives
    the exact sum (K <= `QMAX_K`). A strided ``a`` is copied first.

    Raises:
        TypeError: a is not an int8 numpy array, or weight is not a QuantizedWeight.
        ValueError: a is not 2-D or its K differs from weight.in_features.
    """
    _check_weight(weight)
    return _C.qgemm_s32(a, weight.data, weight.out_features, weight.in_features)


def qlinear(
    x: np.ndarray,
    weight: QuantizedWeight,
    *,
    bias: np.ndarray | None = None,
    activation: Literal["relu", "gelu"] | None = None,
) -> np.ndarray:
    """The int8 Linear layer: ``act(x @ W^T + bias)`` with W = ``weight`` and x quantized per row.

    x (M, K) or (B, L, K) float32 (a strided x is copied); bias (out_features,) float32. Each
    element is ``sum / (x_scale[m] * w_scale[n]) + bias[n]`` where ``sum`` is the exact int32 sum
    of `qmatmul_s32` over ``quantize_rows(x)``; the activation (ReLU, or the exact-erf GELU) is
    applied as the result is written. A row of x with inf or NaN gives a row of NaN. The bits do
    not depend on the thread count; the GIL is released while computing.

    Raises:
        TypeError: x or bias is not float32, or weight is not a QuantizedWeight.
        ValueError: x is not 2-D or 3-D, its last axis differs from weight.in_features, bias has
            the wrong shape, or activation is unknown.
    """
    _check_weight(weight)
    return _C.qlinear(
        x, weight.data, weight.out_features, weight.in_features, weight.inv_scale, bias=bias,
        activation=activation,
    )


def _check_weight(weight: object) -> None:
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight: expected a QuantizedWeight, got {type(weight).__name__}")


def _float_matrix(name: str, a: object) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating array, got dtype {a.dtype}")
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: holds inf or NaN, which have no int8 form")
    return a


def _check_int8(name: str, a: object, ndim: int) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.int8:
        raise TypeError(f"{name}: expected dtype int8, got {a.dtype}")
    if a.ndim != ndim or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty {ndim}-D array, got shape {a.shape}")


def _check_scale(scale: object, n: int) -> np.ndarray:
    if not isinstance(scale, np.ndarray):
        raise TypeError(f"scale: expected a numpy.ndarray, got {type(scale).__name__}")
    if scale.dtype != np.float32:
        raise TypeError(f"scale: expected dtype float32, got {scale.dtype}")
    if scale.shape != (n,):
        raise ValueError(f"scale: expected shape ({n},), got {scale.shape}")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("scale: entries must be positive and finite")
    return np.ascontiguousarray(scale)
