"""Model tests that need no PyTorch: configuration, finite-difference gradients, checkpoints,
incremental decoding, argument checking."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import (
    BOS,
    PAD,
    check_gradients,
    mean_loss,
    padded,
    random_batch,
    rel_err,
    tiny_config,
)

import pytransformer as pt
from pytransformer.io import CheckpointError
from pytransformer.models import DecoderState
from pytransformer.nn.layers import sinusoidal_positions
from pytransformer.nn.layout import Layout


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def test_config_json_round_trip():
    cfg = tiny_config(
        norm_first=True, activation="gelu", tie_embeddings="none", layer_norm_eps=1e-6
    )
    back = pt.TransformerConfig.from_json(cfg.to_json())
    assert back == cfg
    assert pt.TransformerConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(
    "field, value, exc",
    [
        ("d_model", 15, ValueError),  # not divisible by 2 heads
        ("d_model", 0, ValueError),
        ("num_heads", -1, ValueError),
        ("d_ff", 0, ValueError),
        ("src_vocab_size", 0, ValueError),
        ("max_len", 0, ValueError),
        ("dropout", 1.0, ValueError),
        ("dropout", "0.1", TypeError),
        ("activation", "tanh", ValueError),
        ("tie_embeddings", "encoder", ValueError),
        ("layer_norm_eps", 0.0, ValueError),
        ("d_model", 16.0, TypeError),
        ("norm_first", 1, TypeError),
        ("encoder_attention_window", -1, ValueError),
        ("decoder_attention_window", True, TypeError),
        ("decoder_attention_window", 2.0, TypeError),
    ],
)
def test_config_rejects_invalid(field, value, exc):
    with pytest.raises(exc, match=field if field != "d_model" or value != 15 else "divisible"):
        tiny_config(**{field: value})


def test_config_from_json_rejects_unknown_and_garbage():
    with pytest.raises(ValueError, match="unknown"):
        pt.TransformerConfig.from_dict({**tiny_config().to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="JSON"):
        pt.TransformerConfig.from_json("{not json")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(pad_id=23), "pad_id: 23 is outside the target vocabulary of 23"),
        (dict(bos_id=23), "bos_id: 23 is outside the target vocabulary"),
        (dict(eos_id=99), "eos_id: 99 is outside the target vocabulary"),
        (dict(eos_id=0), "pad_id and eos_id: must differ"),
        (dict(pad_id=5, eos_id=5), "pad_id and eos_id: must differ"),
    ],
)
def test_config_rejects_special_ids_it_cannot_use(overrides, match):
    """tiny_config's target vocabulary has 23 tokens (ids 0..22)."""
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_takes_special_ids_up_to_the_last_target_token():
    cfg = tiny_config(pad_id=22, bos_id=20, eos_id=21)
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (22, 20, 21)


def test_models_embedding_a_source_need_pad_inside_it():
    cfg = tiny_config(pad_id=20)  # inside the target vocabulary (23), outside the source's (19)
    for cls in (pt.Transformer, pt.TransformerEncoderModel):
        with pytest.raises(ValueError, match="pad_id: 20 is outside the source vocabulary of 19"):
            cls(cfg)
    pt.TransformerLM(cfg)  # embeds no source
    pt.Transformer(tiny_config(pad_id=18))


def test_tie_all_needs_shared_vocabulary():
    cfg = pt.TransformerConfig(
        src_vocab_size=10, tgt_vocab_size=12, d_model=8, num_heads=2, tie_embeddings="all"
    )
    with pytest.raises(ValueError, match="src_vocab_size == tgt_vocab_size"):
        pt.Transformer(cfg)


