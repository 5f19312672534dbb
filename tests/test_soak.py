"""Short forms of the soaks in tools/ (the long forms run for minutes; docs/RELIABILITY.md).

- Training killed with SIGKILL at random moments and resumed each time ends bit-identical to an
  uninterrupted run, with every checkpoint complete and none lost (tools/soak_kill_resume.py).
- 8 Python threads translating with one model give the serial results, with a flat RSS
  (tools/soak_threads.py, run in a fresh process so other tests' memory does not count).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import pytransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pytransformer.__file__)))
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_killed_and_resumed_ends_identical(tmp_path):
    kill_resume = _tool("soak_kill_resume")
    report = kill_resume.soak(kills=3, steps=40, seed=0, workdir=str(tmp_path))
    assert report["kills"] == 3 and report["identical"]
    assert report["leftover_temporary_dirs"] == 0  # killed saves were cleaned up afterwards
    steps = report["newest_checkpoint_after_each_kill"]
    assert steps == sorted(steps)


def test_the_kill_soak_audit_catches_a_damaged_checkpoint(tmp_path):
    kill_resume = _tool("soak_kill_resume")
    kill_resume.life(str(tmp_path), 4, None)
    assert kill_resume.audit(str(tmp_path), 0)[0] == 4
    with pytest.raises(kill_resume.SoakFailure, match="checkpoint lost"):
        kill_resume.audit(str(tmp_path), 6)
    os.remove(tmp_path / "step-00000004" / "model.safetensors")
    with pytest.raises(kill_resume.SoakFailure, match="checkpoint fails"):
        kill_resume.audit(str(tmp_path), 0)


def _soak_threads(*args: str) -> tuple[int, dict]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-P", os.path.join(TOOLS, "soak_threads.py"), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    os.environ.get("PYTRANSFORMER_SANITIZED") == "1", reason="RSS is meaningless under ASan"
)
def test_eight_threads_translate_like_serial_with_flat_rss():
    rc, report = _soak_threads("--threads", "8", "--seconds", "3", "--warmup", "1")
    assert report["mismatches"] == []
    assert report["distinct_serial_results"] > 10  # the comparison tells batches apart
    assert min(report["calls_per_thread"]) > 0
    assert rc == 0, report  # RSS within the bound after warm-up
    # and the RSS check fails on a leak of 200 KB per call
    rc, report = _soak_threads("--seconds", "3", "--warmup", "1", "--leak-bytes", "200000")
    assert rc == 1 and report["rss_growth_mb"] > report["rss_bound_mb"]
