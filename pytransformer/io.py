"""Checkpoint files: safetensors read/write and atomic file replacement.

The safetensors layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian unsigned
header length N, then N bytes of UTF-8 JSON, then the raw data section. The JSON maps each tensor
name to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`` (offsets relative to
the start of the data section) plus an optional ``"__metadata__"`` map of str to str. Tensors are
stored C-ordered, little-endian, packed without holes. We pad the header with spaces so the data
section starts 8-byte aligned, and store in ``__metadata__["sha256"]`` a SHA-256 over a canonical
description of the header (names, dtypes, shapes, offsets, the other metadata) followed by the data
section, so a flipped bit anywhere in the file is detected on load.

Every write goes to a temporary file in the target's directory, is flushed and fsync'ed, then
renamed over the target (and the directory fsync'ed), so a crash mid-write leaves either the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as pyio
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO

import numpy as np

__all__ = [
    "CheckpointError",
    "save_safetensors",
    "load_safetensors",
    "load_safetensors_bytes",
    "read_safetensors_header",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_open",
    "fsync_dir",
    "split_lines",
    "iter_lines",
]

# safetensors dtype code -> numpy dtype (little-endian). BF16 has no numpy type; it is widened to
# float32 on load.
_CODE_TO_DTYPE = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_KIND_SIZE_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()}
_BF16 = "BF16"
_ITEMSIZE = {**{code: dt.itemsize for code, dt in _CODE_TO_DTYPE.items()}, _BF16: 2}

# The reference implementation refuses headers above 100 MB; so do we (a corrupt length field
# would otherwise make us try to allocate petabytes).
MAX_HEADER_BYTES = 100_000_000
_CHUNK = 1 << 22  # bytes per read/write/hash call when streaming tensors
_CHECKSUM_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match what was expected."""


# ----------------------------------------------------------------------------------------------
# text lines


def split_lines(text: str) -> list[str]:
    r"""The lines of ``text``: split on "\n" only, one trailing "\r" dropped from each, no empty
    last line after a final "\n". (``str.splitlines`` also splits on \x0b, \x0c, \x1c-\x1e,
    \x85, U+2028 and U+2029, which can sit inside a sentence and would shift a parallel corpus.)"""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


# ----------------------------------------------------------------------------------------------
# atomic writes


