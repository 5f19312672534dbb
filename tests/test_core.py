import os
import subprocess
import sys

import pytest

import pytransformer
from pytransformer import _C


def test_cpu_info_fields():
    info = pytransformer.cpu_info()
    assert info["isa"] in ("generic", "avx2")
    assert info["num_threads"] == pytransformer.get_num_threads() >= 1
    assert isinstance(info["openmp"], bool)
    if not info["cpu_has_avx2_fma"]:
        assert info["isa"] == "generic"


def test_env_forces_generic(tmp_path):
    code = "import pytransformer; print(pytransformer.cpu_info()['isa'])"
    env = {**os.environ, "PYTRANSFORMER_ISA": "generic"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "generic"


def test_set_num_threads_roundtrip(threads):
    threads(1)
    assert pytransformer.get_num_threads() == 1
    threads(3)
    assert pytransformer.get_num_threads() == 3


@pytest.mark.parametrize("bad", [0, -2])
def test_set_num_threads_rejects_nonpositive(bad):
    with pytest.raises(ValueError, match="n:"):
        pytransformer.set_num_threads(bad)


def test_set_num_threads_rejects_non_int():
    with pytest.raises(TypeError, match="n:"):
        pytransformer.set_num_threads(2.0)


def test_force_isa_switches_and_restores(isa):
    assert _C.selected_isa() == isa


def _env_after_import(tmp_path, **env):
    code = "import os, pytransformer; print(os.environ.get('OMP_WAIT_POLICY'))"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_idle_threads_sleep_by_default_but_user_setting_wins(tmp_path):
    assert _env_after_import(tmp_path) == "PASSIVE"
    assert _env_after_import(tmp_path, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _env_after_import(tmp_path, GOMP_SPINCOUNT="1000") == "None"
