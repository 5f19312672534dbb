"""Binarized corpora: token ids in memory-mapped shards, and the batcher that trains from them.

A data directory (written by ``pytransformer preprocess``, read by ``pytransformer train --data``)::

    manifest.json                 written last: what the directory holds (see below)
    train-00000.src.ids           int32 little-endian token ids, sentences back to back
    train-00000.src.off           int64 little-endian offsets, one per sentence plus a final one
    train-00000.tgt.ids / .off    the same for the target side; more shards: train-00001.*, ...
    valid-00000.*                 a validation split (optional)
    ...                           anything else the writer of the manifest put there (tokenizers)

``manifest.json`` is ``{"format": "pytransformer-data", "version": 1, "id": ..., "splits":
{name: {"n_pairs", "shards": [{"n_pairs", "files": {kind: {"name", "bytes", "sha256"}}}]}},
"meta": {...}}``. It is written atomically after every shard is complete and fsync'ed, and
``begin_data_dir`` removes an old one before any shard is rewritten, so an interrupted run never
leaves a directory that ``open_data`` accepts with half-written shards. ``open_data`` checks every
file's size (cheap); ``verify=True`` also checks the SHA-256 of every byte.

Reading keeps memory flat in the corpus size: the ids stay on disk (read per sentence with
positioned reads as batches need them; the files are plain arrays, so ``np.memmap`` maps them
too), the offsets are memory-mapped, and only the per-sentence lengths are held (4 bytes per
sentence and side, plus about 30 bytes per sentence for an epoch's plan).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import io
from ..checks import check_int
from .data import Batch, TokenBatcher

__all__ = [
    "DataError",
    "ShardWriter",
    "ShardedSplit",
    "DataDir",
    "ShardBatcher",
    "begin_data_dir",
    "write_manifest",
    "open_data",
    "MANIFEST",
]

MANIFEST = "manifest.json"
_FORMAT = "pytransformer-data"
_SIDES = ("src", "tgt")
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{5,}\.(?:src|tgt)\.(?:ids|off)$")
_ID_DTYPE, _OFF_DTYPE = np.dtype("<i4"), np.dtype("<i8")
_HASH_CHUNK = 1 << 22


class DataError(ValueError):
    """A data directory is missing, unfinished, truncated or corrupt."""


def begin_data_dir(directory: str | os.PathLike, own_files: Sequence[str] = ()) -> str:
    """Makes ``directory`` ready for a new corpus: creates it, removes an old manifest first
    (durably, so a crash from here on leaves a directory ``open_data`` refuses) and then the old
    shard files. A directory holding anything but a data directory's files (the manifest,
    shards, ``own_files`` the caller writes, temporary files) is refused with ValueError rather
    than written into. Returns the path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    foreign = [
        name for name in os.listdir(directory)
        if not (name == MANIFEST or name in own_files or _SHARD_FILE.match(name)
                or name.startswith("."))
    ]  # fmt: skip
    if foreign:
        raise ValueError(
            f"out_dir: {directory} holds files that are not a data directory's "
            f"({', '.join(sorted(foreign)[:3])}); give a new or empty directory"
        )
    manifest = os.path.join(directory, MANIFEST)
    if os.path.exists(manifest):
        os.unlink(manifest)
        io.fsync_dir(directory)
    for name in os.listdir(directory):
        if _SHARD_FILE.match(name):
            os.unlink(os.path.join(directory, name))
    return directory


class _HashedFile:
    """A file written by appending, with its size and SHA-256 kept on the way."""

    def __init__(self, path: str):
        self.path, self.name = path, os.path.basename(path)
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._hash, self.bytes = hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._hash.update(data)
        self.bytes += len(data)

    def close(self) -> dict[str, Any]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return {"name": self.name, "bytes": self.bytes, "sha256": self._hash.hexdigest()}


