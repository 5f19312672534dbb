"""Fuzzing of every public kernel binding and of the models' public methods.

Each case draws arguments that are either valid (random dtypes of the right kind, any strides,
zero sizes, NaN/inf values) or broken in one way (wrong dtype, rank or shape, mismatched lengths,
negative or huge ids, non-contiguous or read-only outputs, wrong Python types). A valid call must
return what a float64 numpy reference returns (elements where the reference is not finite are
not compared); a broken call must raise TypeError, ValueError or IndexError. A crash takes the
interpreter down and fails the run; a hang is cut by faulthandler after HANG_SECONDS.

Short by default (the "default" hypothesis profile); PYTRANSFORMER_HYPOTHESIS_PROFILE=long runs
ten times as many examples. The number of calls made is printed at the end of the module.
"""

from __future__ import annotations

import collections
import faulthandler
import math
import os
import sys
import tempfile
import types

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pytransformer import (
    Transformer,
    TransformerConfig,
    TransformerEncoderModel,
    TransformerLM,
    ops,
)
from pytransformer.data import Batch

pytestmark = pytest.mark.fuzz

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


@pytest.fixture(scope="module", autouse=True)
def _report_and_watchdog(request):
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=sys.__stderr__)
    yield
    faulthandler.cancel_dump_traceback_later()
    total = sum(CALLS.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(CALLS.items()))
    line = f"fuzz: {total} calls ({detail})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    out = os.environ.get("PYTRANSFORMER_FUZZ_COUNT_FILE")
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------------------------
# drawing arrays
# ----------------------------------------------------------------------------------------------
def _dims(draw, n, lo=0, hi=5):
    return tuple(draw(st.integers(lo, hi)) for _ in range(n))


def _values(draw, shape, dtype=np.float32, nonfinite=None, scale=1.0):
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


def _layout(draw, x):
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


def _array(draw, shape, **kw):
    return _layout(draw, _values(draw, shape, **kw))


def _ids(draw, shape, vocab, dtype=None):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = dtype or draw(st.sampled_from([np.int32, np.int64]))
    return np.asarray(rng.integers(0, max(vocab, 1), size=shape), dtype=dtype)


BAD_DTYPES = [np.float64, np.float16, np.int32, np.int64, np.bool_, np.complex64]


def _break_array(draw, x, allow_shape=True, axes=None, rank=True):
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


def _break_one(draw, args: dict, names, allow_shape=True, axes=None, flexible=()):
    """args with one of `names` broken; axes: name -> the axes whose length is constrained;
    flexible: names whose rank is free (no rank change)."""
    name = draw(st.sampled_from(names))
    args = dict(args)
    args[name] = _break_array(
        draw, args[name], allow_shape, (axes or {}).get(name), rank=name not in flexible
    )
    return args, name


# ----------------------------------------------------------------------------------------------
# checking a call
# ----------------------------------------------------------------------------------------------
def _close(name, got, want, rtol=2e-4, atol=2e-5):
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


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@kernel_settings
@given(st.data())
def test_fuzz_matmul(isa, data):
    draw = data.draw
    batched = draw(st.sampled_from(["none", "a", "b", "both"]))
    bt = draw(st.integers(0, 3))
    M, K, N = _dims(draw, 3, 0, 9)
    ta, tb = draw(st.booleans()), draw(st.booleans())
    a_shape = (K, M) if ta else (M, K)
    b_shape = (N, K) if tb else (K, N)
    if batched in ("a", "both"):
        a_shape = (bt,) + a_shape
    if batched in ("b", "both"):
        b_shape = (bt,) + b_shape
    args = {
        "a": _array(draw, a_shape),
        "b": _array(draw, b_shape),
        "bias": _array(draw, (N,)) if draw(st.booleans()) else None,
    }
    activation = draw(st.sampled_from([None, "relu", "gelu"]))
    accumulate = draw(st.booleans())
    if accumulate:
        activation = None
    out_shape = (bt, M, N) if batched != "none" else (M, N)
    out0 = _values(draw, out_shape) if accumulate or draw(st.booleans()) else None
    broken = draw(st.integers(0, 3)) == 0
    if broken:
        choice = draw(st.sampled_from(["array", "activation", "acc_no_out", "acc_act", "out_nc"]))
        if choice == "array":
            names = ["a", "b"] + (["bias"] if args["bias"] is not None else [])
            axes = {"a": [-2 if ta else -1], "b": [-1 if tb else -2], "bias": [0]}
            args, _ = _break_one(draw, args, names, axes=axes)
        elif choice == "activation":
            activation = draw(st.sampled_from(["tanh", "RELU", 3, ""]))
        elif choice == "acc_no_out":
            accumulate, out0 = True, None
        elif choice == "acc_act":
            accumulate, activation = True, "relu"
            out0 = _values(draw, out_shape)
        else:
            if out0 is None or out0.ndim < 2 or out0.shape[-1] < 2:
                wide = np.zeros(out_shape[:-1] + (max(out_shape[-1], 1) * 2,), np.float32)
                # An empty array is C-contiguous whatever its strides: give a wrong shape instead.
                out0 = wide if 0 in out_shape else wide[..., ::2]
            else:
                out0 = np.asfortranarray(out0) if out0.shape[-2] > 1 else out0[..., ::-1]
                if out0.flags.c_contiguous:
                    out0 = np.zeros(out_shape + (1,), np.float32)
        out = out0.copy() if isinstance(out0, np.ndarray) and out0.flags.c_contiguous else out0
        expect_raise(
            "matmul",
            ops.matmul,
            args["a"],
            args["b"],
            trans_a=ta,
            trans_b=tb,
            bias=args["bias"],
            activation=activation,
            out=out,
            accumulate=accumulate,
        )
        return
    if out0 is not None and out0.size == 0:  # see test_zero_size_out_accepted
        out0, accumulate = None, False
    out = out0.copy() if out0 is not None else None
    got = call_ok(
        "matmul",
        ops.matmul,
        args["a"],
        args["b"],
        trans_a=ta,
        trans_b=tb,
        bias=args["bias"],
        activation=activation,
        out=out,
        accumulate=accumulate,
    )
    want = ref.matmul(
        args["a"], args["b"], ta, tb, args["bias"], activation, out0 if accumulate else None
    )
    want = np.broadcast_to(want, out_shape) if want.shape != out_shape else want
    assert got.dtype == np.float32 and got.shape == out_shape
    if out is not None:
        assert got is out
    _close("matmul", got, want, rtol=1e-4, atol=1e-5 * max(K, 1))