def test_sinusoidal_positions_are_the_papers():
    C = 10
    pe = sinusoidal_positions(50, C)
    for pos in (0, 1, 7, 49):
        for i in range(C // 2):
            angle = pos / 10000 ** (2 * i / C)
            assert pe[pos, 2 * i] == pytest.approx(np.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie, shared", [("decoder", 2), ("all", 1), ("none", 3)])
def test_tied_parameters_appear_once(tie, shared):
    m = pt.Transformer(tiny_config(tie_embeddings=tie))
    names = list(m.parameters())
    embeds = [n for n in names if "embed" in n or n == "output.weight"]
    assert len(embeds) == shared
    assert ("output.bias" in names) and len(set(names)) == len(names)


def test_flat_buffers_and_views():
    m = pt.Transformer(tiny_config())
    params, grads = m.parameters(), m.gradients()
    assert params.keys() == grads.keys()
    for name, p in params.items():
        assert p.dtype == np.float32 and p.flags.c_contiguous and p.shape == grads[name].shape
        assert np.shares_memory(p, m.param_buffer) and np.shares_memory(grads[name], m.grad_buffer)
        assert p.ctypes.data % 64 == 0
    assert m.num_parameters() == sum(p.size for p in params.values()) <= m.param_buffer.size
    m.grad_buffer[:] = 1.0
    m.zero_grad()
    assert all(not g.any() for g in m.gradients().values())


def test_same_seed_same_weights_different_seed_different():
    a, b, c = (pt.Transformer(tiny_config(), seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.param_buffer, b.param_buffer)
    assert not np.array_equal(a.param_buffer, c.param_buffer)


# ----------------------------------------------------------------------------------------------
# finite-difference gradient check
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm_first=False, activation="gelu", tie_embeddings="decoder"),
        dict(norm_first=True, activation="gelu", tie_embeddings="none", layer_norm_eps=1e-6),
        dict(
            norm_first=False,
            activation="gelu",
            tie_embeddings="all",
            dropout=0.2,
            attention_dropout=0.1,
        ),
    ],
    ids=["post", "pre-eps1e-6", "post-dropout"],
)
def test_gradients_match_finite_differences(overrides, threads):
    """GELU throughout: finite differences need a smooth function, and a ReLU pre-activation
    within h of zero makes the difference quotient differ from the derivative (ReLU's backward is
    checked against PyTorch in test_model_parity.py)."""
    threads(1)  # hundreds of tiny passes: math under test, not threading (covered below)
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1, **overrides)
    model = pt.Transformer(cfg, seed=1)
    batch = random_batch(cfg, np.random.default_rng(2), B=2, S=5, T=4)
    check_gradients(model, batch)


def test_gradients_of_sampled_entries(threads):
    """Single entries (the largest |g| of each tensor) against one-coordinate differences."""
    threads(1)
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1, activation="gelu")
    model = pt.Transformer(cfg, seed=3)
    batch = random_batch(cfg, np.random.default_rng(4), B=2, S=5, T=4)
    mean_loss(model, batch, 0)
    grads = {k: g.copy() for k, g in model.gradients().items()}
    h = 1e-2
    for name, p in model.parameters().items():
        idx = np.unravel_index(np.argmax(np.abs(grads[name])), p.shape)
        g = float(grads[name][idx])
        if g == 0.0:
            continue
        x0 = float(p[idx])
        p[idx] = x0 + h
        f_plus = mean_loss(model, batch, 0)
        p[idx] = x0 - h
        f_minus = mean_loss(model, batch, 0)
        p[idx] = x0
        fd = (f_plus - f_minus) / (2 * h)
        assert abs(fd - g) <= 3e-5 + 3e-3 * abs(g), (name, idx, fd, g)


def test_lm_and_encoder_gradients_match_finite_differences(threads):
    threads(1)
    cfg = tiny_config(
        activation="gelu",
        num_encoder_layers=1,
        num_decoder_layers=2,
        norm_first=True,
        tie_embeddings="none",
    )
    rng = np.random.default_rng(6)
    lm = pt.TransformerLM(cfg, seed=2)
    batch = random_batch(cfg, rng, B=2, S=5, T=5)
    check_gradients(lm, SimpleNamespace(tgt_in=batch.tgt_in, tgt_out=batch.tgt_out))
    enc = pt.TransformerEncoderModel(cfg, seed=2)
    labels = padded(rng, batch.src_lengths, 5, cfg.tgt_vocab_size)
    check_gradients(
        enc, SimpleNamespace(src=batch.src, src_lengths=batch.src_lengths, labels=labels)
    )


