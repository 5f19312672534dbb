"""The CTranslate2 `model.bin` file: read and write, with numpy only.

Layout (little-endian; CTranslate2's python/ctranslate2/specs/model_spec.py writes it and
src/models/model.cc reads it): u32 binary version; from version 2 on a string naming the
specification (`TransformerSpec`, or `TransformerBase`/`TransformerBig` in old files) and a u32
revision; u32 variable count, then per variable: a string name, u8 rank, rank x u32 dimensions,
and from version 4 on a u8 type id (float32, int8, int16, int32, float16, bfloat16 in that
order) and a u32 byte count, before version 4 a u8 item size (4: float32, 2: int16, 1: int8)
and a u32 element count; then the raw data. From version 3 on: u32 alias count and pairs of
strings (alias, target variable). A string is a u16 length counting a final NUL, the bytes and
the NUL.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from ..io import CheckpointError, atomic_open

CURRENT_VERSION = 6
_TYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_OLD_ITEM_TYPES = {4: "float32", 2: "int16", 1: "int8"}


@dataclass
class ModelBin:
    """The contents of a model.bin: variables by name (aliases resolved to the same array)."""

    spec: str
    revision: int
    version: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


class _Reader:
    def __init__(self, f: IO[bytes], path: str, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def take(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(
                f"{self.path}: truncated (needed {n} bytes for {what} at offset "
                f"{self.f.tell() - len(data)}, file has {self.size})"
            )
        return data

    def u(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.u("H", what)
        raw = self.take(n, what)
        if n == 0 or raw[-1:] != b"\0":
            raise CheckpointError(f"{self.path}: corrupt string for {what} (no final NUL)")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: corrupt string for {what} (not UTF-8)") from None


def read_model_bin(path: str | os.PathLike) -> ModelBin:
    """Reads every variable of a model.bin (binary versions 1 to 6). Raises CheckpointError
    naming the file when it is missing, truncated, of a newer version or otherwise corrupt."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (a CTranslate2 model directory has a model.bin)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        version = r.u("I", "the binary version")
        if not 1 <= version <= CURRENT_VERSION:
            raise CheckpointError(
                f"{path}: binary version {version} is not one CTranslate2 4.8 reads "
                f"(1 to {CURRENT_VERSION})"
            )
        spec, revision = "", 1
        if version >= 2:
            spec = r.string("the specification name")
            revision = r.u("I", "the specification revision")
        out = ModelBin(spec, revision, version)
        count = r.u("I", "the variable count")
        for i in range(count):
            name, value = _read_variable(r, version, i)
            out.variables[name] = value
        if version >= 3:
            for _ in range(r.u("I", "the alias count")):
                alias, target = r.string("an alias"), r.string("an alias target")
                out.aliases[alias] = target
        if f.read(1):
            raise CheckpointError(f"{path}: unexpected data after the last entry")
    for alias, target in out.aliases.items():
        for suffix in ("", "_scale"):
            if target + suffix in out.variables:
                out.variables.setdefault(alias + suffix, out.variables[target + suffix])
    return out


def _read_variable(r: _Reader, version: int, index: int) -> tuple[str, np.ndarray]:
    name = r.string(f"the name of variable {index}")
    rank = r.u("B", f"the rank of {name}")
    shape = tuple(r.u("I", f"the shape of {name}") for _ in range(rank))
    if version >= 4:
        type_id = r.u("B", f"the type of {name}")
        if type_id >= len(_TYPES):
            raise CheckpointError(f"{r.path}: {name} has an unknown type id {type_id}")
        dtype = _TYPES[type_id]
        nbytes = r.u("I", f"the size of {name}")
    else:
        item = r.u("B", f"the item size of {name}")
        if item not in _OLD_ITEM_TYPES:
            raise CheckpointError(f"{r.path}: {name} has an unknown item size {item}")
        dtype = _OLD_ITEM_TYPES[item]
        nbytes = r.u("I", f"the size of {name}") * item
    width = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    if nbytes != int(np.prod(shape, dtype=np.int64)) * width:
        raise CheckpointError(
            f"{r.path}: {name} holds {nbytes} bytes, its shape {list(shape)} of {dtype} needs "
            f"{int(np.prod(shape, dtype=np.int64)) * width}"
        )
    raw = r.take(nbytes, f"the data of {name}")
    if dtype == "bfloat16":
        bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
        return name, bits.view(np.float32).reshape(shape)
    return name, np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    path: str | os.PathLike,
    spec: str,
    revision: int,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    version: int = CURRENT_VERSION,
) -> None:
    """Writes a model.bin atomically. variables: numpy arrays of the CTranslate2 types (scalars
    as 0-d arrays); aliases: alias -> variable name. version 1-3 store float32/int16/int8 only."""
    aliases = aliases or {}
    if not 1 <= version <= CURRENT_VERSION:
        raise ValueError(f"version: expected 1 to {CURRENT_VERSION}, got {version}")
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<I", version))
        if version >= 2:
            f.write(_pack_string(spec) + struct.pack("<I", revision))
        f.write(struct.pack("<I", len(variables)))
        for name, value in variables.items():
            _write_variable(f, name, np.asarray(value), version)
        if version >= 3:
            f.write(struct.pack("<I", len(aliases)))
            for alias, target in aliases.items():
                f.write(_pack_string(alias) + _pack_string(target))
        elif aliases:
            raise ValueError("aliases: binary versions below 3 cannot store aliases")


def _write_variable(f: IO[bytes], name: str, value: np.ndarray, version: int) -> None:
    dtype = value.dtype.name
    if dtype not in _TYPES or dtype == "bfloat16":
        raise TypeError(f"variables[{name!r}]: dtype {dtype} is not a CTranslate2 type")
    f.write(_pack_string(name) + struct.pack("<B", value.ndim))
    f.write(struct.pack(f"<{value.ndim}I", *value.shape))
    data = np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes()
    if version >= 4:
        f.write(struct.pack("<BI", _TYPES.index(dtype), len(data)))
    else:
        item = value.dtype.itemsize
        if _OLD_ITEM_TYPES.get(item) != dtype:
            raise TypeError(f"variables[{name!r}]: binary version {version} cannot store {dtype}")
        f.write(struct.pack("<BI", item, value.size))
    f.write(data)