@kernel_settings
@given(st.data())
def test_fuzz_packed_matmul(isa, data):
    """PackedWeight(w) and matmul(a, packed, ...) with a valid or one broken argument."""
    draw = data.draw
    M, K, N = _dims(draw, 3, 0, 40)
    bt = draw(st.sampled_from([None, 0, 2]))
    a_shape = (M, K) if bt is None else (bt, M, K)
    args = {
        "a": _array(draw, a_shape),
        "w": _array(draw, (N, K)),
        "bias": _array(draw, (N,)) if draw(st.booleans()) else None,
    }
    activation = draw(st.sampled_from([None, "relu", "gelu"]))
    if draw(st.integers(0, 3)) == 0:
        names = ["a", "w"] + (["bias"] if args["bias"] is not None else [])
        args, name = _break_one(draw, args, names, axes={"a": [-1], "w": [1], "bias": [0]})
        if name == "bias" and args["bias"] is None:
            return  # "broken" into no bias, which is valid
        if name == "w":
            a, w = args["a"], args["w"]
            expect_raise("packed_matmul", lambda: ops.matmul(a, ops.PackedWeight(w)))
        else:
            pw = ops.PackedWeight(args["w"]) if N and K else None
            if pw is not None:
                expect_raise("packed_matmul", ops.matmul, args["a"], pw, bias=args["bias"])
        return
    if N == 0 or K == 0:
        expect_raise("packed_matmul", ops.PackedWeight, args["w"])
        return
    pw = call_ok("packed_matmul", ops.PackedWeight, args["w"])
    got = call_ok("packed_matmul", ops.matmul, args["a"], pw, bias=args["bias"],
                  activation=activation)
    want = ref.matmul(args["a"], args["w"], trans_b=True, bias=args["bias"], activation=activation)
    assert got.dtype == np.float32 and got.shape == want.shape
    _close("packed_matmul", got, want, rtol=1e-4, atol=1e-5 * K)


@kernel_settings
@given(st.data())
def test_fuzz_attention(isa, data):
    draw = data.draw
    B, Lq, Lk, H = _dims(draw, 4, 0, 4)
    D = draw(st.integers(1, 9))
    if draw(st.booleans()):
        B, H = max(B, 1), max(H, 1)
    causal = draw(st.booleans())
    offset = draw(st.integers(0, 3))
    scale = draw(st.sampled_from([None, 0.5, 1.0]))
    q = _array(draw, (B, Lq, H, D))
    # k and v as views into one fused (B, Lk, 2, H, D) buffer, or separate arrays
    if draw(st.booleans()):
        kv = _values(draw, (B, Lk, 2, H, D))
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        k, v = _array(draw, (B, Lk, H, D)), _array(draw, (B, Lk, H, D))
    lengths = None
    if draw(st.booleans()):
        lengths = _ids(draw, (B,), Lk + 1)
        if Lk and B:  # garbage past the lengths must never reach the output
            for b in range(B):
                k[b, lengths[b] :] = np.nan
                v[b, lengths[b] :] = np.inf
    want, want_lse = ref.attention(q, k, v, lengths, causal, offset, scale)
    broken = draw(st.integers(0, 3)) == 0
    kwargs = dict(key_lengths=lengths, causal=causal, query_offset=offset, scale=scale)
    if broken:
        choice = draw(st.sampled_from(["array", "lengths", "flags"]))
        args = {"q": q, "k": k, "v": v}
        if choice == "array":
            args, _ = _break_one(draw, args, ["q", "k", "v"], axes={"q": [0, 2, 3]})
        elif choice == "lengths":
            kwargs["key_lengths"] = draw(
                st.sampled_from(
                    [
                        np.full((B + 1,), 0, np.int64),
                        np.full((B,), -1, np.int64),
                        np.full((B,), Lk + 1, np.int64),
                        np.full((B,), 2**40, np.int64),
                        np.zeros((B,), np.float32),
                        np.zeros((B, 1), np.int64),
                        [0] * B,
                    ]
                )
            )
            if B == 0 and isinstance(kwargs["key_lengths"], np.ndarray):
                kwargs["key_lengths"] = np.zeros((1,), np.int64)
        else:
            key = draw(st.sampled_from(["causal", "query_offset", "scale"]))
            kwargs[key] = draw(
                st.sampled_from(
                    {
                        "causal": ["yes", 1, None],
                        "query_offset": [-1, 1.5, "x", None],
                        "scale": ["yes", []],
                    }[key]
                )
            )
        expect_raise("attention", ops.attention, args["q"], args["k"], args["v"], **kwargs)
        return
    if 0 in q.shape or 0 in k.shape:  # an empty problem: a clean refusal or an empty result
        CALLS["attention"] += 1
        try:
            got = ops.attention(q, k, v, **kwargs)
        except ValueError:
            return
        _close("attention.out", got, want)
        return
    got, lse = call_ok("attention", ops.attention, q, k, v, return_lse=True, **kwargs)
    assert got.flags.c_contiguous and got.dtype == np.float32
    _close("attention.out", got, want, atol=1e-5)
    assert lse.shape == (B, H, Lq)
    fin = np.isfinite(want_lse)
    known = ~np.isnan(want_lse)
    np.testing.assert_array_equal(np.isneginf(lse)[known], np.isneginf(want_lse)[known])
    _close("attention.lse", np.where(fin, lse, 0), np.where(fin, want_lse, 0), atol=1e-5)
    if Lq == 1 and B and H and not causal:  # the decode path has no causal mask
        dec = call_ok(
            "attention_decode",
            ops.attention_decode,
            q[:, 0],
            k,
            v,
            key_lengths=lengths,
            scale=scale,
        )
        _close("attention_decode", dec, want[:, 0], atol=1e-5)
    if np.isfinite(want).all() and np.isfinite(q).all():
        dout = _values(draw, (B, Lq, H, D), nonfinite=False)
        dq, dk, dv = call_ok(
            "attention_backward", ops.attention_backward, dout, q, k, v, got, lse, **kwargs
        )
        dq_ref, dk_ref, dv_ref = ref.attention_backward(
            dout, q, k, v, lengths, causal, offset, scale
        )
        _close("attention_backward.dq", dq, dq_ref, atol=1e-4)
        _close("attention_backward.dk", dk, dk_ref, atol=1e-4)
        _close("attention_backward.dv", dv, dv_ref, atol=1e-4)