# ----------------------------------------------------------------------------------------------
# loss semantics
# ----------------------------------------------------------------------------------------------
def test_loss_and_grad_accumulates_and_counts_tokens():
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=0)
    batch = random_batch(cfg, np.random.default_rng(0))
    loss1, n = m.loss_and_grad(batch)
    assert n == int((batch.tgt_out != PAD).sum()) == batch.n_tokens
    g1 = m.grad_buffer.copy()
    loss2, _ = m.loss_and_grad(batch)
    assert loss1 == loss2
    np.testing.assert_allclose(m.grad_buffer, 2 * g1, rtol=1e-5, atol=1e-6 * np.abs(g1).max())


def test_logits_buffer_kept_across_steps_leaves_no_trace():
    """The logits buffer a model keeps between training steps: a step after a larger and a
    smaller batch gives the bits of the same step on a fresh model, and eval() frees it."""
    cfg = tiny_config()
    rng = np.random.default_rng(3)
    big, small = random_batch(cfg, rng, B=6), random_batch(cfg, rng, B=2)
    fresh = pt.Transformer(cfg, seed=0)
    loss, _ = fresh.loss_and_grad(small)
    used = pt.Transformer(cfg, seed=0)
    used.loss_and_grad(big)
    used.loss_and_grad(small)
    used.zero_grad()
    assert used.loss_and_grad(small)[0] == loss
    np.testing.assert_array_equal(used.grad_buffer, fresh.grad_buffer)
    assert used._logits_buffer._data.size >= small.n_tokens * cfg.tgt_vocab_size
    used.eval()
    assert used._logits_buffer._data.size == 0
    used.train()
    assert used.loss_and_grad(small)[0] == loss


def test_evaluate_loss_is_plain_cross_entropy_of_forward_logits():
    cfg = tiny_config(dropout=0.3)
    m = pt.Transformer(cfg, seed=0)
    batch = random_batch(cfg, np.random.default_rng(1))
    loss_sum, n = m.evaluate_loss(batch)
    m.eval()
    logits = m.forward(batch.src, batch.src_lengths, batch.tgt_in).astype(np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    mask = batch.tgt_out != PAD
    ref = -np.take_along_axis(logp, batch.tgt_out[..., None], -1)[..., 0][mask].sum()
    assert n == mask.sum()
    assert loss_sum == pytest.approx(ref, rel=1e-5)
    assert not m.grad_buffer.any()


def test_evaluate_loss_in_chunks_matches_one_pass(monkeypatch):
    import pytransformer.models.base as model_module

    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=0)
    batch = random_batch(cfg, np.random.default_rng(2), B=4, S=6, T=7)
    whole = m.evaluate_loss(batch)
    monkeypatch.setattr(model_module, "_EVAL_ROWS", 5)
    chunked = m.evaluate_loss(batch)
    assert chunked[1] == whole[1] and chunked[0] == pytest.approx(whole[0], rel=1e-6)


def test_layout_packs_and_pads():
    lengths = np.array([3, 0, 2])
    lay = Layout(3, 4, lengths)
    assert lay.n == 5 and not lay.dense
    x = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    packed = lay.pack(x)
    np.testing.assert_array_equal(packed, np.concatenate([x[0, :3], x[2, :2]]))
    padded_back = lay.pad(packed)
    np.testing.assert_array_equal(padded_back[0, :3], x[0, :3])
    assert (
        not padded_back[0, 3:].any() and not padded_back[1].any() and not padded_back[2, 2:].any()
    )
    out = np.zeros((5, 3, 2), np.float32)
    lay.pack_into(out[:, 1], x)
    np.testing.assert_array_equal(out[:, 1], packed)
    np.testing.assert_array_equal(lay.positional(np.arange(10)[:, None]), [[0], [1], [2], [0], [1]])
    full = Layout(3, 4, np.array([4, 4, 4]))
    assert full.dense and full.lengths is None and np.shares_memory(full.pack(x), x)
    sub = lay.take(np.array([2, 2, 0]))
    np.testing.assert_array_equal(sub.lengths, [2, 2, 3])


