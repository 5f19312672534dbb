"""Where the real (non-padding) positions of a padded (B, L) batch are.

Row b of a batch holds lengths[b] real positions followed by padding. Position-wise work
(projections, FFN, LayerNorm, dropout, the output layer) runs on the packed (N, ...) array of the
N = sum(lengths) real positions only; attention pads its inputs back to (B, L, ...) — zeros in
the padding — so heads are read through strides and keys are masked by length. Results at real
positions are exactly those of running on the padded batch (padding never reaches them: keys are
masked by length, and in causal attention padding only follows), while padding costs nothing.
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops


class Layout:
    """A (B, L) batch with `lengths` (None: every row full). `dense` when nothing is padding, in
    which case packing and padding are free reshapes."""

    def __init__(self, B: int, L: int, lengths: np.ndarray | None = None) -> None:
        self.B = B
        self.L = L
        if lengths is not None and bool((lengths == L).all()):
            lengths = None
        self.lengths = lengths  # key_lengths for attention (None = all keys)
        self.dense = lengths is None
        if self.dense:
            self.n = B * L
            self.rows = None
            self.pos = None
        else:
            mask = np.arange(L)[None, :] < lengths[:, None]
            self.rows = np.flatnonzero(mask)
            self.pos = self.rows % L
            self.n = int(self.rows.size)

    def pack_ids(self, ids: np.ndarray) -> np.ndarray:
        """ids (B, L) -> (B, L) when dense, else the (N,) real ones."""
        return ids if self.dense else ids.reshape(-1)[self.rows]

    def positional(self, table: np.ndarray, start: int = 0) -> np.ndarray:
        """Rows of a (max_len, C) position table matching pack_ids' layout."""
        return table[start : start + self.L] if self.dense else table[self.pos + start]

    def pad(self, x: np.ndarray) -> np.ndarray:
        """x (N, ...) -> (B, L, ...), zeros at padding."""
        if self.dense:
            return x.reshape((self.B, self.L) + x.shape[1:])
        if x.dtype == np.float32:
            flat = x.reshape(self.n, math.prod(x.shape[1:]))
            return ops.pad_rows(flat, self.lengths, self.L).reshape((self.B, self.L) + x.shape[1:])
        out = np.zeros((self.B * self.L,) + x.shape[1:], x.dtype)
        out[self.rows] = x
        return out.reshape((self.B, self.L) + x.shape[1:])

    def pack(self, y: np.ndarray) -> np.ndarray:
        """y (B, L, ...) -> (N, ...) (a view when dense and y is contiguous)."""
        flat = y.reshape((self.B * self.L,) + y.shape[2:])
        if self.dense:
            return flat
        if y.dtype == np.float32:
            rows = ops.pack_rows(self._rows3(y), self.lengths)
            return rows.reshape((self.n,) + y.shape[2:])
        return flat[self.rows]

    def pack_into(self, out: np.ndarray, y: np.ndarray) -> None:
        """out[...] = pack(y) without the intermediate copy; out may be a strided view."""
        rows = _row_view(out) if y.dtype == out.dtype == np.float32 else None
        if rows is not None:  # the native copy, parallel over rows (numpy's is one thread)
            lengths = np.full(self.B, self.L, np.int64) if self.dense else self.lengths
            ops.pack_rows(self._rows3(y), lengths, out=rows)
            return
        flat = y.reshape((self.B * self.L,) + y.shape[2:])
        if self.dense:
            out[...] = flat
        else:
            np.take(flat, self.rows, axis=0, out=out, mode="clip")

    def _rows3(self, y: np.ndarray) -> np.ndarray:
        return y.reshape(self.B, self.L, math.prod(y.shape[2:]))

    def take(self, indices: np.ndarray) -> Layout:
        """The layout of rows `indices` (beam reordering)."""
        lengths = np.full(self.B, self.L, np.int64) if self.lengths is None else self.lengths
        return Layout(int(indices.size), self.L, lengths[indices])


def _row_view(out: np.ndarray) -> np.ndarray | None:
    """out (N, ...) as an (N, R) view with unit inner stride, or None where no such view exists."""
    rows = out.view()
    try:
        rows.shape = (out.shape[0], math.prod(out.shape[1:]))
    except AttributeError:  # not expressible as a view
        return None
    return rows if rows.shape[1] <= 1 or rows.strides[1] == rows.itemsize else None