class ShardWriter:
    """Appends (source, target) id sequences to the shards of one split, ``shard_size`` pairs a
    shard. Memory: the offsets of the open shard (8 bytes a pair and side), nothing else.

    ``add_pairs`` takes lists of id sequences; ``close`` finishes the last shard and returns the
    split's manifest entry (pass it to ``write_manifest``)."""

    def __init__(self, directory: str | os.PathLike, split: str, shard_size: int = 1_000_000):
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(split)):
            raise ValueError(f"split: expected letters, digits or '_', got {split!r}")
        self.directory, self.split = os.fspath(directory), split
        self.shard_size = check_int("shard_size", shard_size, 1)
        self.n_pairs, self.n_tokens = 0, {s: 0 for s in _SIDES}
        self.max_length = {s: 0 for s in _SIDES}
        self._shards: list[dict[str, Any]] = []
        self._files: dict[str, _HashedFile] | None = None
        self._offsets: dict[str, list[np.ndarray]] = {}
        self._in_shard = 0

    def _open_shard(self) -> None:
        stem = os.path.join(self.directory, f"{self.split}-{len(self._shards):05d}")
        self._files = {f"{s}.ids": _HashedFile(f"{stem}.{s}.ids") for s in _SIDES}
        self._offsets = {s: [np.zeros(1, _OFF_DTYPE)] for s in _SIDES}
        self._in_shard = 0

    def _close_shard(self) -> None:
        assert self._files is not None
        for s in _SIDES:
            off = self._files[f"{s}.off"] = _HashedFile(
                self._files[f"{s}.ids"].path[: -len("ids")] + "off"
            )
            off.write(np.concatenate(self._offsets[s]).astype(_OFF_DTYPE).tobytes())
        files = {kind: f.close() for kind, f in self._files.items()}
        self._shards.append({"n_pairs": self._in_shard, "files": files})
        self._files = None

    def add_pairs(self, srcs: Sequence[Sequence[int]], tgts: Sequence[Sequence[int]]) -> None:
        """Appends the pairs (srcs[i], tgts[i]); ids must be integers in [0, 2^31)."""
        if len(srcs) != len(tgts):
            raise ValueError(f"srcs/tgts: {len(srcs)} sources but {len(tgts)} targets")
        start = 0
        while start < len(srcs):
            if self._files is None:
                self._open_shard()
            take = min(len(srcs) - start, self.shard_size - self._in_shard)
            for side, seqs in zip(_SIDES, (srcs, tgts), strict=True):
                self._append(side, seqs[start : start + take])
            self._in_shard += take
            self.n_pairs += take
            start += take
            if self._in_shard == self.shard_size:
                self._close_shard()

    def _append(self, side: str, seqs: Sequence[Sequence[int]]) -> None:
        if not len(seqs):
            return
        lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
        flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, int(lengths.sum()))
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{side}: token ids must lie in [0, 2^31)")
        assert self._files is not None
        self._files[f"{side}.ids"].write(flat.astype(_ID_DTYPE).tobytes())
        offsets = self._offsets[side]
        offsets.append(offsets[-1][-1] + np.cumsum(lengths))
        self.n_tokens[side] += int(flat.size)
        if lengths.size:
            self.max_length[side] = max(self.max_length[side], int(lengths.max()))

    def close(self) -> dict[str, Any]:
        """Finishes the split; returns its manifest entry."""
        if self._files is not None:
            self._close_shard()
        return {
            "n_pairs": self.n_pairs,
            "n_tokens": dict(self.n_tokens),
            "max_length": dict(self.max_length),
            "shards": self._shards,
        }


