import os
import subprocess
import sys

import pytest

import pytransformer
from pytransformer import _C


def test_cpu_info_fields():
    info = pytransformer.cpu_info()
    assert info["isa"] in ("generic", "avx2", "avx512", "avx512vnni")
    assert info["num_threads"] == pytransformer.get_num_threads() >= 1
    assert isinstance(info["openmp"], bool)
    if not info["cpu_has_avx2_fma"]:
        assert info["isa"] == "generic"
    if not info["cpu_has_avx512_vnni"]:
        assert info["isa"] != "avx512vnni"
    if not info["cpu_has_avx512"]:
        assert info["isa"] in ("generic", "avx2")
    assert info["cpu_has_avx512"] or not info["cpu_has_avx512_vnni"]


def _isa_with_env(tmp_path, value):
    code = "import pytransformer; print(pytransformer.cpu_info()['isa'])"
    env = {**os.environ, "PYTRANSFORMER_ISA": value}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_env_forces_generic(tmp_path):
    assert _isa_with_env(tmp_path, "generic") == "generic"


def _best_at_or_below(level):
    """The level a request for `level` should get on this CPU."""
    order = ["generic", "avx2", "avx512", "avx512vnni"]
    has = {"generic": True, "avx2": _C.cpu_has_avx2_fma(), "avx512": _C.cpu_has_avx512(),
           "avx512vnni": _C.cpu_has_avx512_vnni()}
    return next(name for name in reversed(order[: order.index(level) + 1]) if has[name])


def test_env_caps_the_level(tmp_path):
    """PYTRANSFORMER_ISA=avx2 keeps the float GEMM off AVX-512 and the int8 GEMM off VNNI,
    =avx512 only the latter; the default takes the best level."""
    for level in ("avx2", "avx512", "avx512vnni"):
        assert _isa_with_env(tmp_path, level) == _best_at_or_below(level)
    assert _isa_with_env(tmp_path, "") == _best_at_or_below("avx512vnni")


def test_force_isa_falls_back_and_rejects_unknown_names():
    before = _C.selected_isa()
    try:
        for level in ("avx512vnni", "avx512", "avx2"):
            assert _C._force_isa(level) == _best_at_or_below(level)
        with pytest.raises(ValueError, match="name:"):
            _C._force_isa("avx512f")
    finally:
        _C._force_isa(before)


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
    code = ("import os, pytransformer; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_idle_threads_spin_briefly_by_default_but_user_setting_wins(tmp_path):
    assert _env_after_import(tmp_path) == "None 1000"
    assert _env_after_import(tmp_path, OMP_WAIT_POLICY="PASSIVE") == "PASSIVE None"
    assert _env_after_import(tmp_path, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE None"
    assert _env_after_import(tmp_path, GOMP_SPINCOUNT="50") == "None 50"
