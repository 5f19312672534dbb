"""Batches of token ids: padding, the paper's token-budget batching, and a few synthetic tasks.

Dimension legend: B batch size, S source length, T target length (both padded).
Targets follow the usual teacher-forcing layout: for a target sentence y,
``tgt_in = [BOS] + y`` and ``tgt_out = y + [EOS]``, both padded with ``pad_id``; the model reads
``tgt_in`` and is trained to predict ``tgt_out``, so ``tgt_lengths = len(y) + 1``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import check_int, check_optional_int

__all__ = [
    "Batch",
    "make_batch",
    "make_lm_batch",
    "EpochBatcher",
    "TokenBatcher",
    "synthetic_pairs",
]


@dataclass
class Batch:
    """One padded batch. ``src``/``src_lengths`` are None for decoder-only (LM) batches.

    src (B,S) int64, src_lengths (B,) int64, tgt_in (B,T) int64, tgt_out (B,T) int64,
    tgt_lengths (B,) int64; ``n_tokens`` = tgt_lengths.sum() (the non-pad target tokens the loss
    averages over); ``indices`` (B,) int64: the examples' positions in their data set (or None).
    """

    src: np.ndarray | None
    src_lengths: np.ndarray | None
    tgt_in: np.ndarray
    tgt_out: np.ndarray
    tgt_lengths: np.ndarray
    n_tokens: int
    indices: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Number of sentences (B)."""
        return int(self.tgt_in.shape[0])

    @property
    def n_targets(self) -> int:
        """What the loss averages over, for the Trainer: the non-pad target tokens."""
        return self.n_tokens

    @property
    def n_src_tokens(self) -> int:
        """Non-pad source tokens (0 for LM batches)."""
        return 0 if self.src_lengths is None else int(self.src_lengths.sum())


def _as_ids(seq: object, what: str) -> np.ndarray:
    """One sentence as a 1-D int64 array of non-negative ids."""
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise IndexError(f"{what}: negative token id {int(arr.min())}")
    if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise IndexError(f"{what}: token id {int(arr.max())} does not fit int64")
    return arr.astype(np.int64, copy=False)