def test_dropout_is_reproducible_by_seed_only():
    cfg = tiny_config(dropout=0.3)
    m = pt.Transformer(cfg, seed=0)
    batch = random_batch(cfg, np.random.default_rng(1))
    runs = {}
    for seed in (7, 8, 7):
        m.zero_grad()
        loss, _ = m.loss_and_grad(batch, dropout_seed=seed)
        runs.setdefault(seed, []).append((loss, m.grad_buffer.copy()))
    (l7a, g7a), (l7b, g7b) = runs[7]
    assert l7a == l7b and np.array_equal(g7a, g7b)
    assert runs[8][0][0] != l7a
    m.eval()  # eval mode: no dropout, so the seed does not matter
    m.zero_grad()
    a = m.loss_and_grad(batch, dropout_seed=1)
    m.zero_grad()
    b = m.loss_and_grad(batch, dropout_seed=2)
    assert a == b


def test_gradients_bit_identical_across_thread_counts(threads):
    cfg = tiny_config(dropout=0.1)
    m = pt.Transformer(cfg, seed=0)
    batch = random_batch(cfg, np.random.default_rng(3), B=4, S=9, T=8)
    out = []
    for n in (1, 2):
        threads(n)
        m.zero_grad()
        loss, _ = m.loss_and_grad(batch, dropout_seed=3)
        out.append((loss, m.grad_buffer.copy()))
    assert out[0][0] == out[1][0] and np.array_equal(out[0][1], out[1][1])


def test_padding_does_not_change_results():
    """Extra padding columns change neither the loss nor the gradients."""
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=0)
    b = random_batch(cfg, np.random.default_rng(5))
    wide = SimpleNamespace(
        src=np.pad(b.src, ((0, 0), (0, 3))),
        src_lengths=b.src_lengths,
        tgt_in=np.pad(b.tgt_in, ((0, 0), (0, 2))),
        tgt_out=np.pad(b.tgt_out, ((0, 0), (0, 2))),
    )
    m.zero_grad()
    l1, n1 = m.loss_and_grad(b)
    g1 = m.grad_buffer.copy()
    m.zero_grad()
    l2, n2 = m.loss_and_grad(wide)
    assert n1 == n2 and l1 == pytest.approx(l2, rel=1e-5)
    np.testing.assert_allclose(m.grad_buffer, g1, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# state dict and checkpoints
# ----------------------------------------------------------------------------------------------
def test_state_dict_round_trip_and_errors():
    cfg = tiny_config()
    a, b = pt.Transformer(cfg, seed=0), pt.Transformer(cfg, seed=1)
    sd = a.state_dict()
    b.load_state_dict(sd)
    assert np.array_equal(a.param_buffer, b.param_buffer)
    sd["src_embed.weight"][0, 0] += 1  # a copy: the model is unaffected
    assert not np.array_equal(sd["src_embed.weight"], a.parameters()["src_embed.weight"])
    missing = dict(sd)
    del missing["output.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['output.bias'\]"):
        b.load_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected keys.*bogus"):
        b.load_state_dict({**sd, "bogus": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict({**sd, "output.bias": np.zeros(5, np.float32)})
    with pytest.raises(TypeError, match="output.bias"):
        b.load_state_dict({**sd, "output.bias": np.zeros(cfg.tgt_vocab_size, np.int32)})
    before = b.param_buffer.copy()
    with pytest.raises(ValueError):
        b.load_state_dict({**sd, "output.bias": np.zeros(5, np.float32)})
    assert np.array_equal(before, b.param_buffer)  # nothing written on failure


@pytest.mark.parametrize("cls", [pt.Transformer, pt.TransformerLM, pt.TransformerEncoderModel])
def test_save_load_round_trip(tmp_path, cls):
    cfg = tiny_config(norm_first=True, tie_embeddings="none")
    m = cls(cfg, seed=4)
    m.save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    back = cls.load(tmp_path / "ckpt")
    assert back.config == cfg
    assert back.parameters().keys() == m.parameters().keys()
    for k, v in m.parameters().items():
        assert np.array_equal(back.parameters()[k], v)


def test_load_rejects_broken_checkpoints(tmp_path):
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=0)
    d = tmp_path / "c"
    m.save(d)
    weights = d / "model.safetensors"
    good = weights.read_bytes()
    # corrupted data byte
    bad = bytearray(good)
    bad[-5] ^= 0x40
    weights.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError):
        pt.Transformer.load(d)
    # truncated
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError):
        pt.Transformer.load(d)
    weights.write_bytes(good)
    # config.json from another model: the config stored with the weights wins, with a warning
    (d / "config.json").write_text(tiny_config(d_ff=32).to_json())
    with pytest.warns(UserWarning, match="d_ff: 32 there"):
        again = pt.Transformer.load(d)
    assert again.config == cfg
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k], v)
    (d / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="invalid config"):
        pt.Transformer.load(d)
    (d / "config.json").write_text(cfg.to_json())
    # the wrong class
    with pytest.raises(CheckpointError, match="Transformer"):
        pt.TransformerLM.load(d)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="missing"):
        pt.Transformer.load(d)
    assert isinstance(CheckpointError("x"), ValueError)


