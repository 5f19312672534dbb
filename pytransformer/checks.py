"""Argument checks shared by every layer: each names the argument it rejects.

Wrong types raise TypeError, values out of range ValueError, token ids outside a vocabulary
IndexError. A bool is never accepted as a number (``True`` is an ``int`` to Python, but passing
one where a count or a rate is expected is a mistake, not a 1).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "check_int",
    "check_float",
    "check_bool",
    "check_optional_int",
    "check_ids",
    "check_token_id",
    "check_lengths",
    "check_sequences",
    "check_layer_index",
]


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_int(
    name: str, value: Any, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An integer (Python or numpy, never a bool) in [minimum, maximum], returned as an int."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be <= {maximum}, got {value}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    """None, or an int as `check_int` takes it."""
    return None if value is None else check_int(name, value, minimum)


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    below: float | None = None,
    *,
    maximum: float | None = None,
    positive: bool = False,
) -> float:
    """A finite real number (never a bool) with minimum <= value < below, value <= maximum and,
    with positive, value > 0; returned as a float."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    low = f"[{minimum}" if minimum is not None else "(-inf"
    if below is not None:
        span = f"{low}, {below})"
    else:
        span = f"{low}, {maximum}]" if maximum is not None else f"{low}, inf)"
    if (
        (minimum is not None and value < minimum)
        or (below is not None and value >= below)
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"{name}: must be in {span}, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not _is_bool(value):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def check_ids(name: str, ids: Any, vocab_size: int, ndim: int) -> np.ndarray:
    """Integer array of rank ndim, non-empty, every id in [0, vocab_size); returns it as int32 or
    int64 (other integer dtypes are converted to int64)."""
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name}: expected a numpy integer array, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {ids.dtype}")
    if ids.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{name}: empty batch (shape {ids.shape})")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise IndexError(
            f"{name}: id {int(ids[where])} at {where} is out of range [0, {vocab_size})"
        )
    if ids.dtype not in (np.int32, np.int64):
        ids = ids.astype(np.int64)
    return ids


def check_token_id(name: str, value: Any, vocab_size: int) -> int:
    """One token id (an integer, never a bool) in [0, vocab_size), returned as an int."""
    t = check_int(name, value)
    if not 0 <= t < vocab_size:
        raise IndexError(f"{name}: {t} is out of range for a vocabulary of {vocab_size}")
    return t


def check_lengths(name: str, lengths: Any, batch: int, max_length: int) -> np.ndarray:
    """Integer array (batch,) with every length in [0, max_length]; returns it as int64.
    (A length 0, an empty source, is all padding: its attention rows come out as zeros.)"""
    if not isinstance(lengths, np.ndarray):
        raise TypeError(f"{name}: expected a numpy integer array, got {type(lengths).__name__}")
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {lengths.shape}")
    if (lengths < 0).any() or (lengths > max_length).any():
        raise ValueError(
            f"{name}: every length must be in [0, {max_length}] (the padded array's length), "
            f"got min {int(lengths.min())} max {int(lengths.max())}"
        )
    return lengths.astype(np.int64, copy=False)


def check_sequences(
    seqs: Any, name: str, vocab_size: int, max_length: int, allow_empty: bool
) -> list[np.ndarray]:
    """Token-id sequences (a list of lists or 1-D arrays) as int64 arrays, after checking type,
    emptiness, ids and length."""
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, (Sequence, np.ndarray)):
        raise TypeError(f"{name}: expected a list of token-id sequences, got {type(seqs).__name__}")
    out = []
    for i, seq in enumerate(seqs):
        if isinstance(seq, (str, bytes)):
            raise TypeError(f"{name}[{i}]: expected a sequence of ints, got {type(seq).__name__}")
        arr = np.asarray(seq)
        if arr.size == 0 and arr.dtype.kind == "f":  # [] converts to float64
            arr = arr.astype(np.int64)
        if arr.ndim != 1:
            raise ValueError(f"{name}[{i}]: expected a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size == 0 and not allow_empty:
            raise ValueError(f"{name}[{i}]: is empty")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name}[{i}]: expected integer token ids, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
        if bad.size:
            j = int(bad[0])
            raise IndexError(
                f"{name}[{i}][{j}] = {int(arr[j])} is out of range for a vocabulary of "
                f"{vocab_size}"
            )
        if arr.size > max_length:
            raise ValueError(
                f"{name}[{i}]: length {arr.size} exceeds the model's max_len {max_length}"
            )
        out.append(arr.astype(np.int64))
    return out


def check_layer_index(name: str, layer: Any, n: int) -> int:
    """A layer index in [-n, n) (negative counts from the last), returned in [0, n)."""
    layer = check_int(name, layer)
    if not -n <= layer < n:
        raise ValueError(f"{name}: {layer} is out of range for {n} decoder layers")
    return layer % n