def fsync_dir(path: str | os.PathLike) -> None:
    """fsyncs a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file next to ``path``; on a clean exit it is flushed, fsync'ed and renamed
    over ``path``. On an exception the temporary file is removed and ``path`` is left untouched."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes UTF-8 ``text`` to ``path`` atomically (temp file + fsync + rename)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# save


def _new_digest(entries: list[tuple[str, str, list[int], int, int]], meta: Mapping[str, str]):
    """A sha256 object primed with a canonical form of the header (all but the checksum itself)."""
    described = {
        "tensors": [
            [name, code, list(shape), begin, end] for name, code, shape, begin, end in entries
        ],
        "metadata": {k: v for k, v in meta.items() if k != _CHECKSUM_KEY},
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii") + b"\0")


def _as_storable(name: str, value: object) -> tuple[str, np.ndarray]:
    """The safetensors dtype code and a C-contiguous little-endian view/copy of one tensor."""
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"tensors[{name!r}]: expected a numpy array, got {type(value).__name__}")
    code = _KIND_SIZE_TO_CODE.get((value.dtype.kind, value.dtype.itemsize))
    if code is None:
        raise TypeError(f"tensors[{name!r}]: dtype {value.dtype} cannot be stored in safetensors")
    arr = value.astype(_CODE_TO_DTYPE[code], order="C", copy=False)  # keeps 0-d as 0-d
    return code, arr


def _byte_view(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``tensors`` to ``path`` in the safetensors format, atomically.

    ``tensors``: name -> numpy array (float16/32/64, signed/unsigned ints, bool; any strides or
    byte order — stored C-ordered little-endian). Tensors are laid out in the mapping's order.
    ``metadata``: optional str -> str map stored as ``__metadata__``; the key ``"sha256"`` is
    reserved (we store the data section's SHA-256 there and check it on load).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"tensors: expected a mapping of name to array, got {type(tensors).__name__}"
        )
    meta: dict[str, str] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(
                f"metadata: expected a mapping of str to str, got {type(metadata).__name__}"
            )
        for key, val in metadata.items():
            if not isinstance(key, str) or not isinstance(val, str):
                raise TypeError(f"metadata: keys and values must be str, got {key!r}: {val!r}")
        if _CHECKSUM_KEY in metadata:
            raise ValueError(f"metadata: the key {_CHECKSUM_KEY!r} is reserved for the checksum")
        meta.update(metadata)

    header: dict[str, object] = {}
    stored: list[np.ndarray] = []
    entries = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensors: names must be non-empty str, got {name!r}")
        if name == "__metadata__":
            raise ValueError("tensors: the name '__metadata__' is reserved by the format")
        code, arr = _as_storable(name, value)
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        entries.append((name, code, list(arr.shape), offset, offset + arr.nbytes))
        offset += arr.nbytes
        stored.append(arr)
    digest = _new_digest(entries, meta)
    for arr in stored:
        for chunk in _chunks(_byte_view(arr)):
            digest.update(chunk)
    meta[_CHECKSUM_KEY] = digest.hexdigest()
    header = {"__metadata__": meta, **header}

    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data section starts 8-byte aligned
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in stored:
            for chunk in _chunks(_byte_view(arr)):
                f.write(chunk)


# ----------------------------------------------------------------------------------------------
# load


def _fail(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def _read_header(f: IO[bytes], path: str, file_size: int) -> tuple[dict, int]:
    """Parses and validates the header; returns (header dict, data section size)."""
    head = f.read(8)
    if len(head) != 8:
        raise _fail(path, f"truncated: {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise _fail(
            path, f"header length {n} exceeds the file size {file_size} (truncated/corrupt)"
        )
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"corrupt header (not valid UTF-8 JSON): {exc}") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt header: the JSON is not an object")
    return header, file_size - 8 - n


_Entry = tuple[str, str, tuple[int, ...], int, int]  # name, dtype code, shape, begin, end


def _check_entries(header: dict, data_size: int, path: str) -> list[_Entry]:
    """Validates every tensor entry; returns (name, code, shape, begin, end) sorted by offset."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r}: entry needs exactly dtype, shape, data_offsets")
        code, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _ITEMSIZE:
            raise _fail(path, f"tensor {name!r}: unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a list of ints >= 0")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise _fail(path, f"tensor {name!r}: bad data_offsets {offs!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[code]
        if offs[1] - offs[0] != nbytes:
            have = offs[1] - offs[0]
            raise _fail(
                path,
                f"tensor {name!r}: data_offsets {offs} span {have} bytes; {code}{shape} needs "
                f"{nbytes}",
            )
        entries.append((name, code, tuple(shape), offs[0], offs[1]))
    entries.sort(key=lambda e: (e[3], e[4]))
    pos = 0
    for name, _, _, begin, end in entries:  # the data section must be covered exactly, no holes
        if begin != pos:
            raise _fail(
                path, f"tensor {name!r}: starts at byte {begin}, expected {pos} (overlap/hole)"
            )
        pos = end
    if pos != data_size:
        what = "truncated" if pos > data_size else "trailing bytes after the last tensor"
        raise _fail(path, f"{what}: header describes {pos} data bytes, the file holds {data_size}")
    return entries


def read_safetensors_header(
    path: str | os.PathLike,
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Validates a file's header without reading tensors: returns ({name: (dtype code, shape)},
    metadata including the stored "sha256"). Raises CheckpointError like load_safetensors."""
    path = os.fspath(path)
    with _open(path) as f:
        meta, entries = _check_stream(f, os.fstat(f.fileno()).st_size, path)
    return {name: (code, shape) for name, code, shape, _, _ in entries}, meta


def _open(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None


def _check_stream(f: IO[bytes], size: int, label: str) -> tuple[dict[str, str], list[_Entry]]:
    """Reads and validates the header of the stream ``f`` of ``size`` bytes."""
    header, data_size = _read_header(f, label, size)
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _fail(label, "corrupt header: __metadata__ must map str to str")
    return meta, _check_entries(header, data_size, label)


def _read_into(
    f: IO[bytes], view: memoryview, update: Callable[[memoryview], None], label: str
) -> None:
    for chunk in _chunks(view):
        got = f.readinto(chunk)
        if got != len(chunk):
            raise _fail(label, "truncated while reading tensor data")
        update(chunk)


def _load_stream(
    f: IO[bytes], size: int, label: str, require_checksum: bool
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    meta, entries = _check_stream(f, size, label)
    want = meta.get(_CHECKSUM_KEY)
    if want is None and require_checksum:
        raise _fail(
            label, f"no checksum (__metadata__[{_CHECKSUM_KEY!r}]) although one is required"
        )
    digest = _new_digest(entries, meta)
    tensors: dict[str, np.ndarray] = {}
    for name, code, shape, _, _ in entries:
        if code == _BF16:
            bits = np.empty(shape, "<u2")
            _read_into(f, _byte_view(bits), digest.update, label)
            arr = (bits.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.empty(shape, _CODE_TO_DTYPE[code])
            _read_into(f, _byte_view(arr), digest.update, label)
            arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        tensors[name] = arr
    if want is not None and digest.hexdigest() != want:
        raise _fail(
            label, "checksum mismatch: the file is corrupt (sha256 differs from the stored one)"
        )
    return tensors, {k: v for k, v in meta.items() if k != _CHECKSUM_KEY}


def load_safetensors(
    path: str | os.PathLike, *, require_checksum: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file into fresh, writable, aligned, C-contiguous numpy arrays.

    Returns (tensors in the file's data order, metadata). Raises ``CheckpointError`` (a
    ValueError) when the file is missing, truncated, has a corrupt header, entries that overlap,
    leave holes or disagree with their shapes, or when the stored checksum does not match.
    ``require_checksum=True`` also rejects files without one (files from other writers have none;
    our own always do). BF16 tensors are widened to float32.
    """
    path = os.fspath(path)
    with _open(path) as f:
        return _load_stream(f, os.fstat(f.fileno()).st_size, path, require_checksum)


def load_safetensors_bytes(
    data: bytes | bytearray | memoryview, *, require_checksum: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``load_safetensors`` for a file's contents already in memory."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data: expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    return _load_stream(pyio.BytesIO(view), len(view), "<bytes>", require_checksum)


def iter_lines(stream_: IO[bytes], name: str = "input") -> Iterator[str]:
    r"""The lines of a binary stream, read one at a time: split on "\n" only, one trailing
    "\r" dropped from each (the lines `split_lines` gives for the whole text). Raises
    ValueError naming the line that is not UTF-8."""
    for number, raw in enumerate(stream_, 1):
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}: line {number} is not UTF-8 text ({exc.reason})") from None