def test_load_rejects_weights_that_do_not_fit(tmp_path):
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=0)
    d = tmp_path / "c"
    m.save(d)
    from pytransformer import io

    params = m.state_dict()
    params["output.bias"] = np.zeros(3, np.float32)
    io.save_safetensors(d / "model.safetensors", params)  # no config metadata: shapes decide
    with pytest.raises(CheckpointError, match="output.bias"):
        pt.Transformer.load(d)


# ----------------------------------------------------------------------------------------------
# incremental decoding
# ----------------------------------------------------------------------------------------------
def _greedy_tokens(rng, B, T, vocab):
    tokens = rng.integers(3, vocab, size=(B, T))
    tokens[:, 0] = BOS
    return tokens


@pytest.mark.parametrize("norm_first", [False, True])
def test_decode_step_matches_full_forward(norm_first):
    cfg = tiny_config(norm_first=norm_first, dropout=0.1)
    m = pt.Transformer(cfg, seed=2)  # train mode on purpose: decoding must not apply dropout
    rng = np.random.default_rng(1)
    batch = random_batch(cfg, rng, B=3, S=6, T=1)
    T = 7
    tokens = _greedy_tokens(rng, 3, T, cfg.tgt_vocab_size)
    m.eval()
    full = m.forward(batch.src, batch.src_lengths, tokens)
    m.train()
    memory = m.encode(batch.src, batch.src_lengths)
    state = m.init_decoder_state(memory, batch.src_lengths, max_steps=T)
    for t in range(T):
        logits, attn = m.decode_step(state, tokens[:, t], need_attention=True)
        assert rel_err(logits, full[:, t]) <= 1e-4
        assert attn.shape == (3, 6)
        np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
        assert not attn[np.arange(6)[None, :] >= batch.src_lengths[:, None]].any()
        assert state.step == t + 1
    with pytest.raises(ValueError, match="max_steps"):
        m.decode_step(state, tokens[:, 0])


def test_reorder_matches_decoding_the_reordered_batch():
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=5).eval()
    rng = np.random.default_rng(2)
    batch = random_batch(cfg, rng, B=3, S=6, T=1)
    T = 6
    tokens = _greedy_tokens(rng, 3, T, cfg.tgt_vocab_size)
    state = m.init_decoder_state(m.encode(batch.src, batch.src_lengths), batch.src_lengths, T)
    for t in range(3):
        m.decode_step(state, tokens[:, t])
    rows = np.array([2, 0, 0, 2, 1])  # drop nothing, duplicate two, grow to B'=5
    for step_rows in (rows, np.array([1, 0, 2, 3, 4]), np.array([4, 0, 3])):
        state.reorder(step_rows)
        tokens = tokens[step_rows]
        batch = SimpleNamespace(src=batch.src[step_rows], src_lengths=batch.src_lengths[step_rows])
    # rows now: [2, 0, 2] of the original, with their token histories
    assert state.batch_size == 3 and state.step == 3
    full = m.forward(batch.src, batch.src_lengths, tokens)
    for t in range(3, T):
        logits, _ = m.decode_step(state, tokens[:, t])
        assert rel_err(logits, full[:, t]) <= 1e-4


