"""The self-attention caches of a DecoderState grow with the steps: decoding with them gives the
bits a state preallocated for max_steps gives, through reorders and beam fan-out, while their
memory follows the positions used."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import BOS, random_batch, tiny_config

import pytransformer as pt
from pytransformer.models import state as state_mod

MAX_STEPS = 70  # three doublings from 16 (16, 32, 64) and a last, partial one (70)


def _model(**overrides) -> pt.Transformer:
    return pt.Transformer(tiny_config(max_len=80, **overrides), seed=3).eval()


def _states(m, batch, max_steps, **kwargs):
    """(growing, preallocated) states of the same batch; the second never needs to grow."""
    memory = m.encode(batch.src, batch.src_lengths)
    grow = m.init_decoder_state(memory, batch.src_lengths, max_steps, **kwargs)
    full = m.init_decoder_state(memory, batch.src_lengths, max_steps, **kwargs)
    full.kv_caches = [np.empty((c.shape[0], max_steps) + c.shape[2:], np.float32)
                      for c in full.kv_caches]
    return grow, full


def _expected_capacity(t: int, max_steps: int) -> int:
    cap = min(state_mod.INITIAL_CAPACITY, max_steps)
    while cap < t:
        cap *= 2
    return min(cap, max_steps)


@pytest.mark.parametrize("pack", [False, True])
def test_growth_at_capacity_boundaries_keeps_the_bits(pack):
    m = _model()
    rng = np.random.default_rng(0)
    batch = random_batch(m.config, rng, B=4, S=6, T=1)
    grow, full = _states(m, batch, MAX_STEPS, pack_weights=pack)
    assert grow.capacity == state_mod.INITIAL_CAPACITY
    tokens = np.full(4, BOS)
    for t in range(MAX_STEPS):
        a, _ = m.decode_step(grow, tokens)
        b, _ = m.decode_step(full, tokens)
        np.testing.assert_array_equal(a, b)
        # after step t+1 positions are filled; the buffers hold exactly the next power of two
        assert grow.capacity == _expected_capacity(t + 1, MAX_STEPS), t
        for cg, cf in zip(grow.kv_caches, full.kv_caches, strict=True):
            np.testing.assert_array_equal(cg[:, : t + 1], cf[:, : t + 1])
        tokens = rng.integers(3, m.config.tgt_vocab_size, size=4)
    assert grow.capacity == MAX_STEPS
    with pytest.raises(ValueError, match="max_steps"):
        m.decode_step(grow, tokens)


@pytest.mark.parametrize("t", [15, 16, 17, 31, 32, 33, 64, 65])
def test_capacity_after_t_steps(t):
    m = _model()
    batch = random_batch(m.config, np.random.default_rng(1), B=2, S=4, T=1)
    grow, _ = _states(m, batch, MAX_STEPS)
    for _ in range(t):
        m.decode_step(grow, np.full(2, BOS))
    assert grow.step == t
    assert grow.capacity == _expected_capacity(t, MAX_STEPS)
    assert t <= grow.capacity <= max(2 * (t - 1), state_mod.INITIAL_CAPACITY)


def test_short_max_steps_allocates_only_those():
    m = _model()
    batch = random_batch(m.config, np.random.default_rng(2), B=2, S=4, T=1)
    grow, _ = _states(m, batch, 5)
    assert grow.capacity == 5
    for _ in range(5):
        m.decode_step(grow, np.full(2, BOS))
    with pytest.raises(ValueError, match="max_steps"):
        m.decode_step(grow, np.full(2, BOS))


def test_cache_memory_follows_the_steps_not_max_steps():
    """nbytes after t steps is at most 2t (or the initial capacity) positions per row."""
    m = _model()
    cfg = m.config
    B = 3
    batch = random_batch(cfg, np.random.default_rng(3), B=B, S=4, T=1)
    grow, full = _states(m, batch, MAX_STEPS)
    per_position = B * 2 * cfg.d_model * 4 * cfg.num_decoder_layers
    for t in range(1, 41):
        m.decode_step(grow, np.full(B, BOS))
        used = sum(c.nbytes for c in grow.kv_caches)
        assert used <= per_position * max(2 * t, state_mod.INITIAL_CAPACITY)
    assert sum(c.nbytes for c in full.kv_caches) == per_position * MAX_STEPS
    assert sum(c.nbytes for c in grow.kv_caches) == per_position * 64


def test_lm_state_grows_and_matches_preallocation():
    cfg = tiny_config(max_len=80, norm_first=True, tie_embeddings="none")
    lm = pt.TransformerLM(cfg, seed=1).eval()
    grow = lm.init_state(2, 40)
    full = lm.init_state(2, 40)
    full.kv_caches = [np.empty((2, 40) + c.shape[2:], np.float32) for c in full.kv_caches]
    rng = np.random.default_rng(4)
    tokens = np.full(2, BOS)
    for _ in range(40):
        a, _ = lm.decode_step(grow, tokens)
        b, _ = lm.decode_step(full, tokens)
        np.testing.assert_array_equal(a, b)
        tokens = rng.integers(3, cfg.tgt_vocab_size, size=2)
    assert grow.capacity == 40


# Reorders of a beam search: rows kept, duplicated (fan-out beyond B), dropped, swapped.
_reorders = st.lists(st.integers(0, 5), min_size=1, max_size=7)


@settings(max_examples=15, deadline=None)
@given(plan=st.lists(st.tuples(st.integers(1, 12), _reorders), min_size=1, max_size=5),
       pack=st.booleans())
def test_reorders_and_fan_out_across_growth_are_bit_equal(plan, pack):
    """Any interleaving of steps and reorders, crossing capacity boundaries, gives the logits of
    the preallocated state, bit for bit."""
    m = _model()
    rng = np.random.default_rng(5)
    batch = random_batch(m.config, rng, B=2, S=5, T=1)
    grow, full = _states(m, batch, MAX_STEPS, pack_weights=pack)
    tokens = np.full(2, BOS)
    for steps, rows in plan:
        for _ in range(steps):
            a, _ = m.decode_step(grow, tokens)
            b, _ = m.decode_step(full, tokens)
            np.testing.assert_array_equal(a, b)
            tokens = a.argmax(-1)
        idx = np.array(rows) % grow.batch_size
        grow.reorder(idx)
        full.reorder(idx)
        tokens = tokens[idx]
        assert grow.capacity == _expected_capacity(grow.step, MAX_STEPS)
    a, _ = m.decode_step(grow, tokens)
    b, _ = m.decode_step(full, tokens)
    np.testing.assert_array_equal(a, b)
