"""What the fuzzers share: drawing valid and broken arguments, checking a call, the watchdog.

test_fuzz_kernels.py fuzzes every public kernel binding, test_fuzz_models.py the models' public
methods. Each case draws arguments that are either valid (random dtypes of the right kind, any
strides, zero sizes, NaN/inf values) or broken in one way (wrong dtype, rank or shape, mismatched
lengths, negative or huge ids, non-contiguous or read-only outputs, wrong Python types). A valid
call must return what a float64 numpy reference (reference.py) returns (elements where the
reference is not finite are not compared); a broken call must raise TypeError, ValueError or
IndexError. A crash takes the interpreter down and fails the run; a hang is cut by faulthandler
after HANG_SECONDS.

Short by default (the "default" hypothesis profile); PYTRANSFORMER_HYPOTHESIS_PROFILE=long runs
ten times as many examples. The number of calls made is printed at the end of each module.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ALLOWED = (TypeError, ValueError, IndexError)
HANG_SECONDS = 300
CALLS: collections.Counter = collections.Counter()
_LONG = os.environ.get("PYTRANSFORMER_HYPOTHESIS_PROFILE") == "long"
# Examples per test (the long profile: ten times more); model cases are slower, so fewer.
KERNEL_EXAMPLES = 1500 if _LONG else 150
MODEL_EXAMPLES = 400 if _LONG else 40
# Kernel tests run once per ISA (the `isa` fixture: generic and, where the CPU has it, AVX2),
# each with half the examples. The fixture only selects the ISA, so sharing it between the
# examples of one test is intended.
kernel_settings = settings(
    max_examples=KERNEL_EXAMPLES // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Model cases are slower: fewer examples, and no ISA fixture.
model_settings = settings(
    max_examples=MODEL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# count files this session has started (the first module to report empties the file)
_COUNT_FILES: set = set()


@pytest.fixture(scope="module", autouse=True)
def fuzz_watchdog(request):
    """Per fuzz module (import it there; it is autouse): a hang past HANG_SECONDS dumps every
    thread's stack and exits; at the end the calls the module made are printed, and appended to
    $PYTRANSFORMER_FUZZ_COUNT_FILE when that is set."""
    CALLS.clear()
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=sys.__stderr__)
    yield
    faulthandler.cancel_dump_traceback_later()
    total = sum(CALLS.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(CALLS.items()))
    line = f"fuzz: {request.module.__name__}: {total} calls ({detail})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    out = os.environ.get("PYTRANSFORMER_FUZZ_COUNT_FILE")
    if out:
        with open(out, "a" if out in _COUNT_FILES else "w") as f:
            f.write(line + "\n")
        _COUNT_FILES.add(out)


# ----------------------------------------------------------------------------------------------
# drawing arrays
# ----------------------------------------------------------------------------------------------
def draw_dims(draw, n, lo=0, hi=5):
    return tuple(draw(st.integers(lo, hi)) for _ in range(n))


def draw_gemm_dims(draw):
    """(M, K, N) for matmul: mostly tiny, else sizes that reach every path of
    csrc/gemm/gemm_isa.cc: full 16-column tiles, M on both sides of 4, 16 and 32 (M > 32 is the
    blocked path), K past one 256-deep KC block, M past one 144-row MC block."""
    size = draw(st.sampled_from(["tiny", "tiny", "tiles", "blocked"]))
    if size == "tiny":
        return draw_dims(draw, 3, 0, 9)
    if size == "tiles":
        return draw(st.integers(1, 40)), draw(st.integers(1, 80)), draw(st.integers(16, 70))
    return draw(st.integers(33, 200)), draw(st.integers(200, 300)), draw(st.integers(1, 70))


def draw_attention_dims(draw):
    """(B, Lq, Lk, H, D): mostly tiny, else lengths past one 64-query / 64-key tile (Lq > 128:
    the path that first packs strided keys; Lk > 256: more than one backward key block) and D up
    to 128, multiples of 8 (the direct kernel) or not (the padded copy)."""
    size = draw(st.sampled_from(["tiny", "tiny", "tiny", "tiles", "long"]))
    if size == "tiny":
        B, Lq, Lk, H = draw_dims(draw, 4, 0, 4)
        return B, Lq, Lk, H, draw(st.integers(1, 9))
    if size == "tiles":
        B, H = draw_dims(draw, 2, 1, 2)
        Lq, Lk = draw_dims(draw, 2, 1, 200)
        return B, Lq, Lk, H, draw(st.sampled_from([8, 16, 24, 63, 64, 128]))
    return 1, draw(st.integers(1, 140)), draw(st.integers(200, 300)), 1, draw(
        st.sampled_from([8, 13, 32])
    )


def draw_values(draw, shape, dtype=np.float32, nonfinite=None, scale=1.0):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = np.asarray(rng.standard_normal(shape) * scale, dtype=dtype)
    if nonfinite is None:
        nonfinite = draw(st.integers(0, 9)) == 0
    if nonfinite and x.size:
        flat = x.reshape(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, x.size - 1))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf])
            )
    return x


def draw_layout(draw, x):
    """x itself, or an equal array with other strides (a strided slice or a transposed copy)."""
    kind = draw(st.sampled_from(["c", "c", "slice", "fortran"]))
    if kind == "slice" and x.ndim:
        ax = draw(st.integers(0, x.ndim - 1))
        shape = list(x.shape)
        shape[ax] *= 2
        big = np.zeros(shape, x.dtype)
        idx = [slice(None)] * x.ndim
        idx[ax] = slice(None, None, 2)
        big[tuple(idx)] = x
        return big[tuple(idx)]
    if kind == "fortran" and x.ndim:
        return np.asfortranarray(x)
    return x


def draw_array(draw, shape, **kw):
    return draw_layout(draw, draw_values(draw, shape, **kw))


def draw_ids(draw, shape, vocab, dtype=None):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = dtype or draw(st.sampled_from([np.int32, np.int64]))
    return np.asarray(rng.integers(0, max(vocab, 1), size=shape), dtype=dtype)


BAD_DTYPES = [np.float64, np.float16, np.int32, np.int64, np.bool_, np.complex64]


def break_array(draw, x, allow_shape=True, axes=None, rank=True):
    """x broken one way: a wrong dtype, two extra or all but one axis gone, one of `axes` (all
    by default) longer, or not an array at all."""
    options = ["dtype", "list", "none"]
    if allow_shape and np.ndim(x):
        options += (["grow"] if axes != [] else []) + (["rank_up", "rank_down"] if rank else [])
    how = draw(st.sampled_from(options))
    if how == "dtype":
        ints = np.asarray(x).dtype.kind in "iu"
        bad = [np.float32, np.float64, np.bool_] if ints else BAD_DTYPES
        return np.asarray(x).astype(draw(st.sampled_from(bad)))
    if how == "list":
        return np.asarray(x).tolist() if np.ndim(x) else "x"
    if how == "none":
        return None
    if how == "rank_up":
        return np.asarray(x)[None, None]
    if how == "rank_down":
        if np.ndim(x) == 1:
            return np.asarray(x).reshape(-1)[0] if np.size(x) else 0.0
        return np.asarray(x).reshape(-1)
    axes = list(range(np.ndim(x))) if axes is None else axes
    ax = draw(st.sampled_from(axes))
    shape = list(np.shape(x))
    shape[ax] += draw(st.integers(1, 3))
    return np.zeros(shape, np.asarray(x).dtype)


def break_one(draw, args: dict, names, allow_shape=True, axes=None, flexible=()):
    """args with one of `names` broken; axes: name -> the axes whose length is constrained;
    flexible: names whose rank is free (no rank change)."""
    name = draw(st.sampled_from(names))
    args = dict(args)
    args[name] = break_array(
        draw, args[name], allow_shape, (axes or {}).get(name), rank=name not in flexible
    )
    return args, name


# ----------------------------------------------------------------------------------------------
# checking a call
# ----------------------------------------------------------------------------------------------
def check_close(name, got, want, rtol=2e-4, atol=2e-5):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    fin = np.isfinite(want)
    if not fin.any():
        return
    scale = max(1.0, float(np.abs(want[fin]).max()))
    err = np.abs(got[fin] - want[fin])
    bad = err > atol * scale + rtol * np.abs(want[fin])
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {fin.sum()} elements differ, max error {err.max():.3g} "
        f"(scale {scale:.3g})"
    )


def expect_raise(label, fn, *args, **kwargs):
    """A broken call: it must raise one of ALLOWED (and nothing else, and not return)."""
    CALLS[label] += 1
    try:
        result = fn(*args, **kwargs)
    except ALLOWED:
        return
    pytest.fail(
        f"{label}: accepted an invalid argument and returned {type(result).__name__}: "
        f"{_describe(args)} {_describe(kwargs)}"
    )


def _describe(obj):
    if isinstance(obj, dict):
        return {k: _describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and len(obj) < 10:
        return type(obj)([_describe(v) for v in obj])
    if isinstance(obj, np.ndarray):
        return f"array{obj.shape}:{obj.dtype}:strides{obj.strides}" + (
            f"={obj.tolist()}" if obj.size < 5 and obj.dtype.kind in "iub" else ""
        )
    return repr(obj)[:60]


def call_ok(label, fn, *args, **kwargs):
    CALLS[label] += 1
    return fn(*args, **kwargs)
