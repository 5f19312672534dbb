"""Shared fixtures: the ISA paths and thread counts every kernel test runs under."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import pytransformer
from pytransformer import _C

# CI runs a shorter hypothesis budget; PYTRANSFORMER_HYPOTHESIS_PROFILE=long runs deeper locally.
settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("PYTRANSFORMER_HYPOTHESIS_PROFILE", "default"))

ISAS = ["generic"] + (["avx2"] if _C.cpu_has_avx2_fma() else [])
# The int8 GEMM has one more level (avx512vnni runs the avx2 code everywhere else).
QGEMM_ISAS = ISAS + (["avx512vnni"] if _C.cpu_has_avx512_vnni() else [])
# So has the float GEMM (avx512: its 16-lane micro-kernel; every other kernel runs the avx2 code).
GEMM_ISAS = ISAS + (["avx512"] if _C.cpu_has_avx512() else [])


def _forced(name):
    before = _C.selected_isa()
    _C._force_isa(name)
    yield name
    _C._force_isa(before)


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per kernel set this CPU supports, then restores the default."""
    yield from _forced(request.param)


@pytest.fixture(params=QGEMM_ISAS)
def qisa(request):
    """As `isa`, over the int8 GEMM's kernel sets."""
    yield from _forced(request.param)


@pytest.fixture(params=GEMM_ISAS)
def gemm_isa(request):
    """As `isa`, over the float GEMM's kernel sets."""
    yield from _forced(request.param)


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = pytransformer.get_num_threads()
    yield pytransformer.set_num_threads
    pytransformer.set_num_threads(before)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