@kernel_settings
@given(st.data())
def test_fuzz_attention_backward_broken(isa, data):
    draw = data.draw
    B, Lq, Lk, H, D = _dims(draw, 5, 1, 3)
    q, k, v = (_values(draw, (B, L, H, D), nonfinite=False) for L in (Lq, Lk, Lk))
    out, lse = ops.attention(q, k, v, return_lse=True)
    dout = _values(draw, out.shape, nonfinite=False)
    args = {"dout": dout, "q": q, "k": k, "v": v, "out": out, "lse": lse}
    args, _ = _break_one(draw, args, list(args))
    expect_raise("attention_backward", ops.attention_backward, *args.values())


@kernel_settings
@given(st.data())
def test_fuzz_layer_norm(isa, data):
    draw = data.draw
    rank = draw(st.integers(1, 3))
    shape = _dims(draw, rank, 0, 6)
    C = shape[-1]
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]))
    args = {
        "x": _array(draw, shape, scale=draw(st.sampled_from([1.0, 1e3]))),
        "residual": _array(draw, shape),
        "gamma": _array(draw, (C,)),
        "beta": _array(draw, (C,)),
    }
    fused = draw(st.booleans())
    broken = draw(st.integers(0, 3)) == 0
    if broken:
        names = ["x", "gamma", "beta"] + (["residual"] if fused else [])
        args, _ = _break_one(
            draw,
            args,
            names,
            axes={"x": [-1], "gamma": [0], "beta": [0]},
            flexible=("x", "residual"),
        )
        if draw(st.integers(0, 4)) == 0:
            eps = draw(st.sampled_from(["a", None, -1.0, float("nan")]))
            args = {**args}
        if fused:
            expect_raise(
                "add_layer_norm",
                ops.add_layer_norm,
                args["x"],
                args["residual"],
                args["gamma"],
                args["beta"],
                eps,
            )
        else:
            expect_raise("layer_norm", ops.layer_norm, args["x"], args["gamma"], args["beta"], eps)
        return
    if C == 0:  # normalising over an empty axis has no meaning: accept a clean refusal
        fn = ops.add_layer_norm if fused else ops.layer_norm
        extra = (args["residual"],) if fused else ()
        CALLS["layer_norm(C=0)"] += 1
        try:
            r = fn(args["x"], *extra, args["gamma"], args["beta"], eps, return_stats=True)
        except ValueError:
            return
        assert r[0].shape == shape
        return
    x = ref.f64(args["x"]) + (ref.f64(args["residual"]) if fused else 0.0)
    want, mean, rstd = ref.layer_norm(x, args["gamma"], args["beta"], eps)
    if fused:
        y, s, m, r = call_ok(
            "add_layer_norm",
            ops.add_layer_norm,
            args["x"],
            args["residual"],
            args["gamma"],
            args["beta"],
            eps,
            return_stats=True,
        )
        _close("add_layer_norm.s", s, x)
        xs = s
    else:
        y, m, r = call_ok(
            "layer_norm",
            ops.layer_norm,
            args["x"],
            args["gamma"],
            args["beta"],
            eps,
            return_stats=True,
        )
        xs = args["x"]
    _close("layer_norm.y", y, want, rtol=1e-3, atol=1e-4)
    _close("layer_norm.mean", m, mean, rtol=1e-4, atol=1e-5)
    _close("layer_norm.rstd", r, rstd, rtol=1e-3, atol=1e-5)
    if not np.isfinite(want).all():
        return
    dy = _array(draw, shape, nonfinite=False)
    dx, dg, db = call_ok(
        "layer_norm_backward", ops.layer_norm_backward, dy, xs, args["gamma"], m, r
    )
    dx_ref, dg_ref, db_ref = ref.layer_norm_backward(dy, x, args["gamma"], eps)
    _close("layer_norm_backward.dx", dx, dx_ref, rtol=1e-3, atol=1e-3)
    _close("layer_norm_backward.dgamma", dg, dg_ref, rtol=1e-3, atol=1e-3)
    _close("layer_norm_backward.dbeta", db, db_ref, rtol=1e-3, atol=1e-4)
    bargs = {"dy": dy, "x": xs, "gamma": args["gamma"], "mean": m, "rstd": r}
    bargs, _ = _break_one(draw, bargs, list(bargs))
    expect_raise("layer_norm_backward", ops.layer_norm_backward, *bargs.values())