def test_reorder_within_a_source_keeps_cross_attention_buffers():
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=5).eval()
    rng = np.random.default_rng(3)
    batch = random_batch(cfg, rng, B=2, S=5, T=1)
    state = m.init_decoder_state(m.encode(batch.src, batch.src_lengths), batch.src_lengths, 4)
    cross = state.cross_kvs[0]
    state.reorder(np.array([0, 0, 1, 1]))  # two beams per source share its one copy
    assert state.cross_kvs[0] is cross and state.batch_size == 4
    np.testing.assert_array_equal(state.src_lengths, np.repeat(batch.src_lengths, 2))
    state.reorder(np.array([1, 0, 3, 2]))  # beams swap within their source
    assert state.cross_kvs[0] is cross
    state.reorder(np.array([0, 2]))  # one row per source again: the same two sources
    assert state.cross_kvs[0] is cross and state.batch_size == 2
    state.reorder(np.array([0, 1, 0]))  # source 0 in two runs: one cross row per row
    assert state.cross_kvs[0].shape[0] == 3
    np.testing.assert_array_equal(state.cross_kvs[0][2], cross[0])
    state.reorder(np.array([1, 1, 1]))  # source 1 only, three beams sharing it
    assert state.cross_kvs[0].shape[0] == 1
    np.testing.assert_array_equal(state.cross_kvs[0][0], cross[1])
    np.testing.assert_array_equal(state.src_lengths, np.repeat(batch.src_lengths[1], 3))


@settings(max_examples=60, deadline=None)
@given(moves=st.lists(st.lists(st.integers(0, 63), min_size=1, max_size=9), min_size=1,
                      max_size=6))
def test_reorder_equals_gathering_the_caches(moves):
    """Any sequence of reorders (cycles, duplicates, drops, growth) leaves exactly the rows a
    numpy gather of the filled cache positions gives."""
    B, T = 5, 4
    state = DecoderState(
        [np.random.default_rng(i).standard_normal((B, T, 2, 2, 3)).astype(np.float32)
         for i in range(2)], None, None, T)
    state.step = 3
    want = [c[:, :3].copy() for c in state.kv_caches]
    for m in moves:
        idx = np.array(m) % state.batch_size
        state.reorder(idx)
        want = [w[idx] for w in want]
    for c, w in zip(state.kv_caches, want, strict=True):
        assert c.shape[0] == w.shape[0]
        np.testing.assert_array_equal(c[:, :3], w)


def test_reorder_checks_indices():
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=5)
    b = random_batch(cfg, np.random.default_rng(0), B=2, S=4, T=1)
    state = m.init_decoder_state(m.encode(b.src, b.src_lengths), b.src_lengths, 4)
    with pytest.raises(IndexError, match="indices"):
        state.reorder(np.array([0, 2]))
    with pytest.raises(IndexError, match="indices"):
        state.reorder(np.array([-1]))
    with pytest.raises(TypeError, match="indices"):
        state.reorder(np.array([0.0]))
    with pytest.raises(ValueError, match="indices"):
        state.reorder(np.zeros(0, np.int64))


def test_lm_decode_step_matches_full_forward():
    cfg = tiny_config(norm_first=True, tie_embeddings="none")
    lm = pt.TransformerLM(cfg, seed=1).eval()
    rng = np.random.default_rng(4)
    tokens = _greedy_tokens(rng, 2, 8, cfg.tgt_vocab_size)
    full = lm.forward(tokens)
    state = lm.init_state(2, 8)
    for t in range(8):
        if t == 4:
            state.reorder(np.array([1, 0]))
            tokens, full = tokens[[1, 0]], full[[1, 0]]
        logits, attn = lm.decode_step(state, tokens[:, t])
        assert attn is None and rel_err(logits, full[:, t]) <= 1e-4


def test_concurrent_decoding_threads_match_serial():
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=8).train()
    rng = np.random.default_rng(9)
    batches = [random_batch(cfg, rng, B=2, S=6, T=1) for _ in range(4)]
    tokens = [_greedy_tokens(rng, 2, 6, cfg.tgt_vocab_size) for _ in range(4)]

    def run(i):
        b = batches[i]
        state = m.init_decoder_state(m.encode(b.src, b.src_lengths), b.src_lengths, 6)
        return np.stack([m.decode_step(state, tokens[i][:, t])[0] for t in range(6)])

    serial = [run(i) for i in range(4)]
    results = [None] * 4
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, run(i))) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results, strict=True):
        assert np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------
