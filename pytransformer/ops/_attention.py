"""Scaled dot-product attention (forward, backward and the one-query decode step)."""

from __future__ import annotations

import numpy as np

from .._native import _C
from ..checks import check_bool, check_float, check_int, check_optional_int

__all__ = ["attention", "attention_backward", "attention_decode"]


def _check_flags(causal: object, query_offset: object, scale: object, window: object) -> None:
    check_bool("causal", causal)
    check_int("query_offset", query_offset, 0)
    if scale is not None:
        check_float("scale", scale)
    check_optional_int("window", window, 0)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    key_lengths: np.ndarray | None = None,
    causal: bool = False,
    query_offset: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    window: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Multi-head scaled dot-product attention, flash-style (no Lq x Lk matrix is stored).

    q is (B, Lq, H, D); k and v are (B, Lk, H, D), float32, with any strides (views into a fused
    (B, L, 3, H, D) projection need no copy). Query i of batch b attends to the keys
    j < key_lengths[b] (all Lk when None) and, when ``causal``, j <= i + query_offset (the offset
    places the queries after a cache of earlier positions). With ``window=r`` (restricted
    self-attention) query i, at position i + query_offset, also sees only the keys j with
    |i + query_offset - j| <= r; with ``causal`` that is the last r + 1 positions. Key tiles
    wholly outside the band are skipped, so the cost grows as Lq * r rather than Lq * Lk.
    Scores are ``scale * q.k`` with scale 1/sqrt(D) by default. A query that sees no key gets a
    zero row.

    Returns out (B, Lq, H, D) C-contiguous, and with ``return_lse`` also the log-sum-exp of each
    row's scores, (B, H, Lq) (-inf for a row with no visible key), which attention_backward needs.
    Lq == 1 runs a dedicated decode path. Bit-identical results for any thread count.
    """
    _check_flags(causal, query_offset, scale, window)
    return _C.attention(
        q, k, v, key_lengths, bool(causal), int(query_offset), scale, bool(return_lse), window
    )


def attention_backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    *,
    key_lengths: np.ndarray | None = None,
    causal: bool = False,
    query_offset: int = 0,
    scale: float | None = None,
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of attention: returns (dq, dk, dv), C-contiguous, shaped like q, k and v.

    dout is the gradient of the output (B, Lq, H, D); out and lse are what
    ``attention(..., return_lse=True)`` returned for the same q, k, v and masks (pass the same
    key_lengths, causal, query_offset, scale and window). Probabilities are recomputed tile by
    tile.
    Keys no query sees get zero dk and dv. Bit-identical results for any thread count.
    """
    _check_flags(causal, query_offset, scale, window)
    return _C.attention_backward(
        dout, q, k, v, out, lse, key_lengths, bool(causal), int(query_offset), scale, window
    )


def attention_decode(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    *,
    key_lengths: np.ndarray | None = None,
    scale: float | None = None,
    window: int | None = None,
) -> np.ndarray:
    """One decoding step: each of the N = batch x beam queries q (N, H, D) attends to its cache
    k_cache, v_cache (N, Lk, H, D) (any strides, e.g. a preallocated cache sliced to the steps
    filled so far), keys j < key_lengths[n] (all Lk when None). Returns (N, H, D).

    Same as ``attention(q[:, None], k_cache, v_cache, ...)[:, 0]`` (the decode path of the
    attention kernel); for self-attention with a cache holding the current step, no causal mask
    is needed. With ``window=r`` each query sits at the last position of its cache
    (key_lengths[n] - 1, or Lk - 1) and reads only the last r + 1 entries: row key_lengths[n] - 1
    of the causal windowed ``attention``.
    """
    if not isinstance(q, np.ndarray):
        raise TypeError(f"q: expected a numpy.ndarray, got {type(q).__name__}")
    if q.ndim != 3:
        raise ValueError(f"q: expected a 3-D array (N, H, D), got shape {q.shape}")
    _check_flags(False, 0, scale, window)
    out = _C.attention(
        q[:, None], k_cache, v_cache, key_lengths, False, 0, scale, False, window, True
    )
    return out[:, 0]