def write_manifest(
    directory: str | os.PathLike, splits: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> str:
    """Writes ``manifest.json`` atomically (the last step of a corpus: it makes it usable)."""
    directory = os.fspath(directory)
    if "train" not in splits:
        raise ValueError("splits: a data directory needs a 'train' split")
    manifest = {
        "format": _FORMAT, "version": 1, "id": uuid.uuid4().hex, "splits": splits, "meta": meta,
    }
    io.fsync_dir(directory)
    path = os.path.join(directory, MANIFEST)
    io.atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Side:
    """One side (source or target) of a split over its shards.

    Held in memory: the sentence lengths (int32). The offsets are memory-mapped; the token ids
    are read per sentence with positioned reads (``os.pread``), so the corpus sits in the page
    cache, not in the process: its resident memory stays flat however much of it an epoch reads.
    """

    def __init__(self, directory: str, shards: list[dict[str, Any]], side: str):
        self._files, self._offsets, lengths = [], [], []
        for k, shard in enumerate(shards):
            ids_path = os.path.join(directory, shard["files"][f"{side}.ids"]["name"])
            off_path = os.path.join(directory, shard["files"][f"{side}.off"]["name"])
            n_lengths = _shard_lengths(off_path, os.path.getsize(ids_path) // _ID_DTYPE.itemsize)
            if n_lengths is None:
                raise DataError(f"{directory}: shard {k} ({side}): offsets do not fit its ids")
            lengths.append(n_lengths)
            self._offsets.append(_map(off_path, _OFF_DTYPE))
            self._files.append(open(ids_path, "rb", buffering=0))  # noqa: SIM115 - held open
        counts = [len(n) for n in lengths]
        self.starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)

    def _read(self, k: int, j: int) -> np.ndarray:
        """Sentence j of shard k (int32)."""
        off = self._offsets[k]
        begin, end = int(off[j]), int(off[j + 1])
        size = _ID_DTYPE.itemsize
        blob = os.pread(self._files[k].fileno(), (end - begin) * size, begin * size)
        if len(blob) != (end - begin) * size:
            raise DataError(f"{self._files[k].name}: shorter than its offsets (truncated?)")
        return np.frombuffer(blob, _ID_DTYPE)

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.starts, indices, "right") - 1
        return shard, indices - self.starts[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        shard, local = self._locate(np.asarray([i], np.int64))
        return self._read(int(shard[0]), int(local[0])).astype(np.int64)

    def scatter(self, indices: np.ndarray, out: np.ndarray, shift: int) -> np.ndarray:
        """Writes sentence indices[b] into out[b, shift : shift + len]; returns the lengths
        (int64; the interface of data._Packed, so TokenBatcher.batch builds batches here)."""
        shard, local = self._locate(indices)
        lengths = self.lengths[indices].astype(np.int64)
        for b, (k, j) in enumerate(zip(shard.tolist(), local.tolist(), strict=True)):
            out[b, shift : shift + lengths[b]] = self._read(k, j)
        return lengths


def _shard_lengths(off_path: str, n_ids: int) -> np.ndarray | None:
    """The sentence lengths (int32) of a shard's offsets file, read in chunks (not mapped, so
    they leave no resident pages behind); None when the offsets do not describe n_ids ids."""
    size = os.path.getsize(off_path)
    if size % _OFF_DTYPE.itemsize or size < _OFF_DTYPE.itemsize:
        return None
    n = size // _OFF_DTYPE.itemsize - 1
    lengths = np.empty(n, np.int32)
    chunk, done, prev = 1 << 20, 0, None
    with open(off_path, "rb") as f:
        while True:
            block = np.fromfile(f, _OFF_DTYPE, chunk)
            if block.size == 0:
                break
            if prev is None:
                if block[0] != 0:
                    return None
                diffs = np.diff(block)
            else:
                diffs = np.diff(block, prepend=prev)
            if diffs.size and (diffs.min() < 0 or diffs.max() > np.iinfo(np.int32).max):
                return None
            lengths[done : done + diffs.size] = diffs
            done += diffs.size
            prev = block[-1]
    return lengths if prev == n_ids and done == n else None


def _map(path: str, dtype: np.dtype) -> np.ndarray:
    """A read-only memory map of a whole file (an empty file gives an empty array)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class ShardedSplit:
    """One split of a data directory: ``n_pairs`` sentence pairs, ``src[i]`` / ``tgt[i]`` as
    int64 arrays, ``src_lengths`` / ``tgt_lengths`` (int64, in memory)."""

    def __init__(self, directory: str, name: str, entry: dict[str, Any]):
        self.name = name
        self.src = _Side(directory, entry["shards"], "src")
        self.tgt = _Side(directory, entry["shards"], "tgt")
        self.n_pairs = int(self.src.lengths.size)
        if self.n_pairs != entry["n_pairs"] or self.tgt.lengths.size != self.n_pairs:
            raise DataError(f"{directory}: split {name!r} holds {self.n_pairs} pairs, its "
                            f"manifest says {entry['n_pairs']}")

    @property
    def src_lengths(self) -> np.ndarray:
        return self.src.lengths

    @property
    def tgt_lengths(self) -> np.ndarray:
        return self.tgt.lengths

    def __len__(self) -> int:
        return self.n_pairs

    def pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every pair in memory (for small splits such as validation)."""
        return [(self.src[i], self.tgt[i]) for i in range(self.n_pairs)]


class DataDir:
    """A checked data directory: ``manifest`` (dict), ``meta`` (what the writer stored),
    ``id`` (unique per preprocess run), ``split(name)`` and ``splits`` (the names)."""

    def __init__(self, directory: str, manifest: dict[str, Any]):
        self.directory, self.manifest = directory, manifest
        self.id: str = manifest["id"]
        self.meta: dict[str, Any] = manifest.get("meta", {})
        self.splits = tuple(manifest["splits"])

    def split(self, name: str) -> ShardedSplit:
        if name not in self.manifest["splits"]:
            raise DataError(f"{self.directory}: no {name!r} split (it has {list(self.splits)})")
        return ShardedSplit(self.directory, name, self.manifest["splits"][name])

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


def open_data(directory: str | os.PathLike, *, verify: bool = False) -> DataDir:
    """Opens a data directory written with ``write_manifest``. Raises DataError when it has no
    manifest (never finished, or being rewritten), a file is missing or has the wrong size, or
    (``verify``) a file's SHA-256 differs from the manifest's."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"{directory}: no {MANIFEST} (not a data directory, or its preprocess did not finish)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise DataError(f"{path}: not a pytransformer data manifest")
    if manifest.get("version") != 1:
        raise DataError(f"{path}: version {manifest.get('version')!r} is not supported")
    try:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                for entry in shard["files"].values():
                    _check_file(directory, entry, verify)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed ({exc!r})") from None
    return DataDir(directory, manifest)


def _check_file(directory: str, entry: dict[str, Any], verify: bool) -> None:
    path = os.path.join(directory, entry["name"])
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise DataError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated?)")
    if verify and _sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: checksum mismatch (corrupt)")


class ShardBatcher(TokenBatcher):
    """TokenBatcher's batches (same costs, bucketing, shuffling and resume state) drawn from a
    memory-mapped ``ShardedSplit`` instead of lists in memory.

    An epoch's plan is computed from the length arrays alone: a permutation, a stable sort by
    cost and a cut into batches done per run of equal cost (a few hundred iterations, not one
    per sentence), which gives exactly TokenBatcher's greedy cut. With the same pairs and
    settings it yields the same batches as a TokenBatcher. The state also names the corpus
    (its manifest id), so a checkpoint cannot resume on different data.
    """

    def __init__(
        self,
        split: ShardedSplit,
        max_tokens: int,
        *,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        seed: int = 0,
        shuffle: bool = True,
        max_sentences: int | None = None,
        skip_long: bool = False,
        corpus_id: str = "",
    ):
        if not isinstance(split, ShardedSplit):
            raise TypeError(f"split: expected a ShardedSplit, got {type(split).__name__}")
        if split.n_pairs == 0:
            raise ValueError("split: empty data set")
        self._corpus_id = str(corpus_id)
        self._init_from(split.src, split.tgt, max_tokens, pad_id=pad_id, bos_id=bos_id,
                        eos_id=eos_id, seed=seed, shuffle=shuffle, max_sentences=max_sentences,
                        skip_long=skip_long)

    def _init_from(self, src: _Side, tgt: _Side, max_tokens: int, **kw: Any) -> None:
        self._src, self._tgt = src, tgt
        cost = np.maximum(src.lengths, tgt.lengths + 1)
        self._setup(cost, max_tokens, lm=False, **kw)

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        costs = self._cost[order]
        cap = self.max_sentences or order.size
        run_starts = np.flatnonzero(np.diff(costs, prepend=-1))
        run_ends = np.append(run_starts[1:], order.size)
        bounds, open_start = [], 0  # the open batch is order[open_start : k]
        for a, b, c in zip(run_starts, run_ends, costs[run_starts], strict=True):
            fit = min(self.max_tokens // int(c), cap)  # >= 1: long sentences were left out
            k = int(a)
            if k - open_start >= fit and k > open_start:
                bounds.append(k)
                open_start = k
            k = min(int(b), open_start + fit)  # fill the open batch up to what cost c allows
            while k < b:
                bounds.append(k)
                open_start = k
                k = min(int(b), k + fit)
        return np.split(order, bounds)

    def batch(self, indices: np.ndarray) -> Batch:
        """The Batch of the given data-set positions (as TokenBatcher.batch)."""
        out = super().batch(indices)
        if out.src_lengths is not None:
            out.src_lengths = out.src_lengths.astype(np.int64)
        return out

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "corpus": self._corpus_id}