def test_argument_checks():
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=0)
    b = random_batch(cfg, np.random.default_rng(0))
    src, sl, tin = b.src, b.src_lengths, b.tgt_in
    with pytest.raises(IndexError, match="src"):
        m.forward(np.where(src == PAD, cfg.src_vocab_size, src), sl, tin)
    with pytest.raises(IndexError, match="tgt_in"):
        m.forward(src, sl, -tin)
    with pytest.raises(TypeError, match="src"):
        m.forward(src.astype(np.float32), sl, tin)
    with pytest.raises(TypeError, match="src"):
        m.forward(src.tolist(), sl, tin)
    with pytest.raises(ValueError, match="src_lengths"):
        m.forward(src, sl + src.shape[1], tin)
    with pytest.raises(ValueError, match="src_lengths"):
        m.forward(src, sl[:-1], tin)
    with pytest.raises(ValueError, match="empty"):
        m.forward(src[:0], sl[:0], tin[:0])
    with pytest.raises(ValueError, match="tgt_in"):
        m.forward(src, sl, tin[:-1])
    long = np.ones((1, cfg.max_len + 1), np.int64)
    with pytest.raises(ValueError, match="max_len"):
        m.encode(long, np.array([cfg.max_len + 1]))
    with pytest.raises(ValueError, match="tgt_out"):
        m.loss_and_grad(SimpleNamespace(src=src, src_lengths=sl, tgt_in=tin, tgt_out=tin[:, :-1]))
    with pytest.raises(IndexError, match="tgt_out"):
        m.loss_and_grad(SimpleNamespace(src=src, src_lengths=sl, tgt_in=tin, tgt_out=tin + 100))
    with pytest.raises(TypeError, match="batch"):
        m.loss_and_grad(object())
    with pytest.raises(ValueError, match="label_smoothing"):
        m.loss_and_grad(b, label_smoothing=1.5)
    memory = m.encode(src, sl)
    with pytest.raises(ValueError, match="max_steps"):
        m.init_decoder_state(memory, sl, cfg.max_len + 1)
    with pytest.raises(TypeError, match="memory"):
        m.init_decoder_state(memory.astype(np.float64), sl, 4)
    state = m.init_decoder_state(memory, sl, 4)
    with pytest.raises(ValueError, match="tokens"):
        m.decode_step(state, np.array([BOS]))
    with pytest.raises(IndexError, match="tokens"):
        m.decode_step(state, np.full(len(sl), cfg.tgt_vocab_size))
    with pytest.raises(RuntimeError, match="forward"):
        pt.Transformer(cfg).backward(np.zeros((1, 1, cfg.tgt_vocab_size), np.float32))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 0, 1])
