"""Checkpoint files: safetensors layout, corruption detection and atomic replacement."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pytransformer import io as ptio
from pytransformer.io import CheckpointError, load_safetensors, save_safetensors

SPEC_DTYPES = {  # the format's dtype codes, written out from the spec, independent of io.py
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def parse_by_spec(path):
    """An independent reader following the published layout: u64 LE header size, JSON header,
    packed little-endian data addressed by data_offsets relative to the data section."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], SPEC_DTYPES[info["dtype"]]).reshape(
            info["shape"]
        )
    return out, header.get("__metadata__", {}), n, len(data)


def write_by_spec(path, tensors, metadata=None):
    """An independent writer (no checksum, no alignment padding, reversed data order)."""
    header, blobs, offset = {}, [], 0
    for name, (code, arr) in reversed(list(tensors.items())):
        blob = np.ascontiguousarray(arr, SPEC_DTYPES[code]).tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "b": np.arange(5, dtype=np.int64),
        "scalar": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 4), np.float32),
        "mask": np.array([True, False, True]),
        "half": np.linspace(-1, 1, 7, dtype=np.float16),
    }


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert a[k].dtype.newbyteorder("=") == b[k].dtype.newbyteorder("="), k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# layout and round trip


def test_file_follows_the_published_layout(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    save_safetensors(path, tensors, {"format": "pt", "note": "héllo"})
    parsed, meta, header_len, data_len = parse_by_spec(path)
    assert_same(tensors, parsed)
    assert meta["format"] == "pt" and meta["note"] == "héllo"
    assert (8 + header_len) % 8 == 0  # data section aligned
    assert data_len == sum(t.nbytes for t in tensors.values())


def test_reads_files_written_by_another_writer(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "a": ("F32", rng.standard_normal((4, 3)).astype(np.float32)),
        "i": ("I32", rng.integers(-9, 9, (2, 2, 2)).astype(np.int32)),
        "u": ("U8", np.arange(11, dtype=np.uint8)),
    }
    path = tmp_path / "other.safetensors"
    write_by_spec(path, tensors, {"k": "v"})
    loaded, meta = load_safetensors(path)
    assert meta == {"k": "v"}
    assert set(loaded) == set(tensors)
    for name, (_, arr) in tensors.items():
        np.testing.assert_array_equal(loaded[name], arr)
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable
        assert loaded[name].ctypes.data % loaded[name].dtype.itemsize == 0


def test_bf16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)  # exactly representable in bf16
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    raw = json.dumps({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bits.tobytes())
    loaded, _ = load_safetensors(path)
    assert loaded["x"].dtype == np.float32
    np.testing.assert_array_equal(loaded["x"], values)


dtypes = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i8", ">i4", "i1", "<u2", "u1", "?"])


@given(
    arrays=st.lists(
        dtypes.flatmap(
            lambda dt: hnp.arrays(
                dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
            )
        ),
        min_size=0,
        max_size=4,
    ),
    transpose=st.booleans(),
)
def test_round_trip_any_dtype_shape_and_strides(tmp_path_factory, arrays, transpose):
    tensors = {f"t{i}": (a.T if transpose else a) for i, a in enumerate(arrays)}
    path = tmp_path_factory.mktemp("rt") / "x.safetensors"
    save_safetensors(path, tensors)
    loaded, meta = load_safetensors(path)
    assert meta == {}
    assert list(loaded) == list(tensors)
    for k, a in tensors.items():
        assert loaded[k].shape == a.shape and loaded[k].dtype.kind == a.dtype.kind
        assert loaded[k].tobytes() == np.ascontiguousarray(a, a.dtype.newbyteorder("=")).tobytes()
    assert_same(parse_by_spec(path)[0], loaded)


def test_save_rejects_bad_input(tmp_path):
    p = tmp_path / "x"
    with pytest.raises(TypeError, match="tensors"):
        save_safetensors(p, [np.zeros(2)])
    with pytest.raises(TypeError, match=r"tensors\['a'\]"):
        save_safetensors(p, {"a": [1.0, 2.0]})
    with pytest.raises(TypeError, match="data"):
        ptio.load_safetensors_bytes("text")
    with pytest.raises(TypeError, match=r"tensors\['a'\]"):
        save_safetensors(p, {"a": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match=r"tensors\['a'\]"):
        save_safetensors(p, {"a": np.array(["x"])})
    with pytest.raises(TypeError, match="metadata"):
        save_safetensors(p, {"a": np.zeros(2)}, {"k": 1})
    with pytest.raises(ValueError, match="reserved"):
        save_safetensors(p, {"a": np.zeros(2)}, {"sha256": "x"})
    with pytest.raises(ValueError, match="reserved"):
        save_safetensors(p, {"__metadata__": np.zeros(2)})
    assert not p.exists()
    assert os.listdir(tmp_path) == []  # no temporary files left behind


# ---------------------------------------------------------------------------------------------
# corruption


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, sample_tensors(), {"k": "v"})
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_safetensors(tmp_path / "nope.safetensors")


def test_every_truncation_is_rejected(saved, tmp_path):
    raw = saved.read_bytes()
    for n in range(len(raw)):
        with pytest.raises(CheckpointError):
            ptio.load_safetensors_bytes(raw[:n])
    cut = tmp_path / "cut.safetensors"
    for n in (0, 7, 8, 20, len(raw) - 5, len(raw) - 1):  # the same through real files
        cut.write_bytes(raw[:n])
        with pytest.raises(CheckpointError):
            load_safetensors(cut)
        with pytest.raises(CheckpointError):
            ptio.read_safetensors_header(cut)


def test_trailing_garbage_is_rejected(saved):
    with open(saved, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="trailing"):
        load_safetensors(saved)


def test_every_single_bit_flip_is_rejected(saved):
    """The checksum covers the data and the header's entries, so any one flipped bit is caught."""
    raw = bytearray(saved.read_bytes())
    assert ptio.load_safetensors_bytes(raw, require_checksum=True)[1] == {"k": "v"}
    survived = []
    for bit in range(len(raw) * 8):
        raw[bit // 8] ^= 1 << (bit % 8)
        try:
            ptio.load_safetensors_bytes(raw, require_checksum=True)
            survived.append(bit)
        except CheckpointError:
            pass
        raw[bit // 8] ^= 1 << (bit % 8)
    assert survived == []


def test_data_bit_flip_reports_checksum(saved):
    raw = bytearray(saved.read_bytes())
    raw[-3] ^= 0x10
    saved.write_bytes(raw)
    with pytest.raises(CheckpointError, match="checksum"):
        load_safetensors(saved)


def test_files_without_checksum_load_unless_required(tmp_path):
    path = tmp_path / "plain.safetensors"
    write_by_spec(path, {"a": ("F32", np.ones(3, np.float32))})
    load_safetensors(path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_safetensors(path, require_checksum=True)


@pytest.mark.parametrize(
    "header, what",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "starts at"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, "dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2]}}, "exactly"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            "overlap",
        ),
        (
            {"__metadata__": {"k": 3}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            "metadata",
        ),
        ([1, 2], "not an object"),
    ],
)
def test_inconsistent_headers_are_rejected(tmp_path, header, what):
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match=what):
        load_safetensors(path)


def test_absurd_header_length_is_rejected(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        load_safetensors(path)


# ---------------------------------------------------------------------------------------------
# atomic replacement


def test_failure_mid_write_keeps_the_old_file(saved, monkeypatch):
    before = saved.read_bytes()
    real_chunks, calls = ptio._chunks, []

    def failing_chunks(view):  # hashing pass + writing pass: fail while writing the 2nd tensor
        for i, chunk in enumerate(real_chunks(view)):
            calls.append(i)
            if len(calls) > len(sample_tensors()) + 1:
                raise OSError(28, "No space left on device")
            yield chunk

    monkeypatch.setattr(ptio, "_chunks", failing_chunks)
    with pytest.raises(OSError, match="No space"):
        save_safetensors(saved, {k: v + 1 for k, v in sample_tensors().items() if v.dtype != bool})
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]  # the temporary file was removed


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_failed_fsync_or_rename_keeps_the_old_file(saved, monkeypatch, fails):
    before = saved.read_bytes()

    def boom(*args):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, fails, boom)
    with pytest.raises(OSError, match="I/O error"):
        save_safetensors(saved, {"x": np.zeros(3, np.float32)})
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_process_killed_mid_write_keeps_the_old_file(saved):
    """A child starts overwriting the file, signals once part of the new data is on disk, and is
    SIGKILLed there: the target still holds the complete old checkpoint."""
    old, _ = load_safetensors(saved)
    marker = saved.parent / "writing"
    child = textwrap.dedent(
        f"""
        import os, time, numpy as np
        from pytransformer import io as ptio
        real = ptio._chunks
        def slow(view):
            for chunk in real(view):
                yield chunk
                if ptio._chunks.writing:
                    open({str(marker)!r}, "w").close()
                    time.sleep(60)
        slow.writing = False
        real_open = ptio.atomic_open
        def opener(path, mode="wb"):
            slow.writing = True
            return real_open(path, mode)
        ptio._chunks, ptio.atomic_open = slow, opener
        ptio.save_safetensors({str(saved)!r}, {{"w": np.ones((512, 512), np.float32)}})
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # cwd away from the checkout, so the child imports the installed package, not the sources
    proc = subprocess.Popen([sys.executable, "-c", child], env=env, cwd=saved.parent)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "writer exited before reaching the write"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        tmp = [p for p in os.listdir(saved.parent) if p.endswith(".tmp")]
        assert len(tmp) == 1 and os.path.getsize(saved.parent / tmp[0]) > 0  # a partial new file
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    loaded, meta = load_safetensors(saved)
    assert meta == {"k": "v"}
    assert_same(old, loaded)


def test_atomic_write_text(tmp_path):
    p = tmp_path / "c.json"
    ptio.atomic_write_text(p, '{"a": 1}')
    ptio.atomic_write_text(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    with pytest.raises(TypeError, match="text"):
        ptio.atomic_write_text(p, b"bytes")
    assert os.listdir(tmp_path) == ["c.json"]


@pytest.mark.parametrize(
    "text, lines",
    [
        ("", []),
        ("\n", [""]),
        ("a", ["a"]),
        ("a\nb\n", ["a", "b"]),
        ("a\r\nb\r\n\r\n", ["a", "b", ""]),
        ("a\r\r\nb\rc", ["a\r", "b\rc"]),  # only one "\r" before the "\n" ends the line
        ("a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i\n",
         ["a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"]),
    ],
)
def test_split_lines_breaks_at_newline_only(text, lines):
    assert ptio.split_lines(text) == lines
    # Joining with "\n" undoes it wherever no line ends with "\r".
    if not any(line.endswith("\r") for line in lines):
        assert ptio.split_lines("".join(f"{line}\n" for line in lines)) == lines


def test_split_lines_takes_only_str():
    with pytest.raises(TypeError, match="text"):
        ptio.split_lines(b"a\n")
