"""Fuzzing of the models' public methods: encode, decode_step, translate and generate,
loss_and_grad, state dicts and checkpoints; the method is described in fuzzing.py."""

from __future__ import annotations

import math
import tempfile
import types

import numpy as np
import pytest
from fuzzing import (
    call_ok,
    draw_ids,
    draw_values,
    expect_raise,
    fuzz_watchdog,  # noqa: F401 - autouse: the watchdog and the call count
    model_settings,
)
from hypothesis import given
from hypothesis import strategies as st
from model_cases import small_config

from pytransformer import (
    Transformer,
    TransformerEncoderModel,
    TransformerLM,
)
from pytransformer.train.data import Batch

pytestmark = pytest.mark.fuzz


V = 13
_MODELS: dict = {}


def _model(kind="seq2seq"):
    if kind not in _MODELS:
        cls = {"seq2seq": Transformer, "lm": TransformerLM, "enc": TransformerEncoderModel}[kind]
        _MODELS[kind] = cls(small_config(V, 8, max_len=12, dropout=0.1), seed=3)
    return _MODELS[kind]


def _bad_ids(draw, shape, vocab):
    """An id array broken one way, or a non-array."""
    how = draw(st.sampled_from(["neg", "huge", "vocab", "float", "rank", "empty", "list", "bool"]))
    ids = draw_ids(draw, shape, vocab, np.int64)
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


@model_settings
@given(st.data())
def test_fuzz_encode(data):
    draw = data.draw
    model = _model()
    B, S = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    src = draw_ids(draw, (B, S), V)
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
    assert mem.shape == (B, S, model.config.d_model) and mem.dtype == np.float32
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
    src = draw_ids(draw, (B, S), V)
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
        tokens = draw_ids(draw, (B,), V)
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
    seqs = [list(draw_ids(draw, (draw(st.integers(0 if not lm else 1, 5)),), V)) for _ in range(n)]
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
            seqs = seqs + [[1] * (model.config.max_len + draw(st.integers(1, 5)))]
            if not lm:  # translate cuts a long source (with a warning), as CTranslate2
                with pytest.warns(UserWarning, match="truncated"):
                    out = call_ok("translate", model.translate, seqs, **kwargs)
                assert len(out) == len(seqs)
                return
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
            assert len(prompt) + len(gen) <= model.config.max_len
            assert all(0 <= t < V for t in gen)
    else:
        out = call_ok("translate", model.translate, seqs, **kwargs)
        assert len(out) == n
        for r in out:
            toks = r.tokens if hasattr(r, "tokens") else r.hypotheses[0]
            assert len(toks) <= kwargs["max_decoding_length"]
            assert all(0 <= t < V for t in toks)


def _batch(draw, B, S, T, lm=False):
    src = None if lm else draw_ids(draw, (B, S), V, np.int64)
    src_len = None if lm else np.array([draw(st.integers(0, S)) for _ in range(B)], np.int64)
    tgt_in = draw_ids(draw, (B, T), V, np.int64)
    tgt_out = draw_ids(draw, (B, T), V, np.int64)
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
                else np.zeros((B, model.config.max_len + 1), np.int64)
            )
            if kind == "enc" and field == "src":
                bad = np.zeros((B, model.config.max_len + 1), np.int64)
            elif field == "src" and bad.shape[1] < val.shape[1]:
                # Narrower than the source is only wrong when a length reaches past it.
                batch.src_lengths = batch.src_lengths.copy()
                batch.src_lengths[0] = val.shape[1]
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
            k: draw_values(
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