def test_explicit_attention_path_matches_the_kernel(causal, window):
    """The path used under attention dropout, run with p ~ 0 (every probability kept), against
    ops.attention / ops.attention_backward, with masked keys, an empty row and a window."""
    from pytransformer import ops
    from pytransformer.nn.attention import _Attention
    from pytransformer.nn.layers import Context

    rng = np.random.default_rng(0)
    B, L, H, D = 3, 5, 2, 4
    qkv = rng.standard_normal((B, L, 3, H, D)).astype(np.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    lengths = None if causal else np.array([5, 2, 0])
    ctx = Context()
    ctx.grad_mode = True
    core = _Attention(H, D, 1e-12, ctx)
    out = core.forward(q, k, v, lengths, causal, window)
    masks = dict(key_lengths=lengths, causal=causal, window=window)
    ref, lse = ops.attention(q, k, v, return_lse=True, **masks)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = core.backward(dout)
    refs = ops.attention_backward(dout, q, k, v, ref, lse, **masks)
    for g, r in zip(grads, refs, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_empty_source_rows_are_finite_and_consistent():
    """make_batch gives an empty source length 0: its cross-attention sees no key (zeros)."""
    cfg = tiny_config()
    m = pt.Transformer(cfg, seed=1)
    b = random_batch(cfg, np.random.default_rng(3), B=3, S=5, T=4)
    b.src_lengths[1] = 0
    b.src[1] = PAD
    loss, n = m.loss_and_grad(b)
    assert np.isfinite(loss) and n == b.n_tokens and np.isfinite(m.grad_buffer).all()
    m.eval()
    full = m.forward(b.src, b.src_lengths, b.tgt_in)
    memory = m.encode(b.src, b.src_lengths)
    assert not memory[1].any()
    state = m.init_decoder_state(memory, b.src_lengths, 4)
    for t in range(4):
        logits, attn = m.decode_step(state, b.tgt_in[:, t], need_attention=True)
        assert rel_err(logits, full[:, t]) <= 1e-4
        assert not attn[1].any()


# ----------------------------------------------------------------------------------------------
# restricted (windowed) self-attention
# ----------------------------------------------------------------------------------------------
WINDOWED = dict(encoder_attention_window=1, decoder_attention_window=2)


def test_window_config_is_saved_and_old_checkpoints_load(tmp_path, monkeypatch):
    cfg = tiny_config(**WINDOWED)
    assert pt.TransformerConfig.from_json(cfg.to_json()) == cfg
    pt.Transformer(cfg, seed=0).save(tmp_path / "w")
    assert pt.Transformer.load(tmp_path / "w").config == cfg
    # A checkpoint written before the fields existed (in config.json and in the weights' stored
    # config) loads with full attention, without a mismatch warning.
    old_fields = dataclasses.asdict
    monkeypatch.setattr(pt.TransformerConfig, "to_dict", lambda self: {
        k: v for k, v in old_fields(self).items() if k not in WINDOWED})
    pt.Transformer(tiny_config(), seed=0).save(tmp_path / "old")
    monkeypatch.undo()
    assert "attention_window" not in (tmp_path / "old" / "config.json").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = pt.Transformer.load(tmp_path / "old").config
    assert back.encoder_attention_window is None and back.decoder_attention_window is None


def test_window_decode_step_matches_full_forward():
    """Decoding with a window (the step reads the last window + 1 cache entries) equals the
    teacher-forced forward over sequences longer than the window, which differs from full
    attention with the same weights."""
    cfg = tiny_config(**WINDOWED)
    m = pt.Transformer(cfg, seed=2).eval()
    rng = np.random.default_rng(1)
    batch = random_batch(cfg, rng, B=3, S=8, T=1)
    T = 9
    tokens = _greedy_tokens(rng, 3, T, cfg.tgt_vocab_size)
    full = m.forward(batch.src, batch.src_lengths, tokens)
    unrestricted = pt.Transformer(tiny_config(), seed=0).eval()
    unrestricted.load_state_dict(m.state_dict())
    assert rel_err(unrestricted.forward(batch.src, batch.src_lengths, tokens), full) > 1e-2
    state = m.init_decoder_state(m.encode(batch.src, batch.src_lengths), batch.src_lengths, T)
    for t in range(T):
        logits, _ = m.decode_step(state, tokens[:, t])
        assert rel_err(logits, full[:, t]) <= 1e-4, t


def test_window_lm_decode_step_matches_full_forward():
    cfg = tiny_config(norm_first=True, tie_embeddings="none", decoder_attention_window=3)
    lm = pt.TransformerLM(cfg, seed=1).eval()
    tokens = _greedy_tokens(np.random.default_rng(4), 2, 10, cfg.tgt_vocab_size)
    full = lm.forward(tokens)
    state = lm.init_state(2, 10)
    for t in range(10):
        logits, _ = lm.decode_step(state, tokens[:, t])
        assert rel_err(logits, full[:, t]) <= 1e-4, t


@pytest.mark.parametrize("attention_dropout", [0.0, 0.1], ids=["kernel", "explicit"])
def test_window_gradients_match_finite_differences(threads, attention_dropout):
    """Windows narrower than the sequences in both stacks, through the flash kernel and through
    the explicit path attention dropout takes; then a windowed LM and encoder model."""
    threads(1)
    cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1, activation="gelu",
                      attention_dropout=attention_dropout, **WINDOWED)
    batch = random_batch(cfg, np.random.default_rng(2), B=2, S=6, T=5)
    check_gradients(pt.Transformer(cfg, seed=1), batch)
    if attention_dropout:
        return
    check_gradients(pt.TransformerLM(cfg, seed=2),
                     SimpleNamespace(tgt_in=batch.tgt_in, tgt_out=batch.tgt_out))
    labels = padded(np.random.default_rng(3), batch.src_lengths, 6, cfg.tgt_vocab_size)
    check_gradients(pt.TransformerEncoderModel(cfg, seed=2),
                     SimpleNamespace(src=batch.src, src_lengths=batch.src_lengths, labels=labels))
