"""Attention forward/backward against float64 numpy references, finite differences and PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytransformer import _C, ops

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


# ---------------------------------------------------------------------------- helpers


def assert_close(got, want, rtol=2e-5, atol=2e-6, name=""):
    """Error relative to the largest reference value (float32 kernels vs float64 references)."""
    assert got.shape == want.shape, name
    assert np.all(np.isfinite(got)), name
    err = np.abs(got - want).max(initial=0.0)
    bound = atol + rtol * np.abs(want).max(initial=0.0)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def make_qkv(rng, B, Lq, Lk, H, D, layout="contiguous"):
    """q, k, v as plain arrays or as strided views into fused projections."""
    if layout == "fused_qkv":  # self-attention: one (B, L, 3, H, D) buffer
        qkv = randn(rng, B, Lq, 3, H, D)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if layout == "fused_kv":  # cross-attention: k and v from one (B, Lk, 2, H, D) projection
        kv = randn(rng, B, Lk, 2, H, D)
        q = randn(rng, B, Lq, H * D).reshape(B, Lq, H, D)
        return q, kv[:, :, 0], kv[:, :, 1]
    if layout == "transposed":  # (B, H, L, D) storage viewed as (B, L, H, D)
        return (randn(rng, B, H, Lq, D).transpose(0, 2, 1, 3),
                randn(rng, B, H, Lk, D).transpose(0, 2, 1, 3),
                randn(rng, B, H, Lk, D).transpose(0, 2, 1, 3))
    return randn(rng, B, Lq, H, D), randn(rng, B, Lk, H, D), randn(rng, B, Lk, H, D)


def check_case(rng, B, Lq, Lk, H, D, *, key_lengths=None, causal=False, query_offset=0,
               layout="contiguous", scale=None, window=None):
    q, k, v = make_qkv(rng, B, Lq, Lk, H, D, layout)
    if layout == "fused_qkv":
        assert Lq == Lk
    kw = dict(key_lengths=key_lengths, causal=causal, query_offset=query_offset, scale=scale,
              window=window)
    out, lse = ops.attention(q, k, v, return_lse=True, **kw)
    want, want_lse = ref.attention(q, k, v, **kw)
    assert out.flags.c_contiguous and out.shape == (B, Lq, H, D) and out.dtype == np.float32
    assert lse.shape == (B, H, Lq)
    assert_close(out, want, name="out")
    finite = np.isfinite(want_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    assert np.all(lse[~finite] == -np.inf)
    assert_close(lse[finite], want_lse[finite], name="lse")

    dout = randn(rng, B, Lq, H, D)
    grads = ops.attention_backward(dout, q, k, v, out, lse, **kw)
    # dS = P (dP - rowsum(dout * out)) cancels (exactly, when one key is visible), so the
    # absolute error follows the size of the summed terms, not of the result.
    atol = 5e-7 * np.sqrt(D * max(Lq, Lk))
    refs = ref.attention_backward(dout, q, k, v, **kw)
    for name, got, want_d, like in zip("qkv", grads, refs, (q, k, v), strict=True):
        assert got.flags.c_contiguous and got.shape == like.shape
        assert_close(got, want_d, rtol=5e-5, atol=atol, name="d" + name)


# ---------------------------------------------------------------------------- forward/backward


@settings(FIXTURE_OK, max_examples=25)
@given(
    B=st.integers(8, 24),
    H=st.integers(1, 4),
    Lq=st.integers(9, 64),
    Lk=st.integers(1, 64),
    causal=st.booleans(),
    layout=st.sampled_from(["contiguous", "fused_qkv", "fused_kv", "transposed"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_task_a_sentence(isa, threads, B, H, Lq, Lk, causal, layout, seed):
    """Training batches of many short sentences run a whole sentence's heads in one task: the
    float64 reference holds, and every sentence gets the bits it gets alone (a task a head)."""
    threads(2)
    rng = np.random.default_rng(seed)
    if layout == "fused_qkv":
        Lk = Lq
    lengths = rng.integers(1, Lk + 1, size=B)
    check_case(rng, B, Lq, Lk, H, 32, key_lengths=lengths, causal=causal, layout=layout)
    q, k, v = make_qkv(rng, B, Lq, Lk, H, 32, layout)
    kw = dict(causal=causal)
    out, lse = ops.attention(q, k, v, key_lengths=lengths, return_lse=True, **kw)
    dout = randn(rng, *out.shape)
    grads = ops.attention_backward(dout, q, k, v, out, lse, key_lengths=lengths, **kw)
    for b in (0, B - 1):
        one = slice(b, b + 1)
        o1, l1 = ops.attention(q[one], k[one], v[one], key_lengths=lengths[one], return_lse=True,
                               **kw)
        np.testing.assert_array_equal(o1, out[one])
        g1 = ops.attention_backward(dout[one], q[one], k[one], v[one], o1, l1,
                                    key_lengths=lengths[one], **kw)
        for got, alone in zip(grads, g1, strict=True):
            np.testing.assert_array_equal(alone, got[one])


@pytest.mark.parametrize(
    "B,Lq,Lk,H,D,causal,offset",
    [
        (2, 64, 64, 2, 64, False, 0),  # whole tiles
        (2, 100, 130, 3, 32, False, 0),  # cross-attention, partial tiles
        (1, 130, 130, 2, 80, True, 0),  # causal, D = 80 (a 16 + 8 column panel)
        (2, 37, 200, 1, 128, True, 163),  # causal queries placed after a cache
        (3, 7, 5, 2, 16, False, 0),  # fewer keys than queries
        (1, 70, 70, 2, 12, True, 0),  # D not a multiple of 8 (padded path)
    ],
)
def test_matches_reference(isa, rng, B, Lq, Lk, H, D, causal, offset):
    check_case(rng, B, Lq, Lk, H, D, causal=causal, query_offset=offset)


@FIXTURE_OK
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    Lq=st.integers(1, 300),
    Lk=st.integers(1, 300),
    D=st.sampled_from([16, 32, 64, 80, 128]),
    causal=st.booleans(),
    offset=st.sampled_from([0, 0, 1, 17, 300]),
    layout=st.sampled_from(["contiguous", "fused_qkv", "fused_kv", "transposed"]),
    lengths=st.sampled_from(["none", "full", "random", "with_zero"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(isa, B, H, Lq, Lk, D, causal, offset, layout, lengths, seed):
    rng = np.random.default_rng(seed)
    # Keep each example small enough for the float64 reference (B*H*Lq*Lk*D bounded).
    while B * H * Lq * Lk * D > 2_000_000:
        Lq, Lk = max(1, Lq // 2), max(1, Lk // 2)
    if layout == "fused_qkv":
        Lk = Lq
    key_lengths = {
        "none": None,
        "full": np.full(B, Lk, dtype=np.int64),
        "random": rng.integers(1, Lk + 1, size=B),
        "with_zero": np.array([0] + list(rng.integers(0, Lk + 1, size=B - 1)), dtype=np.int32),
    }[lengths]
    check_case(rng, B, Lq, Lk, H, D, key_lengths=key_lengths, causal=causal,
               query_offset=offset, layout=layout)


def test_scale_argument(isa, rng):
    check_case(rng, 1, 20, 33, 2, 32, scale=0.37, causal=True)


def test_odd_strides_and_negative_strides(isa, rng):
    """Views with a non-unit or negative stride along D take the copying path and still agree."""
    base = randn(rng, 2, 40, 3, 2 * 32)
    q = base[:, :, 0, ::2].reshape(2, 40, 1, 32)[:, ::-1]
    k = base[:, :, 1, 1::2].reshape(2, 40, 1, 32)
    v = base[:, :, 2, ::-2].reshape(2, 40, 1, 32)
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
    assert_close(out, ref.attention(q, k, v, causal=True)[0])
    dout = randn(rng, *out.shape)
    dout_reversed = dout[..., ::-1].copy()[..., ::-1]  # same values, negative stride along D
    grads = ops.attention_backward(dout_reversed, q, k, v, out, lse, causal=True)
    for got, want in zip(grads, ref.attention_backward(dout, q, k, v, causal=True), strict=True):
        assert_close(got, want, rtol=5e-5, atol=5e-6)


def test_fully_masked_rows_are_zero(isa, rng):
    """key_lengths 0 masks every key: zero output, -inf lse, zero gradients, never NaN."""
    q, k, v = make_qkv(rng, 2, 9, 12, 2, 16)
    lengths = np.array([0, 12])
    out, lse = ops.attention(q, k, v, key_lengths=lengths, return_lse=True)
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)
    assert_close(out[1], ref.attention(q, k, v)[0][1])
    grads = ops.attention_backward(randn(rng, *out.shape), q, k, v, out, lse, key_lengths=lengths)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.all(g[0] == 0)
    # Decode path too.
    out1 = ops.attention(q[:, :1], k, v, key_lengths=lengths)
    assert np.all(out1[0] == 0) and np.all(np.isfinite(out1))


def test_nan_inputs_propagate(isa, rng):
    """A NaN in q poisons its own output row only; a NaN in a visible key poisons every row."""
    q, k, v = make_qkv(rng, 1, 70, 70, 2, 32)
    q = q.copy()
    q[0, 5, 1, 3] = np.nan
    out = ops.attention(q, k, v)
    assert np.all(np.isnan(out[0, 5, 1]))
    mask = np.ones(out.shape, bool)
    mask[0, 5, 1] = False
    assert np.all(np.isfinite(out[mask]))
    k = k.copy()
    k[0, 0, 0, 0] = np.nan
    assert np.all(np.isnan(ops.attention(q, k, v)[:, :, 0]))
    assert np.all(np.isnan(ops.attention(q[:, :1], k, v)[:, :, 0]))  # decode path


def test_masked_keys_get_no_gradient(isa, rng):
    q, k, v = make_qkv(rng, 1, 30, 40, 1, 32)
    out, lse = ops.attention(q, k, v, key_lengths=np.array([25]), return_lse=True)
    _, dk, dv = ops.attention_backward(randn(rng, *out.shape), q, k, v, out, lse,
                                       key_lengths=np.array([25]))
    assert np.all(dk[:, 25:] == 0) and np.all(dv[:, 25:] == 0)
    assert np.abs(dv[:, :25]).max() > 0


@pytest.mark.parametrize(
    "Lk,masks",
    [(13, dict(key_lengths=[13, 6], causal=True, query_offset=2))]
    + [(70, dict(key_lengths=[70, 40], causal=True, query_offset=30, window=w))
       for w in (0, 3, 60)],
    ids=["causal", "window0", "window3", "window60"],
)
def test_backward_finite_differences(isa, rng, Lk, masks):
    """Directional derivative of sum(dout * out), central differences of the float64 reference,
    with every mask at once."""
    B, Lq, H, D = 2, 11, 2, 16
    q, k, v = make_qkv(rng, B, Lq, Lk, H, D)
    kw = dict(masks, key_lengths=np.array(masks["key_lengths"]))
    out, lse = ops.attention(q, k, v, return_lse=True, **kw)
    dout = randn(rng, B, Lq, H, D)
    grads = ops.attention_backward(dout, q, k, v, out, lse, **kw)
    x = [a.astype(np.float64) for a in (q, k, v)]
    eps = 1e-5
    for which in range(3):
        u = rng.standard_normal(x[which].shape)
        plus, minus = list(x), list(x)
        plus[which] = x[which] + eps * u
        minus[which] = x[which] - eps * u
        f_plus = np.sum(dout * ref.attention(*plus, **kw)[0])
        f_minus = np.sum(dout * ref.attention(*minus, **kw)[0])
        numeric = (f_plus - f_minus) / (2 * eps)
        analytic = np.sum(grads[which].astype(np.float64) * u)
        assert abs(numeric - analytic) <= 1e-4 * (1 + abs(numeric)), (which, numeric, analytic)


def test_naive_sibling_matches_reference(rng):
    q, k, v = make_qkv(rng, 2, 21, 30, 2, 24)
    lengths = np.array([30, 0])
    out, lse = _C.attention(q, k, v, lengths, True, 5, None, True, naive=True)
    want, want_lse = ref.attention(q, k, v, key_lengths=lengths, causal=True, query_offset=5)
    assert_close(out, want)
    assert np.array_equal(np.isfinite(lse), np.isfinite(want_lse))
    dout = randn(rng, *out.shape)
    grads = _C.attention_backward(dout, q, k, v, out, lse, lengths, True, 5, None, naive=True)
    refs = ref.attention_backward(dout, q, k, v, key_lengths=lengths, causal=True, query_offset=5)
    for got, want_d in zip(grads, refs, strict=True):
        assert_close(got, want_d, rtol=5e-5, atol=5e-6)


# ---------------------------------------------------------------------------- decode path


@pytest.mark.parametrize("L,D", [(1, 64), (7, 16), (77, 64), (300, 80), (129, 128)])
def test_decode_equals_last_row(isa, rng, L, D):
    """One query with query_offset = L - 1 against the cache equals the last row of full causal."""
    B, H = 3, 2
    q, k, v = make_qkv(rng, B, L, L, H, D, "fused_qkv")
    lengths = np.array([L, max(1, L // 2), 0])
    full, full_lse = ops.attention(q, k, v, key_lengths=lengths, causal=True, return_lse=True)
    step, step_lse = ops.attention(q[:, -1:], k, v, key_lengths=lengths, causal=True,
                                   query_offset=L - 1, return_lse=True)
    np.testing.assert_allclose(step, full[:, -1:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step_lse, full_lse[:, :, -1:], rtol=1e-5, atol=1e-6)
    assert_close(step, ref.attention(q[:, -1:], k, v, key_lengths=lengths, causal=True,
                                     query_offset=L - 1)[0])
    dec = ops.attention_decode(q[:, -1], k, v, key_lengths=lengths)
    np.testing.assert_array_equal(dec, step[:, 0])


def test_decode_from_preallocated_cache(isa, rng):
    """The cache is a prefix slice of a larger (N, Lmax, 2, H, D) buffer: strided, no copy."""
    N, Lmax, H, D, filled = 4, 50, 2, 32, 23
    cache = randn(rng, N, Lmax, 2, H, D)
    k, v = cache[:, :filled, 0], cache[:, :filled, 1]
    q = randn(rng, N, H, D)
    got = ops.attention_decode(q, k, v)
    assert_close(got, ref.attention(q[:, None], k, v)[0][:, 0])


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(4, 9), Lq=st.integers(1, 8), H=st.integers(1, 6),
    D=st.sampled_from([8, 24, 64, 12]), L=st.integers(1, 70),
    window=st.sampled_from([None, 0, 3]), causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_decode_rows_match_single_queries(isa, threads, B, Lq, H, D, L, window, causal, seed):
    """Up to 8 queries a row (decoding: one, or a source's beams in cross-attention) take the
    row-at-a-time decode kernel once there are two (row, query) pairs per thread, one query
    alone the head-at-a-time one: each query must get the bits it gets alone (at its own
    position), with key lengths, causal masks, windows, head counts that are not multiples of
    four and head dims that need padding, on a strided head-major cache."""
    rng = np.random.default_rng(seed)
    cache = randn(rng, B, 2, H, L + 3, D).transpose(0, 3, 1, 2, 4)[:, :L]
    q = randn(rng, B, Lq, H, D)
    lengths = rng.integers(0, L + 1, size=B)
    off = max(0, L - Lq)
    masks = dict(key_lengths=lengths, causal=causal, window=window, return_lse=True)
    for n in (1, 2):
        threads(n)
        out, lse = ops.attention(q, cache[:, :, 0], cache[:, :, 1], query_offset=off, **masks)
        for b in range(B):
            for i in range(Lq):
                one, one_lse = ops.attention(
                    q[b : b + 1, i : i + 1], cache[b : b + 1, :, 0], cache[b : b + 1, :, 1],
                    query_offset=off + i, **(masks | dict(key_lengths=lengths[b : b + 1])),
                )
                np.testing.assert_array_equal(out[b : b + 1, i : i + 1], one)
                np.testing.assert_array_equal(lse[b : b + 1, :, i : i + 1], one_lse)
        assert_close(out, ref.attention(q, cache[:, :, 0], cache[:, :, 1], key_lengths=lengths,
                                        causal=causal, query_offset=off, window=window)[0])


# ---------------------------------------------------------------------------- windowed attention

# r = 0 (each query sees itself only), 1, small, about a tile, wider than the sequence.
WINDOWS = [0, 1, 5, 70, 1000]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", ["none", "with_zero"])
@pytest.mark.parametrize("offset", [0, 37])
def test_window_matches_reference(isa, rng, window, causal, lengths, offset):
    """Every mask combination against the float64 reference with an explicit band mask; 150
    queries and 170 keys are whole tiles of neither size."""
    B, Lq, Lk = 3, 150, 170
    key_lengths = None if lengths == "none" else np.array([Lk, 0, 101])
    check_case(rng, B, Lq, Lk, 2, 32, key_lengths=key_lengths, causal=causal,
               query_offset=offset, window=window)


@FIXTURE_OK
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    Lq=st.integers(1, 260),
    Lk=st.integers(1, 260),
    D=st.sampled_from([8, 16, 24, 80]),
    causal=st.booleans(),
    offset=st.sampled_from([0, 0, 3, 64, 200]),
    window=st.one_of(st.integers(0, 8), st.integers(0, 300)),
    layout=st.sampled_from(["contiguous", "fused_qkv", "transposed"]),
    lengths=st.sampled_from(["none", "random", "with_zero"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_window_property_matches_reference(isa, B, H, Lq, Lk, D, causal, offset, window, layout,
                                           lengths, seed):
    rng = np.random.default_rng(seed)
    while B * H * Lq * Lk * D > 1_500_000:
        Lq, Lk = max(1, Lq // 2), max(1, Lk // 2)
    if layout == "fused_qkv":
        Lk = Lq
    key_lengths = {
        "none": None,
        "random": rng.integers(1, Lk + 1, size=B),
        "with_zero": np.array([0] + list(rng.integers(0, Lk + 1, size=B - 1))),
    }[lengths]
    check_case(rng, B, Lq, Lk, H, D, key_lengths=key_lengths, causal=causal,
               query_offset=offset, layout=layout, window=window)


@pytest.mark.parametrize(
    "offset,window",
    [(2**62, 2**62 - 5), (2**62, 2**62 + 10**6), (2**40, 3), (0, 2**62), (500, 100)],
)
def test_window_with_extreme_positions(isa, rng, offset, window):
    """Offsets and windows far past the sequence keep their meaning (only the keys a query sees
    depend on them): queries 2^62 past the start with a window 5 short of reaching back, and so
    on, against the reference on the same int64 positions."""
    check_case(rng, 2, 20, 30, 1, 16, key_lengths=np.array([30, 17]), query_offset=offset,
               window=window)
    check_case(rng, 1, 20, 30, 1, 16, causal=True, query_offset=offset, window=window)


def test_window_rows_that_see_no_key(isa, rng):
    """Queries whose band lies past every key get zeros, lse -inf and zero, finite gradients;
    keys outside every band get zero dk and dv."""
    q, k, v = make_qkv(rng, 1, 30, 40, 2, 16)
    kw = dict(query_offset=45, window=10)  # query i sees keys [35 + i, 55 + i] ∩ [0, 40)
    out, lse = ops.attention(q, k, v, return_lse=True, **kw)
    assert np.all(out[:, 5:] == 0) and np.all(lse[:, :, 5:] == -np.inf)
    assert np.all(np.isfinite(lse[:, :, :5]))
    dq, dk, dv = ops.attention_backward(randn(rng, *out.shape), q, k, v, out, lse, **kw)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(g))
    # (Row 4 sees key 39 alone, whose softmax has no gradient: only rounding is left there.)
    assert np.all(dq[:, 5:] == 0) and np.all(np.abs(dq[0, :4]).max(axis=-1) > 1e-3)
    assert np.all(dk[:, :35] == 0) and np.all(dv[:, :35] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_window_skips_distant_keys(isa, rng, causal):
    """A NaN in the key and value of position 300 reaches every row under full attention, but a
    window of 20 keeps it out of the rows more than r + 2 tiles away, in the output and in dq:
    the tiles there never touch it (a masked score would still let 0 * NaN through P V)."""
    n, j, r = 600, 300, 20
    q, k, v = make_qkv(rng, 1, n, n, 2, 32)
    k, v = k.copy(), v.copy()
    k[0, j], v[0, j] = np.nan, np.nan
    far = np.abs(np.arange(n) - j) >= r + 128
    assert np.all(np.isnan(ops.attention(q, k, v, causal=causal)[0, j + 1 :]))
    out, lse = ops.attention(q, k, v, causal=causal, window=r, return_lse=True)
    dq, _, _ = ops.attention_backward(randn(rng, *out.shape), q, k, v, out, lse, causal=causal,
                                      window=r)
    assert np.all(np.isfinite(out[0, far])) and np.all(np.isfinite(dq[0, far]))
    assert np.all(np.isnan(out[0, j : j + r + 1]))  # rows that do see it


def test_window_naive_sibling_matches_reference(rng):
    q, k, v = make_qkv(rng, 2, 21, 30, 2, 24)
    lengths = np.array([30, 12])
    args = (lengths, True, 5, None)
    out, lse = _C.attention(q, k, v, *args, True, window=4, naive=True)
    want, _ = ref.attention(q, k, v, key_lengths=lengths, causal=True, query_offset=5, window=4)
    assert_close(out, want)
    dout = randn(rng, *out.shape)
    grads = _C.attention_backward(dout, q, k, v, out, lse, *args, window=4, naive=True)
    refs = ref.attention_backward(dout, q, k, v, key_lengths=lengths, causal=True,
                                  query_offset=5, window=4)
    for got, want_d in zip(grads, refs, strict=True):
        assert_close(got, want_d, rtol=5e-5, atol=5e-6)


@pytest.mark.parametrize("window", [0, 1, 7, 200, 500])
@pytest.mark.parametrize("L,D", [(9, 16), (300, 64)])
def test_window_decode_equals_full_kernel(isa, rng, window, L, D):
    """The decode step of a row whose cache holds n entries equals row n - 1 of the causal
    windowed kernel over the whole sequence, and reads only the last window + 1 entries (NaN
    written before them changes nothing)."""
    B, H = 4, 2
    q, k, v = make_qkv(rng, B, L, L, H, D, "fused_qkv")
    lengths = np.array([L, max(1, L // 2), 0, 1])
    full = ops.attention(q, k, v, causal=True, window=window)
    last = np.maximum(lengths - 1, 0)
    k, v = k.copy(), v.copy()
    for n, m in enumerate(lengths):
        k[n, : max(0, m - 1 - window)] = np.nan
        v[n, : max(0, m - 1 - window)] = np.nan
    dec = ops.attention_decode(q[np.arange(B), last], k, v, key_lengths=lengths, window=window)
    want = full[np.arange(B), last]
    want[lengths == 0] = 0.0
    np.testing.assert_allclose(dec, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dec[lengths == 0], 0.0)
    # Without key_lengths the query sits at the last cache entry.
    dec_all = ops.attention_decode(q[:1, -1], k[:1], v[:1], window=window)
    np.testing.assert_allclose(dec_all, full[:1, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("Lq", [1, 150])
@pytest.mark.parametrize("window", [0, 9, 100])
def test_window_thread_count_invariance(isa, threads, rng, Lq, window):
    q, k, v = make_qkv(rng, 2, Lq, 150, 3, 64)
    kw = dict(key_lengths=np.array([150, 77]), causal=True, query_offset=150 - Lq,
              window=window)
    dout = randn(rng, *q.shape)
    results = []
    for n in (1, 2):
        threads(n)
        out, lse = ops.attention(q, k, v, return_lse=True, **kw)
        results.append((out, lse, *ops.attention_backward(dout, q, k, v, out, lse, **kw)))
        results[-1] += (ops.attention_decode(q[:, -1], k, v, key_lengths=kw["key_lengths"],
                                             window=window),)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (True, TypeError), (2.0, TypeError),
                                     ("3", TypeError), (np.int64(-2), ValueError)])
def test_window_rejects_bad_values(rng, bad, exc):
    q, k, v = make_qkv(rng, 1, 5, 5, 1, 8)
    out, lse = ops.attention(q, k, v, return_lse=True)
    with pytest.raises(exc, match="window"):
        ops.attention(q, k, v, window=bad)
    with pytest.raises(exc, match="window"):
        ops.attention_backward(out, q, k, v, out, lse, window=bad)
    with pytest.raises(exc, match="window"):
        ops.attention_decode(q[:, 0], k, v, window=bad)
    with pytest.raises(ValueError, match="window"):
        _C.attention(q, k, v, None, False, 0, None, False, window=-1)  # the binding checks too


# ---------------------------------------------------------------------------- threads, concurrency


@pytest.mark.parametrize("Lq", [1, 150])
def test_thread_count_invariance(isa, threads, rng, Lq):
    q, k, v = make_qkv(rng, 2, Lq, 150, 3, 64)
    kw = dict(key_lengths=np.array([150, 77]), causal=True, query_offset=150 - Lq)
    dout = randn(rng, *q.shape)
    results = []
    for n in (1, 2, 3):
        threads(n)
        out, lse = ops.attention(q, k, v, return_lse=True, **kw)
        results.append((out, lse, *ops.attention_backward(dout, q, k, v, out, lse, **kw)))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_concurrent_python_threads(rng):
    """Several Python threads at once (GIL released) get the same bits as one at a time."""
    cases = [make_qkv(rng, 2, 90, 90, 2, 32) for _ in range(4)]
    expected = [ops.attention(*c, causal=True) for c in cases]
    got = [None] * len(cases)

    def work(i):
        for _ in range(3):
            got[i] = ops.attention(*cases[i], causal=True)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- PyTorch oracle


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_sdpa(rng, causal):
    B, L, H, D = 2, 75, 3, 64
    q, k, v = make_qkv(rng, B, L, L, H, D, "fused_qkv")
    lengths = np.array([75, 40])
    out, lse = ops.attention(q, k, v, key_lengths=lengths, causal=causal, return_lse=True)
    tq, tk, tv = (torch.tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3)), dtype=torch.float64,
                               requires_grad=True) for x in (q, k, v))
    mask = torch.from_numpy(ref.attention_mask(B, L, L, lengths, causal))[:, None]  # may attend
    tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    np.testing.assert_allclose(out, tout.detach().numpy().transpose(0, 2, 1, 3), rtol=1e-4,
                               atol=1e-5)
    dout = randn(rng, *out.shape)
    tout.backward(torch.from_numpy(dout.transpose(0, 2, 1, 3).astype(np.float64)))
    grads = ops.attention_backward(dout, q, k, v, out, lse, key_lengths=lengths, causal=causal)
    for got, t in zip(grads, (tq, tk, tv), strict=True):
        np.testing.assert_allclose(got, t.grad.numpy().transpose(0, 2, 1, 3), rtol=1e-4,
                                   atol=2e-5)


# ---------------------------------------------------------------------------- validation


def test_rejects_bad_arguments(rng):
    q, k, v = make_qkv(rng, 2, 5, 6, 2, 8)
    with pytest.raises(TypeError, match="q:"):
        ops.attention(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="k:"):
        ops.attention(q, k.tolist(), v)
    with pytest.raises(ValueError, match="q:"):
        ops.attention(q[0], k, v)
    with pytest.raises(ValueError, match="k:"):
        ops.attention(q, k[:1], v[:1])  # batch mismatch
    with pytest.raises(ValueError, match="k:"):
        ops.attention(q, k[:, :, :1], v[:, :, :1])  # heads mismatch
    with pytest.raises(ValueError, match="k:"):
        ops.attention(q, k[..., :4], v[..., :4])  # head dim mismatch
    with pytest.raises(ValueError, match="v:"):
        ops.attention(q, k, v[:, :5])  # Lk of k and v differ
    with pytest.raises(ValueError, match="q:"):
        ops.attention(q[:, :0], k, v)  # empty
    with pytest.raises(ValueError, match="k:"):
        ops.attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="key_lengths"):
        ops.attention(q, k, v, key_lengths=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="key_lengths"):
        ops.attention(q, k, v, key_lengths=np.array([7, 1]))
    with pytest.raises(ValueError, match="key_lengths"):
        ops.attention(q, k, v, key_lengths=np.array([-1, 1]))
    with pytest.raises(TypeError, match="key_lengths"):
        ops.attention(q, k, v, key_lengths=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="query_offset"):
        ops.attention(q, k, v, causal=True, query_offset=-1)
    with pytest.raises(TypeError, match="query_offset"):
        ops.attention(q, k, v, query_offset=1.5)
    with pytest.raises(TypeError, match="causal"):
        ops.attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match="scale"):
        ops.attention(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="scale"):
        ops.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="q:"):
        ops.attention_decode(q, k, v)


def test_backward_rejects_bad_arguments(rng):
    q, k, v = make_qkv(rng, 2, 5, 6, 2, 8)
    out, lse = ops.attention(q, k, v, return_lse=True)
    dout = randn(rng, *out.shape)
    with pytest.raises(ValueError, match="dout:"):
        ops.attention_backward(dout[:, :4], q, k, v, out, lse)
    with pytest.raises(ValueError, match="out:"):
        ops.attention_backward(dout, q, k, v, out[:, :, :1], lse)
    with pytest.raises(ValueError, match="lse:"):
        ops.attention_backward(dout, q, k, v, out, lse[:, :1])
    with pytest.raises(ValueError, match="lse:"):
        ops.attention_backward(dout, q, k, v, out, lse[0])
    with pytest.raises(TypeError, match="lse:"):
        ops.attention_backward(dout, q, k, v, out, lse.astype(np.float64))
    with pytest.raises(TypeError, match="dout:"):
        ops.attention_backward(dout.astype(np.float16), q, k, v, out, lse)
    with pytest.raises(ValueError, match="key_lengths"):
        ops.attention_backward(dout, q, k, v, out, lse, key_lengths=np.array([9, 9]))
    # A strided lse is accepted (copied to C order internally).
    lse_t = np.ascontiguousarray(lse.transpose(2, 0, 1)).transpose(1, 2, 0)
    a = ops.attention_backward(dout, q, k, v, out, lse)
    b = ops.attention_backward(dout, q, k, v, out, lse_t)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------- memory


def test_memory_stays_linear_in_length(tmp_path):
    """B=1, H=8, L=8192, D=64: an L x L float32 matrix per head would be 2 GiB; the kernel's peak
    extra resident memory (VmHWM after minus before) must stay far below that."""
    code = textwrap.dedent(
        """
        import json, numpy as np
        from pytransformer import ops

        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

        B, L, H, D = 1, 8192, 8, 64
        rng = np.random.default_rng(0)
        qkv = rng.standard_normal((B, L, 3, H, D), dtype=np.float32)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # Touch and free buffers the size of the outputs first, so the high-water mark already
        # covers them and the difference below is the kernel's own scratch.
        out = np.ones((B, L, H, D), np.float32)
        lse = np.ones((B, H, L), np.float32)
        del out, lse
        before = hwm()
        out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
        after = hwm()
        print(json.dumps({"extra": after - before, "finite": bool(np.isfinite(out).all())}))
        """
    )
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["finite"]
    lxl_per_head = 8 * 8192 * 8192 * 4
    assert info["extra"] < 64 * 2**20, info
    assert info["extra"] < lxl_per_head / 32


@pytest.mark.parametrize("Lq,Lk,D,length", [(163, 18, 16, 4), (95, 103, 64, 98), (7, 40, 8, 0)])
def test_backward_ignores_garbage_past_key_lengths(isa, rng, Lq, Lk, D, length):
    """Keys and values past the key lengths are padding: inf and NaN there must not reach dq,
    dk or dv (a masked probability of 0 times an inf value row once made NaN in dS)."""
    q = randn(rng, 1, Lq, 1, D)
    kv = randn(rng, 1, Lk, 2, 1, D)
    kv[:, length:, 0] = np.nan
    kv[:, length:, 1] = np.inf
    lengths = np.array([length])
    k, v = kv[:, :, 0], kv[:, :, 1]
    out, lse = ops.attention(q, k, v, key_lengths=lengths, return_lse=True)
    dout = randn(rng, *out.shape)
    grads = ops.attention_backward(dout, q, k, v, out, lse, key_lengths=lengths)
    clean = kv.copy()
    clean[:, length:] = 0.0
    refs = ref.attention_backward(dout, q, clean[:, :, 0], clean[:, :, 1], key_lengths=lengths)
    for got, want in zip(grads, refs, strict=True):
        assert np.isfinite(got).all()
        assert_close(got, want, rtol=5e-5, atol=5e-6)
    assert not grads[1][:, length:].any() and not grads[2][:, length:].any()
