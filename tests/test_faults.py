"""Checkpoints under faults: a save killed part-way, truncated and bit-flipped files, a full disk.

What must hold: an interrupted or failed save leaves the previous checkpoint loadable with its
exact values, and a damaged file is refused with a CheckpointError (a ValueError) that says what
is wrong, never loaded as garbage.
"""

from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from model_cases import small_config

import pytransformer
from pytransformer import Transformer
from pytransformer import io as ptio

# Children import the same pytransformer as this process (the sanitized copy under
# tools/sanitize.sh), not whatever the current directory holds: hence -P and this path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pytransformer.__file__)))


def _model(seed: int, **overrides) -> Transformer:
    return Transformer(small_config(17, 8, **{"max_len": 16, **overrides}), seed=seed)


def _assert_same_params(model, expected: dict[str, np.ndarray]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _leftover_temps(directory) -> list[str]:
    return glob.glob(os.path.join(directory, ".*.tmp"))


# ----------------------------------------------------------------------------------------------
# a save killed part-way
# ----------------------------------------------------------------------------------------------
# The child saves checkpoint 1 (seed 1), reports its parameter checksum, then saves checkpoint 2
# (seed 2) into the same directory; the file write of the second save announces itself and
# blocks after its first chunk (or, with PAUSE=0, runs at full speed), so the parent can SIGKILL
# it in the middle of writing.
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from pytransformer import Transformer, TransformerConfig
    from pytransformer import io as ptio

    directory, pause = sys.argv[1], float(sys.argv[2])
    d_model, vocab = int(sys.argv[3]), int(sys.argv[4])
    cfg = TransformerConfig(src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=d_model,
                            num_heads=2, d_ff=2 * d_model, num_encoder_layers=1,
                            num_decoder_layers=1, max_len=16)
    Transformer(cfg, seed=1).save(directory)
    print("saved1", flush=True)
    second = Transformer(cfg, seed=2)
    if pause > 0:
        real_fdopen = os.fdopen
        class Slow:
            def __init__(self, f):
                self.f, self.calls = f, 0
            def write(self, data):
                n = self.f.write(data)
                self.calls += 1
                if self.calls == 3:  # length, header, then part of the tensor data
                    self.f.flush()
                    print("writing", flush=True)
                    time.sleep(pause)
                return n
            def __getattr__(self, name):
                return getattr(self.f, name)
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self.f.__exit__(*exc)
        ptio.os.fdopen = lambda *a, **k: Slow(real_fdopen(*a, **k))
    else:
        print("writing", flush=True)
    for _ in range(1000):
        second.save(directory)
    """
)


def _spawn(directory, pause: float, d_model: int = 8, vocab: int = 17) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-P", "-c", _CHILD, str(directory), str(pause), str(d_model), str(vocab)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline().strip()
    if line != word:
        proc.kill()
        raise AssertionError(f"child said {line!r}, expected {word!r}: {proc.stderr.read()}")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    proc = _spawn(tmp_path, pause=60)
    try:
        _wait_for(proc, "saved1")
        _wait_for(proc, "writing")  # the second save's weights file is half written
        temps = _leftover_temps(tmp_path)
        assert temps, "the save is not writing to a temporary file"
        assert 0 < os.path.getsize(temps[0]) < os.path.getsize(tmp_path / "model.safetensors")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    loaded = Transformer.load(tmp_path)
    _assert_same_params(loaded, _model(seed=1).state_dict())
    # the torn temporary file is left behind (nothing can remove it after SIGKILL) and is
    # ignored; the next save replaces the checkpoint normally
    _model(seed=3).save(tmp_path)
    _assert_same_params(Transformer.load(tmp_path), _model(seed=3).state_dict())


def test_kill_at_random_moments_never_tears_the_checkpoint(tmp_path):
    """Real SIGKILLs at arbitrary moments of back-to-back saves of a ~8 MB model: the directory
    always holds checkpoint 1 or checkpoint 2, complete."""
    d_model, vocab = 64, 16000
    cfg = small_config(vocab, d_model, max_len=16)
    first = Transformer(cfg, seed=1).state_dict()
    second = Transformer(cfg, seed=2).state_dict()
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(4):
        directory = tmp_path / f"t{trial}"
        proc = _spawn(directory, pause=0, d_model=d_model, vocab=vocab)
        try:
            _wait_for(proc, "saved1")
            _wait_for(proc, "writing")
            try:
                proc.wait(timeout=float(rng.uniform(0.0, 0.5)))
            except subprocess.TimeoutExpired:
                pass
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.stderr.close()
        state = Transformer.load(directory).state_dict()
        name = "src_embed.weight"
        if np.array_equal(state[name], first[name]):
            _assert_same_params(Transformer.load(directory), first)
            seen.add(1)
        else:
            _assert_same_params(Transformer.load(directory), second)
            seen.add(2)
    assert seen  # which checkpoint survived depends on timing; both are valid outcomes


# ----------------------------------------------------------------------------------------------
# damaged files
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = _model(seed=5)
    model.save(tmp_path)
    return tmp_path, os.path.join(tmp_path, "model.safetensors")


def test_truncated_checkpoint_is_rejected(saved):
    directory, path = saved
    data = open(path, "rb").read()
    (header_len,) = np.frombuffer(data[:8], "<u8")
    cuts = sorted({0, 1, 7, 8, 9, 8 + int(header_len) // 2, 8 + int(header_len), len(data) // 2,
                   len(data) - 4, len(data) - 1})  # fmt: skip
    for cut in cuts:
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ptio.CheckpointError, match="model.safetensors") as info:
            Transformer.load(directory)
        msg = str(info.value)
        assert any(w in msg for w in ("truncated", "corrupt", "exceeds", "header")), msg
    with open(path, "wb") as f:  # and a byte too many
        f.write(data + b"\0")
    with pytest.raises(ptio.CheckpointError, match="trailing|checksum|corrupt"):
        Transformer.load(directory)


def test_bit_flips_anywhere_are_rejected(saved):
    directory, path = saved
    data = open(path, "rb").read()
    rng = np.random.default_rng(7)
    (header_len,) = np.frombuffer(data[:8], "<u8")
    # every byte of the length field and a sample of header and data positions
    positions = list(range(8)) + list(rng.integers(8, 8 + int(header_len), 60))
    positions += list(rng.integers(8 + int(header_len), len(data), 60))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(ptio.CheckpointError) as info:
            Transformer.load(directory)
        assert "model.safetensors" in str(info.value) or "config" in str(info.value)
    with open(path, "wb") as f:
        f.write(data)
    Transformer.load(directory)  # the pristine file still loads


def test_damaged_config_json_is_rejected(saved):
    directory, _ = saved
    path = os.path.join(directory, "config.json")
    text = open(path).read()
    for bad in (text[: len(text) // 2], "", "[]", text.replace('"d_model": 8', '"d_model": "8"')):
        with open(path, "w") as f:
            f.write(bad)
        with pytest.raises(ptio.CheckpointError, match="config"):
            Transformer.load(directory)
    # A valid config.json that disagrees with the weights: the stored config wins, loudly.
    with open(path, "w") as f:
        f.write(text.replace('"d_model": 8', '"d_model": 16'))
    with pytest.warns(UserWarning, match="d_model: 16 there, 8 stored"):
        assert Transformer.load(directory).config.d_model == 8


def test_crash_between_the_two_renames_of_a_new_config(tmp_path, monkeypatch):
    """save() over a checkpoint of another config, stopped after the weights file was renamed
    into place but before config.json: the directory loads as the new model (with a warning)."""
    _model(seed=1, d_ff=24).save(tmp_path)
    new = _model(seed=2)

    def crash(path, text):
        raise KeyboardInterrupt  # as if the process died here

    monkeypatch.setattr(ptio, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="interrupted save"):
        loaded = Transformer.load(tmp_path)
    _assert_same_params(loaded, new.state_dict())


def test_missing_files_are_rejected(saved):
    directory, path = saved
    os.remove(path)
    with pytest.raises(ptio.CheckpointError, match="missing"):
        Transformer.load(directory)
    with pytest.raises(ptio.CheckpointError, match="missing"):
        Transformer.load(os.path.join(directory, "nowhere"))


# ----------------------------------------------------------------------------------------------
# a full disk
# ----------------------------------------------------------------------------------------------
class _FullDisk:
    """A file object whose writes fail with ENOSPC once `budget` bytes are written."""

    def __init__(self, f, budget: int):
        self._f, self._left = f, budget

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._left:
            self._f.write(memoryview(data).cast("B")[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


@pytest.mark.parametrize("budget", [0, 100, 5000])
def test_full_disk_while_saving_keeps_old_checkpoint(tmp_path, monkeypatch, budget):
    old = _model(seed=1)
    old.save(tmp_path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(ptio.os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k), budget))
    with pytest.raises(OSError) as info:
        _model(seed=2).save(tmp_path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    _assert_same_params(Transformer.load(tmp_path), old.state_dict())
    assert not _leftover_temps(tmp_path), "the failed save left its temporary file behind"


def test_fsync_failure_keeps_old_checkpoint(tmp_path, monkeypatch):
    """Delayed write-back errors surface at fsync: the save must fail, not rename."""
    old = _model(seed=1)
    old.save(tmp_path)

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ptio.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        _model(seed=2).save(tmp_path)
    monkeypatch.undo()
    _assert_same_params(Transformer.load(tmp_path), old.state_dict())
    assert not _leftover_temps(tmp_path)


def test_full_disk_on_config_after_weights(tmp_path, monkeypatch):
    """The weights are renamed into place first, then config.json: a failure in between leaves
    new weights with the (identical) old config, which loads as the new checkpoint."""
    _model(seed=1).save(tmp_path)
    real = ptio.atomic_write_text

    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ptio, "atomic_write_text", no_space)
    with pytest.raises(OSError):
        _model(seed=2).save(tmp_path)
    monkeypatch.setattr(ptio, "atomic_write_text", real)
    _assert_same_params(Transformer.load(tmp_path), _model(seed=2).state_dict())