def _split_pairs(
    pairs: Sequence[Any], name: str, hint: str = ""
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The sources and the targets of (source, target) pairs, as id arrays."""
    srcs, tgts = [], []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"{name}[{i}]: expected a (source, target) pair{hint}")
        srcs.append(_as_ids(pair[0], f"{name}[{i}][0]"))
        tgts.append(_as_ids(pair[1], f"{name}[{i}][1]"))
    return srcs, tgts


def _check_special(pad_id: int, bos_id: int, eos_id: int) -> None:
    for name, val in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
        check_int(name, val, 0)


def _pad(rows: Sequence[np.ndarray], pad_id: int, min_width: int = 1) -> np.ndarray:
    width = max(min_width, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad_id, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _targets(tgts: Sequence[np.ndarray], pad_id: int, bos_id: int, eos_id: int):
    tgt_in = _pad([np.concatenate(([bos_id], y)) for y in tgts], pad_id)
    tgt_out = _pad([np.concatenate((y, [eos_id])) for y in tgts], pad_id)
    lengths = np.array([len(y) + 1 for y in tgts], np.int64)
    return tgt_in, tgt_out, lengths


def make_batch(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    *,
    indices: np.ndarray | None = None,
) -> Batch:
    """Pads (source, target) id sequences into a Batch (see the module docstring for layout).

    An empty source sentence gets src_lengths 0 (its row is all padding; S is at least 1).
    Raises ValueError for an empty list, TypeError for non-integer ids, IndexError for negative ids.
    """
    _check_special(pad_id, bos_id, eos_id)
    if len(pairs) == 0:
        raise ValueError("pairs: empty batch")
    srcs, tgts = _split_pairs(pairs, "pairs")
    tgt_in, tgt_out, tgt_lengths = _targets(tgts, pad_id, bos_id, eos_id)
    return Batch(
        src=_pad(srcs, pad_id),
        src_lengths=np.array([len(s) for s in srcs], np.int64),
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        tgt_lengths=tgt_lengths,
        n_tokens=int(tgt_lengths.sum()),
        indices=indices,
    )


def make_lm_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    *,
    indices: np.ndarray | None = None,
) -> Batch:
    """Pads token sequences into a decoder-only Batch (src fields None): tgt_in = BOS + y,
    tgt_out = y + EOS. Same validation as make_batch."""
    _check_special(pad_id, bos_id, eos_id)
    if len(sequences) == 0:
        raise ValueError("sequences: empty batch")
    tgts = [_as_ids(s, f"sequences[{i}]") for i, s in enumerate(sequences)]
    tgt_in, tgt_out, tgt_lengths = _targets(tgts, pad_id, bos_id, eos_id)
    return Batch(None, None, tgt_in, tgt_out, tgt_lengths, int(tgt_lengths.sum()), indices)


class _Packed:
    """Sentences stored back to back in one int64 array with offsets (cheap to hold and slice)."""

    def __init__(self, seqs: Sequence[np.ndarray]):
        self.lengths = np.array([len(s) for s in seqs], np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)))
        self.ids = np.concatenate(seqs) if len(seqs) else np.zeros(0, np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def scatter(self, indices: np.ndarray, out: np.ndarray, shift: int) -> np.ndarray:
        """Writes sentence indices[b] into out[b, shift : shift + len] for every b (vectorised
        padding); returns the lengths."""
        lengths = self.lengths[indices]
        rows = np.repeat(np.arange(indices.size), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        cols = np.arange(rows.size) - starts
        out[rows, cols + shift] = self.ids[np.repeat(self.offsets[indices], lengths) + cols]
        return lengths


class EpochBatcher:
    """The epoch bookkeeping every batcher shares: a subclass plans one epoch's batches (lists of
    data-set positions) from ``self._rng`` in ``_plan``, builds a batch from positions in
    ``batch``, and names what its state is only valid for in ``_identity``.

    All randomness comes from one numpy Generator seeded by ``seed``; its state at the start of
    the current epoch plus the position within the epoch are the whole iteration state
    (``state_dict`` / ``load_state_dict``), so a resumed run sees exactly the same batches. This is
    the data-source shape the Trainer takes (``trainer.DataSource``).
    """

    epoch: int

    def _plan(self) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch(self, indices: np.ndarray) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _begin(self, seed: int) -> None:
        """Seeds the generator and plans epoch 0 (the end of a subclass's __init__)."""
        self._rng = np.random.default_rng(seed)
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        """Plans the current epoch's batches from the generator's present state."""
        self._epoch_rng_state = copy.deepcopy(self._rng.bit_generator.state)
        self._batches, self._pos = self._plan(), 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self._batches)

    @property
    def position(self) -> int:
        """Batches already taken from the current epoch."""
        return self._pos

    def next_batch(self) -> Any:
        """The next batch, starting a new (reshuffled) epoch after the last batch of one."""
        if self._pos == len(self._batches):
            self.epoch += 1
            self._start_epoch()
        out = self.batch(self._batches[self._pos])
        self._pos += 1
        return out

    def skip(self, n: int) -> None:
        """Moves past the next ``n`` batches without building them (as ``n`` calls of
        ``next_batch`` would, epochs included): how a data-parallel rank passes over the
        other ranks' batches."""
        n = check_int("n", n, 0)
        while n:
            if self._pos == len(self._batches):
                self.epoch += 1
                self._start_epoch()
            step = min(n, len(self._batches) - self._pos)
            self._pos += step
            n -= step

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch (a whole epoch when none has been taken from it yet);
        iterating again after the end starts the next epoch."""
        if self._pos == len(self._batches):
            self.epoch += 1
            self._start_epoch()
        while self._pos < len(self._batches):
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serialisable iteration state: epoch, position and the epoch's generator state,
        with the data-set size and settings it is valid for."""
        return {
            "epoch": self.epoch,
            "position": self._pos,
            "rng_state": copy.deepcopy(self._epoch_rng_state),
            **self._identity(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()`` output; the data set and settings must be the same."""
        try:
            epoch, pos, rng_state = int(state["epoch"]), int(state["position"]), state["rng_state"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state: not a {type(self).__name__} state ({exc!r})") from None
        have = self._identity()
        saved = {k: state.get(k) for k in have}
        if saved != have:
            raise ValueError(
                f"state: saved for a different data set or settings (saved {saved}, have {have})"
            )
        self._rng.bit_generator.state = rng_state
        self.epoch = epoch
        self._start_epoch()
        if not 0 <= pos <= len(self._batches):
            raise ValueError(
                f"state: position {pos} outside the epoch's {len(self._batches)} batches"
            )
        self._pos = pos


class TokenBatcher(EpochBatcher):
    """Length-bucketed batches of about ``max_tokens`` padded tokens, as the paper trains.

    ``data``: a sequence of (source, target) id-sequence pairs, or of target sequences alone with
    ``lm=True`` (decoder-only batches). A sentence's cost is max(len(source), len(target) + 1)
    (the +1 is BOS/EOS), a batch's cost is B x (the largest cost in it), and every batch costs at
    most ``max_tokens`` and holds at most ``max_sentences`` sentences (when given).

    One epoch: shuffle (when ``shuffle``), stable-sort by cost, cut greedily into batches, shuffle
    the batch order, all from the generator seeded by ``seed`` (state and resume: EpochBatcher).
    Every sentence appears exactly once per epoch. Sentences that alone exceed ``max_tokens`` raise
    ValueError unless ``skip_long=True``, which leaves them out (counted in ``n_skipped``).
    """

    def __init__(
        self,
        data: Sequence[Any],
        max_tokens: int,
        *,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        seed: int = 0,
        shuffle: bool = True,
        max_sentences: int | None = None,
        lm: bool = False,
        skip_long: bool = False,
    ):
        if len(data) == 0:
            raise ValueError("data: empty data set")
        if lm:
            self._src = None
            self._tgt = _Packed([_as_ids(s, f"data[{i}]") for i, s in enumerate(data)])
            cost = self._tgt.lengths + 1
        else:
            srcs, tgts = _split_pairs(data, "data", " (lm=False)")
            self._src, self._tgt = _Packed(srcs), _Packed(tgts)
            cost = np.maximum(self._src.lengths, self._tgt.lengths + 1)
        self._setup(cost, max_tokens, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, seed=seed,
                    shuffle=shuffle, max_sentences=max_sentences, lm=lm, skip_long=skip_long)

    def _setup(
        self, cost: np.ndarray, max_tokens: int, *, pad_id: int, bos_id: int, eos_id: int,
        seed: int, shuffle: bool, max_sentences: int | None, lm: bool, skip_long: bool,
    ) -> None:
        """Checks the settings, leaves out (or refuses) sentences over the budget and plans the
        first epoch; ``cost`` holds each sentence's cost (``self._src``/``_tgt`` are set)."""
        _check_special(pad_id, bos_id, eos_id)
        check_int("max_tokens", max_tokens, 1)
        check_optional_int("max_sentences", max_sentences, 1)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        self.max_tokens = int(max_tokens)
        self.max_sentences = None if max_sentences is None else int(max_sentences)
        self.shuffle, self.lm, self.seed = shuffle, lm, seed
        self._cost = cost
        too_long = np.flatnonzero(cost > max_tokens)
        if too_long.size and not skip_long:
            i = int(too_long[0])
            raise ValueError(
                f"data[{i}]: costs {int(cost[i])} tokens, more than max_tokens={max_tokens} "
                f"({too_long.size} such sentences; pass skip_long=True to leave them out)"
            )
        self.n_skipped = int(too_long.size)
        self._usable = np.flatnonzero(cost <= max_tokens)
        if self._usable.size == 0:
            raise ValueError("data: every sentence is longer than max_tokens")
        self._begin(seed)

    # -- planning -------------------------------------------------------------------------------

    def _plan(self) -> list[np.ndarray]:
        order = self._usable
        if self.shuffle:
            order = order[self._rng.permutation(order.size)]
        order = order[np.argsort(self._cost[order], kind="stable")]
        batches = self._cut(order)
        if self.shuffle:
            batches = [batches[i] for i in self._rng.permutation(len(batches))]
        return batches

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        """Greedy packing of cost-sorted sentences: extend while B x max cost fits the budget."""
        cap = self.max_sentences or order.size
        batches, start, widest = [], 0, 0
        for k, idx in enumerate(order):
            c = int(self._cost[idx])
            n = k - start
            if n and ((n + 1) * max(widest, c) > self.max_tokens or n == cap):
                batches.append(order[start:k])
                start, widest = k, 0
            widest = max(widest, c)
        batches.append(order[start:])
        return batches

    def batch(self, indices: np.ndarray) -> Batch:
        """The Batch of the given data-set positions."""
        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1 or indices.size == 0:
            raise ValueError("indices: expected a non-empty 1-D array of data-set positions")
        if indices.min() < 0 or indices.max() >= self._tgt.lengths.size:
            raise IndexError(f"indices: out of range [0, {self._tgt.lengths.size})")
        B = indices.size
        width = int(self._tgt.lengths[indices].max()) + 1
        tgt_in = np.full((B, width), self.pad_id, np.int64)
        tgt_out = np.full((B, width), self.pad_id, np.int64)
        tgt_in[:, 0] = self.bos_id
        self._tgt.scatter(indices, tgt_in, 1)
        lengths = self._tgt.scatter(indices, tgt_out, 0)
        tgt_out[np.arange(B), lengths] = self.eos_id
        src = src_lengths = None
        if not self.lm:
            src_lengths = self._src.lengths[indices]
            src = np.full((B, max(1, int(src_lengths.max()))), self.pad_id, np.int64)
            self._src.scatter(indices, src, 0)
        tgt_lengths = lengths + 1
        return Batch(
            src, src_lengths, tgt_in, tgt_out, tgt_lengths, int(tgt_lengths.sum()), indices
        )

    def _identity(self) -> dict[str, Any]:
        return {"n_sentences": int(self._usable.size), "max_tokens": self.max_tokens}


def synthetic_pairs(
    task: str,
    n: int,
    vocab_size: int,
    min_len: int,
    max_len: int,
    *,
    seed: int = 0,
    first_id: int = 3,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random sentence pairs for tests and benchmarks: ``task`` "copy" (target = source),
    "reverse" (target = reversed source) or "random" (independent source and target).

    Lengths are uniform in [min_len, max_len]; ids uniform in [first_id, vocab_size) (ids below
    first_id are left for pad/bos/eos).
    """
    if task not in ("copy", "reverse", "random"):
        raise ValueError(f"task: expected 'copy', 'reverse' or 'random', got {task!r}")
    if not 0 < min_len <= max_len:
        raise ValueError(f"min_len/max_len: need 0 < min_len <= max_len, got {min_len}, {max_len}")
    if vocab_size <= first_id:
        raise ValueError(f"vocab_size: must exceed first_id={first_id}, got {vocab_size}")
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        src = rng.integers(first_id, vocab_size, rng.integers(min_len, max_len + 1))
        if task == "copy":
            tgt = src.copy()
        elif task == "reverse":
            tgt = src[::-1].copy()
        else:
            tgt = rng.integers(first_id, vocab_size, rng.integers(min_len, max_len + 1))
        pairs.append((src, tgt))
    return pairs