@kernel_settings
@given(st.data())
def test_fuzz_softmax_cross_entropy(isa, data):
    draw = data.draw
    N, V = draw(st.integers(0, 7)), draw(st.integers(1, 12))
    logits = _array(draw, (N, V), scale=draw(st.sampled_from([1.0, 30.0])))
    targets = _ids(draw, (N,), V)
    ignore = draw(st.sampled_from([-100, 0, 3]))
    if N and draw(st.booleans()):
        targets[draw(st.integers(0, N - 1))] = ignore
    eps = draw(st.sampled_from([0.0, 0.1, 0.5]))
    broken = draw(st.integers(0, 3)) == 0
    if broken:
        choice = draw(st.sampled_from(["array", "target", "smoothing", "inplace"]))
        kwargs = dict(label_smoothing=eps, ignore_index=ignore)
        args = {"logits": logits, "targets": targets}
        if choice == "array":
            args, _ = _break_one(draw, args, ["logits", "targets"], axes={"logits": [0]})
        elif choice == "target":
            t = np.ones(max(N, 1), np.int64)
            t[0] = draw(st.sampled_from([-1, V, 2**40, -(2**40)]))
            if t[0] == ignore:
                t[0] = V
            args["targets"] = t
            args["logits"] = _values(draw, (t.size, V))
        elif choice == "smoothing":
            kwargs["label_smoothing"] = draw(st.sampled_from([-0.1, 1.5, float("nan"), "x"]))
        else:
            ro = np.ascontiguousarray(logits)
            ro.flags.writeable = False
            strided = np.ones((4, 6), np.float32)[:, ::2]
            args["logits"] = draw(st.sampled_from([ro, strided]))
            args["targets"] = np.zeros(args["logits"].shape[0], np.int64)
            kwargs["inplace"] = True
        expect_raise(
            "softmax_cross_entropy",
            ops.softmax_cross_entropy,
            args["logits"],
            args["targets"],
            **kwargs,
        )
        return
    inplace = draw(st.booleans()) and logits.size > 0  # see test_zero_size_out_accepted
    buf = np.ascontiguousarray(logits).copy() if inplace else logits
    loss, dl = call_ok(
        "softmax_cross_entropy",
        ops.softmax_cross_entropy,
        buf,
        targets,
        label_smoothing=eps,
        ignore_index=ignore,
        inplace=inplace,
    )
    if inplace:
        assert dl is buf
    want_loss, want_d = ref.softmax_cross_entropy(logits, targets, eps, ignore)
    if math.isfinite(want_loss):
        assert math.isclose(loss, want_loss, rel_tol=1e-4, abs_tol=1e-4), (loss, want_loss)
    _close("softmax_cross_entropy.dlogits", dl, want_d, atol=1e-6)


@kernel_settings
@given(st.data())
def test_fuzz_elementwise(isa, data):
    """log_softmax, gelu, gelu_backward, relu_backward."""
    draw = data.draw
    shape = _dims(draw, draw(st.integers(0, 3)), 0, 7)
    x = _array(draw, shape, scale=draw(st.sampled_from([1.0, 10.0])))
    dout = _array(draw, shape)
    which = draw(st.sampled_from(["log_softmax", "gelu", "gelu_backward", "relu_backward"]))
    fn = getattr(ops, which)
    broken = draw(st.integers(0, 3)) == 0
    two = which.endswith("backward")
    if broken:
        args = {"a": dout, "b": x} if two else {"a": x}
        if not two and draw(st.booleans()):  # a bad out=
            bad_out = draw(
                st.sampled_from(
                    [
                        np.zeros(shape + (1,), np.float32),
                        np.zeros(shape, np.float64),
                        np.zeros(tuple(2 * s for s in shape), np.float32)[
                            tuple(slice(None, None, 2) for _ in shape)
                        ],
                    ]
                )
            )
            if (
                bad_out.shape == shape
                and bad_out.dtype == np.float32
                and bad_out.flags.c_contiguous
            ):
                bad_out = np.zeros(shape + (2,), np.float32)
            expect_raise(which, fn, x, out=bad_out)
            return
        args, _ = _break_one(draw, args, list(args), allow_shape=two)
        expect_raise(which, fn, *args.values())
        return
    if which == "log_softmax":
        if len(shape) == 0 or shape[-1] == 0:  # no axis to normalise over: refused
            expect_raise(which, fn, x)
            return
        with np.errstate(invalid="ignore", over="ignore"):
            want = ref.log_softmax(x)
        use_out = draw(st.booleans()) and x.size > 0  # see test_zero_size_out_accepted
        out = np.empty(shape, np.float32) if use_out else None
        got = call_ok(which, fn, x, out=out)
        if use_out:
            assert got is out
        _close(which, got, want, atol=1e-5)
    elif which == "gelu":
        _close(which, call_ok(which, fn, x), ref.gelu(x), atol=1e-6)
    elif which == "gelu_backward":
        with np.errstate(invalid="ignore", over="ignore"):
            want = ref.f64(dout) * ref.gelu_grad(x)
        _close(which, call_ok(which, fn, dout, x), want, atol=1e-6)
    else:
        out = np.asarray(np.maximum(x, 0))
        want = ref.relu_backward(dout, out)
        _close(which, call_ok(which, fn, dout, out), want, atol=0)


@kernel_settings
@given(st.data())
def test_fuzz_embedding(isa, data):
    draw = data.draw
    V, C = draw(st.integers(1, 9)), draw(st.integers(0, 6))
    weight = _array(draw, (V, C))
    ids = _layout(draw, _ids(draw, _dims(draw, draw(st.integers(0, 3)), 0, 4), V))
    scale = draw(st.sampled_from([1.0, 0.5, 8.0]))
    broken = draw(st.integers(0, 2)) == 0
    if broken:
        choice = draw(st.sampled_from(["weight", "ids_dtype", "bad_id"]))
        if choice == "weight":
            bw = _break_array(draw, weight, axes=[])  # a longer V or C is still valid
            expect_raise("embedding", ops.embedding, bw, ids, scale=scale)
            return
        if choice == "ids_dtype":
            bad = ids.astype(draw(st.sampled_from([np.float32, np.float64, np.bool_])))
            expect_raise("embedding", ops.embedding, weight, bad, scale=scale)
            return
        bad = np.array(ids, np.int64).reshape(-1) if ids.size else np.zeros(1, np.int64)
        bad[draw(st.integers(0, bad.size - 1))] = draw(
            st.sampled_from([-1, V, 2**40, -(2**62), 2**31])
        )
        bad = (
            bad.astype(draw(st.sampled_from([np.int64, np.int32])))
            if abs(int(bad.min())) < 2**31 and int(bad.max()) < 2**31
            else bad
        )
        expect_raise("embedding", ops.embedding, weight, bad, scale=scale)
        dw = np.zeros((V, C), np.float32)
        expect_raise(
            "embedding_backward",
            ops.embedding_backward,
            np.zeros(bad.shape + (C,), np.float32),
            bad,
            dw,
        )
        assert not dw.any(), "embedding_backward wrote into dweight before refusing the ids"
        return
    assume(weight.size > 0)  # zero-size dweight: see test_zero_size_out_accepted
    got = call_ok("embedding", ops.embedding, weight, ids, scale=scale)
    _close("embedding", got, ref.embedding(weight, ids, scale), atol=0, rtol=1e-6)
    dout = _array(draw, ids.shape + (C,), nonfinite=False)
    dw0 = _values(draw, (V, C), nonfinite=False)
    dw = dw0.copy()
    call_ok("embedding_backward", ops.embedding_backward, dout, ids, dw, scale=scale)
    _close("embedding_backward", dw, ref.embedding_backward(dout, ids, dw0, scale), atol=1e-5)
    # a read-only or non-contiguous dweight, or a mismatched dout, is refused
    bad_dw = draw(st.sampled_from(["ro", "nc", "shape"]))
    if bad_dw == "ro":
        dwb = dw0.copy()
        dwb.flags.writeable = False
        doutb = dout
    elif bad_dw == "nc":
        dwb = np.zeros((V, 2 * C + 2), np.float32)[:, ::2]
        doutb = dout
    else:
        dwb = dw0.copy()
        doutb = np.zeros(ids.shape + (C + 1,), np.float32)
    expect_raise("embedding_backward", ops.embedding_backward, doutb, ids, dwb, scale=scale)


@kernel_settings
@given(st.data())
def test_fuzz_dropout(isa, data):
    draw = data.draw
    shape = _dims(draw, draw(st.integers(0, 3)), 0, 9)
    x = _array(draw, shape, nonfinite=False)
    p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    seed = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.integers(0, 2**64 - 1))
    broken = draw(st.integers(0, 3)) == 0
    if broken:
        choice = draw(st.sampled_from(["x", "p", "seed", "offset"]))
        kwargs = dict(seed=seed, offset=offset)
        xb, pb = x, p
        if choice == "x":
            xb = _break_array(draw, x, allow_shape=False)
        elif choice == "p":
            pb = draw(st.sampled_from([-0.1, 1.5, float("nan"), "0.5", None]))
        else:
            kwargs[choice] = draw(st.sampled_from([-1, 2**64, 1.5, "1", None]))
        fn = draw(st.sampled_from([ops.dropout, ops.dropout_backward]))
        expect_raise(fn.__name__, fn, xb, pb, **kwargs)
        return
    y = call_ok("dropout", ops.dropout, x, p, seed=seed, offset=offset)
    mask = call_ok(
        "dropout_backward",
        ops.dropout_backward,
        np.ones(shape, np.float32),
        p,
        seed=seed,
        offset=offset,
    )
    keep = 1.0 / (1.0 - p)
    assert np.all((mask == 0) | np.isclose(mask, keep, rtol=1e-6))
    _close("dropout", y, ref.f64(x) * mask, atol=1e-6)
    if p == 0.0:
        np.testing.assert_array_equal(y, x)


@kernel_settings
@given(st.data())
def test_fuzz_adam_step(isa, data):
    draw = data.draw
    shape = _dims(draw, draw(st.integers(0, 3)), 0, 6)
    assume(math.prod(shape) > 0)  # zero-size param/m/v: see test_zero_size_out_accepted
    param, grad = _values(draw, shape), _values(draw, shape)
    m = _values(draw, shape, nonfinite=False)
    v = np.asarray(np.abs(_values(draw, shape, nonfinite=False)))
    hp = dict(
        lr=draw(st.sampled_from([1e-3, 0.1])),
        beta1=0.9,
        beta2=draw(st.sampled_from([0.98, 0.999])),
        eps=1e-8,
        weight_decay=draw(st.sampled_from([0.0, 0.01])),
        step=draw(st.integers(1, 10**6)),
        decoupled=draw(st.booleans()),
    )
    broken = draw(st.integers(0, 3)) == 0
    if broken:
        choice = draw(st.sampled_from(["array", "nc", "ro", "hp"]))
        arrs = {"param": param.copy(), "grad": grad, "m": m.copy(), "v": v.copy()}
        if choice == "array":
            arrs, _ = _break_one(draw, arrs, list(arrs))
        elif choice in ("nc", "ro"):
            name = draw(st.sampled_from(["param", "m", "v"]))
            if choice == "nc":
                arrs[name] = np.zeros(shape + (2,), np.float32)[..., 0]
                if arrs[name].flags.c_contiguous:  # 0-size or 0-d views stay contiguous
                    arrs[name] = np.zeros(shape + (1,), np.float32)
            else:
                arrs[name].flags.writeable = False
        else:
            key = draw(st.sampled_from(["step", "lr", "beta1", "beta2", "eps"]))
            hp[key] = {
                "step": draw(st.sampled_from([0, -1, 1.5, True])),
                "lr": "x",
                "beta1": 1.5,
                "beta2": -0.1,
                "eps": float("nan"),
            }[key]
        expect_raise("adam_step", ops.adam_step, *arrs.values(), **hp)
        return
    p1, m1, v1 = param.copy(), m.copy(), v.copy()
    call_ok("adam_step", ops.adam_step, p1, grad, m1, v1, **hp)
    want, mr, vr = ref.adam_step(param, grad, m, v, **hp)
    _close("adam_step.m", m1, mr, rtol=1e-5, atol=1e-6)
    _close("adam_step.v", v1, vr, rtol=1e-4, atol=1e-6)
    _close("adam_step.param", p1, want, rtol=1e-4, atol=1e-5)


@kernel_settings
@given(st.data())
def test_fuzz_norms(isa, data):
    draw = data.draw
    arrays = [
        _array(draw, _dims(draw, draw(st.integers(0, 3)), 0, 6))
        for _ in range(draw(st.integers(0, 4)))
    ]
    broken = draw(st.integers(0, 3)) == 0
    if broken:
        choice = draw(st.sampled_from(["dtype", "ndarray", "notseq", "max_norm", "dup"]))
        if choice == "dtype":
            bad = arrays + [np.ones(3, draw(st.sampled_from(BAD_DTYPES)))]
            fn = draw(st.sampled_from([ops.global_norm, ops.clip_grad_norm]))
            args = (bad,) if fn is ops.global_norm else (bad, 1.0)
            expect_raise(fn.__name__, fn, *args)
        elif choice == "ndarray":
            expect_raise("global_norm", ops.global_norm, np.ones((2, 2), np.float32))
        elif choice == "notseq":
            expect_raise("global_norm", ops.global_norm, draw(st.sampled_from([3, None, [1.0]])))
        elif choice == "max_norm":
            expect_raise(
                "clip_grad_norm",
                ops.clip_grad_norm,
                [np.ones(3, np.float32)],
                draw(st.sampled_from([-1.0, "x", None])),
            )
        else:
            a = np.ones(4, np.float32)
            expect_raise("clip_grad_norm", ops.clip_grad_norm, [a, a], 0.5)
        return
    want = ref.global_norm(arrays)
    got = call_ok("global_norm", ops.global_norm, arrays)
    if math.isfinite(want):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12)
    else:
        assert not math.isfinite(got)
    writable = [np.array(a, order="C", copy=True) for a in arrays if a.size]
    max_norm = draw(st.sampled_from([0.5, 1.0, 1e6]))
    got = call_ok("clip_grad_norm", ops.clip_grad_norm, writable, max_norm)
    if math.isfinite(want):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12)
        _, clipped = ref.clip_grad_norm([a for a in arrays if a.size], max_norm)
        for c, w in zip(clipped, writable, strict=True):
            _close("clip_grad_norm", w, c, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
V = 13
CFG = dict(
    src_vocab_size=V,
    tgt_vocab_size=V,
    d_model=8,
    num_heads=2,
    d_ff=16,
    num_encoder_layers=1,
    num_decoder_layers=1,
    max_len=12,
    dropout=0.1,
)
_MODELS: dict = {}


def _model(kind="seq2seq"):
    if kind not in _MODELS:
        cls = {"seq2seq": Transformer, "lm": TransformerLM, "enc": TransformerEncoderModel}[kind]
        _MODELS[kind] = cls(TransformerConfig(**CFG), seed=3)
    return _MODELS[kind]


def _bad_ids(draw, shape, vocab):
    """An id array broken one way, or a non-array."""
    how = draw(st.sampled_from(["neg", "huge", "vocab", "float", "rank", "empty", "list", "bool"]))
    ids = _ids(draw, shape, vocab, np.int64)
    if how in ("neg", "huge", "vocab"):
        flat = ids.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = {"neg": -1, "huge": 2**62, "vocab": vocab}[how]
        return ids
    return {
        "float": ids.astype(np.float32),
        "rank": ids[None],
        "empty": ids[:, :0],
        "list": ids.tolist(),
        "bool": ids > 3,
    }[how]


model_settings = settings(
    max_examples=MODEL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@model_settings
@given(st.data())
def test_fuzz_encode(data):
    draw = data.draw
    model = _model()
    B, S = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    src = _ids(draw, (B, S), V)
    lengths = np.array(
        [draw(st.integers(0, S)) for _ in range(B)], draw(st.sampled_from([np.int32, np.int64]))
    )
    broken = draw(st.integers(0, 2)) == 0
    if broken:
        if draw(st.booleans()):
            expect_raise("encode", model.encode, _bad_ids(draw, (B, S), V), lengths)
        else:
            bad = draw(
                st.sampled_from(
                    [
                        lengths[:-1],
                        lengths + S + 1,
                        lengths - 100,
                        lengths.astype(np.float64),
                        list(lengths),
                        None,
                    ]
                )
            )
            if (
                isinstance(bad, np.ndarray)
                and bad.size == lengths.size
                and bad.dtype == lengths.dtype
                and (bad >= 0).all()
                and (bad <= S).all()
            ):
                bad = None
            expect_raise("encode", model.encode, src, bad)
        return
    mem = call_ok("encode", model.encode, src, lengths)
    assert mem.shape == (B, S, CFG["d_model"]) and mem.dtype == np.float32
    # padding positions are zeros, real positions finite; a row does not depend on its batch
    # mates nor on what the padding holds
    for b in range(B):
        assert not mem[b, lengths[b] :].any()
        assert np.isfinite(mem[b, : lengths[b]]).all()
    b = draw(st.integers(0, B - 1))
    alone_src = src[b : b + 1].copy()
    alone_src[0, lengths[b] :] = (alone_src[0, lengths[b] :] + 5) % V
    alone = call_ok("encode", model.encode, alone_src, lengths[b : b + 1])
    np.testing.assert_allclose(alone[0], mem[b], rtol=1e-4, atol=1e-5)


@model_settings
@given(st.data())
def test_fuzz_decode_step(data):
    draw = data.draw
    model = _model()
    B, S = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    src = _ids(draw, (B, S), V)
    lengths = np.full(B, S, np.int64)
    mem = model.encode(src, lengths)
    max_steps = draw(st.integers(1, 4))
    state = call_ok("init_decoder_state", model.init_decoder_state, mem, lengths, max_steps)
    broken_init = draw(st.sampled_from([None, "mem_dtype", "mem_shape", "steps", "lengths"]))
    if broken_init:
        bad = {
            "mem_dtype": (mem.astype(np.float64), lengths, max_steps),
            "mem_shape": (mem[..., :-1], lengths, max_steps),
            "steps": (mem, lengths, draw(st.sampled_from([0, -1, 10**9, 2.5, None]))),
            "lengths": (mem, lengths[:-1] if B > 1 else lengths + S + 1, max_steps),
        }[broken_init]
        expect_raise("init_decoder_state", model.init_decoder_state, *bad)
    for step in range(max_steps + 1):
        tokens = _ids(draw, (B,), V)
        if step == max_steps:
            expect_raise("decode_step", model.decode_step, state, tokens)
            break
        if draw(st.integers(0, 3)) == 0:
            bad = draw(st.sampled_from(["ids", "rows", "state"]))
            if bad == "ids":
                t = tokens.astype(np.int64)
                t[0] = draw(st.sampled_from([-1, V, 2**40]))
                expect_raise("decode_step", model.decode_step, state, t)
            elif bad == "rows":
                expect_raise("decode_step", model.decode_step, state, np.zeros(B + 1, np.int64))
            else:
                expect_raise("decode_step", model.decode_step, object(), tokens)
            assert state.step == step, "a refused decode_step advanced the state"
        logits, attn = call_ok("decode_step", model.decode_step, state, tokens, need_attention=True)
        assert logits.shape == (B, V) and np.isfinite(logits).all()
        assert attn.shape == (B, S)
        np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-4)


@model_settings
@given(st.data())
def test_fuzz_translate_generate(data):
    draw = data.draw
    lm = draw(st.booleans())
    model = _model("lm" if lm else "seq2seq")
    n = draw(st.integers(0, 3))
    seqs = [list(_ids(draw, (draw(st.integers(0 if not lm else 1, 5)),), V)) for _ in range(n)]
    kwargs = {}
    broken = draw(st.integers(0, 2)) == 0
    if lm:
        kwargs = dict(
            max_new_tokens=draw(st.integers(0, 5)),
            beam_size=draw(st.integers(1, 3)),
            seed=draw(st.integers(0, 9)),
        )
        if kwargs["beam_size"] == 1:
            kwargs["temperature"] = draw(st.sampled_from([0.0, 1.0]))
    else:
        kwargs = dict(
            beam_size=draw(st.integers(1, 3)), max_decoding_length=draw(st.integers(1, 6))
        )
    if broken:
        how = draw(st.sampled_from(["id", "type", "kw", "long"]))
        if how == "id":
            seqs = seqs + [[draw(st.sampled_from([-1, V, 2**40]))]]
        elif how == "type":
            seqs = draw(st.sampled_from(["abc", 5, None, [["a"]], [[1.5, 2.0]], [[[1, 2]]]]))
        elif how == "long":
            seqs = seqs + [[1] * (CFG["max_len"] + draw(st.integers(1, 5)))]
        else:
            key = draw(
                st.sampled_from(
                    ["beam_size", "max_batch_size"]
                    + (
                        ["max_new_tokens", "top_p"]
                        if lm
                        else ["max_decoding_length", "num_hypotheses"]
                    )
                )
            )
            kwargs[key] = draw(
                st.sampled_from([-3, "2", 2.5] + ([] if key == "max_new_tokens" else [0]))
            )
            if key == "top_p":
                kwargs["beam_size"] = 1
                kwargs[key] = draw(st.sampled_from([0.0, -0.5, 1.5, "x", float("nan")]))
            if key == "num_hypotheses":
                kwargs[key] = kwargs.get("beam_size", 1) + 1
        fn = model.generate if lm else model.translate
        expect_raise("generate" if lm else "translate", fn, seqs, **kwargs)
        return
    if lm:
        out = call_ok("generate", model.generate, seqs, **kwargs)
        assert len(out) == n
        for prompt, gen in zip(seqs, out, strict=True):
            assert len(gen) <= kwargs["max_new_tokens"]
            assert len(prompt) + len(gen) <= CFG["max_len"]
            assert all(0 <= t < V for t in gen)
    else:
        out = call_ok("translate", model.translate, seqs, **kwargs)
        assert len(out) == n
        for r in out:
            toks = r.tokens if hasattr(r, "tokens") else r.hypotheses[0]
            assert len(toks) <= kwargs["max_decoding_length"]
            assert all(0 <= t < V for t in toks)


def _batch(draw, B, S, T, lm=False):
    src = None if lm else _ids(draw, (B, S), V, np.int64)
    src_len = None if lm else np.array([draw(st.integers(0, S)) for _ in range(B)], np.int64)
    tgt_in = _ids(draw, (B, T), V, np.int64)
    tgt_out = _ids(draw, (B, T), V, np.int64)
    tgt_len = (tgt_out != 0).sum(1)
    return Batch(src, src_len, tgt_in, tgt_out, tgt_len, int(tgt_len.sum()))


@model_settings
@given(st.data())
def test_fuzz_loss_and_grad(data):
    draw = data.draw
    kind = draw(st.sampled_from(["seq2seq", "lm", "enc"]))
    model = _model(kind)
    B, S, T = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    if kind == "enc":
        T = S
    batch = _batch(draw, B, S, T, lm=kind == "lm")
    if kind == "enc":
        batch = types.SimpleNamespace(
            src=batch.src, src_lengths=batch.src_lengths, labels=batch.tgt_out
        )
    broken = draw(st.integers(0, 2)) == 0
    model.zero_grad()
    before = model.param_buffer.copy()
    if broken:
        fields = {
            "lm": ["tgt_in", "tgt_out"],
            "enc": ["labels", "src", "src_lengths"],
            "seq2seq": ["tgt_in", "tgt_out", "src", "src_lengths"],
        }[kind]
        field = draw(st.sampled_from(fields))
        val = getattr(batch, field)
        if field == "src_lengths":
            bad = draw(
                st.sampled_from(
                    [val[:-1] if B > 1 else val + S + 1, val - 100, val.astype(np.float32)]
                )
            )
        elif draw(st.booleans()):
            bad = _bad_ids(draw, val.shape, V)
        else:
            bad = (
                val[:, :-1]
                if val.shape[1] > 1
                else val[:-1]
                if B > 1
                else np.zeros((B, CFG["max_len"] + 1), np.int64)
            )
            if kind == "enc" and field == "src":
                bad = np.zeros((B, CFG["max_len"] + 1), np.int64)
        setattr(batch, field, bad)
        smoothing = draw(st.sampled_from([0.1, -0.5, 1.0, float("nan")]))
        if smoothing == 0.1 and draw(st.booleans()):
            expect_raise("loss_and_grad", model.loss_and_grad, object())
        else:
            expect_raise("loss_and_grad", model.loss_and_grad, batch, label_smoothing=smoothing)
        assert not model.grad_buffer.any(), "a refused call accumulated gradients"
        np.testing.assert_array_equal(model.param_buffer, before)
        return
    loss, n = call_ok(
        "loss_and_grad", model.loss_and_grad, batch, dropout_seed=draw(st.integers(0, 99))
    )
    if kind == "enc":
        want_n = sum(
            int((batch.labels[b, :ln] != 0).sum()) for b, ln in enumerate(batch.src_lengths)
        )
    else:
        want_n = int((batch.tgt_out != model.config.pad_id).sum())
    assert isinstance(n, int) and n == want_n
    assert math.isfinite(loss) and (loss >= 0)
    assert np.isfinite(model.grad_buffer).all()
    if n == 0:
        assert loss == 0.0


@model_settings
@given(st.data())
def test_fuzz_state_dict_and_checkpoints(data):
    draw = data.draw
    model = _model("seq2seq")
    state = model.state_dict()
    name = draw(st.sampled_from(sorted(state)))
    how = draw(
        st.sampled_from(["ok", "f64", "missing", "extra", "shape", "int", "list", "notdict"])
    )
    original = model.param_buffer.copy()
    if how in ("ok", "f64"):
        new = {
            k: _values(
                draw, v.shape, dtype=np.float64 if how == "f64" else np.float32, nonfinite=False
            )
            for k, v in state.items()
        }
        call_ok("load_state_dict", model.load_state_dict, new)
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v, new[k].astype(np.float32))
        with tempfile.TemporaryDirectory() as d:
            call_ok("save", model.save, d)
            loaded = call_ok("load", Transformer.load, d)
            for k, v in loaded.state_dict().items():
                np.testing.assert_array_equal(v, new[k].astype(np.float32))
        model.load_state_dict(state)
        return
    bad = dict(state)
    if how == "missing":
        del bad[name]
    elif how == "extra":
        bad["nonsense.weight"] = np.zeros(2, np.float32)
    elif how == "shape":
        bad[name] = np.zeros(state[name].shape + (1,), np.float32)
    elif how == "int":
        bad[name] = state[name].astype(np.int32)
    elif how == "list":
        bad[name] = state[name].tolist()
    else:
        bad = draw(st.sampled_from([None, [1, 2], "weights"]))
    expect_raise("load_state_dict", model.load_state_dict, bad)
    np.testing.assert_array_equal(model.param_buffer, original)


def test_zero_size_out_accepted():
    """An empty but C-contiguous out= is a valid output buffer."""
    a, b = np.zeros((0, 3), np.float32), np.zeros((3, 4), np.float32)
    out = np.zeros((0, 4), np.float32)
    assert out.flags.c_contiguous
    assert ops.matmul(a, b, out=out) is out
    x = np.zeros((0, 5), np.float32)
    assert ops.log_softmax(x, out=np.zeros((0, 5), np.float32)).shape == (0, 5)
