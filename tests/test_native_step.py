"""The native decoder step (`_C.DecoderStepPlan`, one call for every layer) against the Python
layers it replaces: the same kernels on the same operands, so logits must match bit for bit over
model variants (post-/pre-norm, ReLU/GELU, windowed self-attention, int8, packed weights,
decoder-only), batch sizes, source lengths and beam groupings, and whole searches must return
the same tokens and scores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_cases import EOS, tiny_config

import pytransformer as pt
from pytransformer.models import quantize, state

VARIANTS = {
    "post-norm": {},
    "pre-norm": dict(norm_first=True),
    "gelu": dict(activation="gelu"),
    "window": dict(decoder_attention_window=2),
    "three-heads": dict(d_model=24, num_heads=3, d_ff=40),
}


def _model(variant: str, int8: bool, seed: int = 0) -> pt.Transformer:
    model = pt.Transformer(tiny_config(**VARIANTS[variant]), seed=seed)
    return quantize.quantize_model(model) if int8 else model


def _steps(model, memory, lengths, tokens, pack, native, group=1):
    """Logits of len(tokens) steps; with group > 1 each source decodes `group` rows (beams)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "NATIVE_STEP", native)
        st_ = model.init_decoder_state(memory, lengths, tokens.shape[1], pack_weights=pack)
    assert (st_.native is not None) == native
    if group > 1:
        st_.reorder(np.repeat(np.arange(memory.shape[0]), group))
    out = []
    for t in range(tokens.shape[1]):
        out.append(model.decode_step(st_, tokens[:, t])[0])
    return np.stack(out), st_


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("int8", [False, True])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_native_step_matches_python_layers(variant, int8, data):
    model = _model(variant, int8)
    cfg = model.config
    B = data.draw(st.integers(1, 7), label="sources")
    group = data.draw(st.sampled_from([1, 3]), label="rows per source")
    S = data.draw(st.integers(1, 9), label="source length")
    T = data.draw(st.integers(1, 12), label="steps")
    pack = data.draw(st.booleans(), label="pack_weights")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    lengths = rng.integers(1, S + 1, size=B)
    src = rng.integers(3, cfg.src_vocab_size, size=(B, S))
    memory = model.encode(src, lengths)
    tokens = rng.integers(0, cfg.tgt_vocab_size, size=(B * group, T))
    ours, s_native = _steps(model, memory, lengths, tokens, pack, True, group)
    ref, s_python = _steps(model, memory, lengths, tokens, pack, False, group)
    np.testing.assert_array_equal(ours, ref)
    for a, b in zip(s_native.kv_caches, s_python.kv_caches, strict=True):
        np.testing.assert_array_equal(a[:, :T], b[:, :T])


def test_native_step_decoder_only(monkeypatch):
    model = pt.TransformerLM(tiny_config(norm_first=True), seed=3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, model.config.tgt_vocab_size, size=(5, 9))
    out = {}
    for native in (True, False):
        monkeypatch.setattr(state, "NATIVE_STEP", native)
        s = model.init_state(5, 9)
        assert (s.native is not None) == native
        out[native] = np.stack([model.decode_step(s, tokens[:, t])[0] for t in range(9)])
    np.testing.assert_array_equal(out[True], out[False])


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("beam", [1, 4])
def test_native_step_searches_agree(int8, beam, monkeypatch):
    """Whole searches (beams reordered, finished sentences leaving the batch, the state's caches
    growing past their first capacity) give the same hypotheses and scores."""
    model = _model("post-norm", int8, seed=5)
    rng = np.random.default_rng(1)
    sources = [rng.integers(3, 19, size=int(n)).tolist() for n in rng.integers(1, 10, size=6)]
    kw = dict(beam_size=beam, max_decoding_length=30, return_scores=True, num_hypotheses=beam)
    got = {}
    for native in (True, False):
        monkeypatch.setattr(state, "NATIVE_STEP", native)
        got[native] = model.translate(sources, **kw)
    assert got[True] == got[False]


def test_replaced_packed_weights_remake_the_plan():
    """translate gives a batch's later states the first state's packed copy: the native step
    must then take the packed kernels too (with 4-16 rows their bits differ from the plain
    product's)."""
    model = _model("post-norm", False)
    rng = np.random.default_rng(4)
    lengths = np.array([4, 3, 5, 2, 4])
    memory = model.encode(rng.integers(3, 19, size=(5, 5)), lengths)
    tokens = rng.integers(3, 23, size=(5, 6))
    donor = model.init_decoder_state(memory, lengths, 6, pack_weights=True)
    logits = {}
    for native in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(state, "NATIVE_STEP", native)
            s = model.init_decoder_state(memory, lengths, 6, pack_weights=False)
            s.packed_weights = donor.packed_weights
            logits[native] = np.stack([model.decode_step(s, tokens[:, t])[0] for t in range(6)])
    np.testing.assert_array_equal(logits[True], logits[False])


@pytest.mark.parametrize("beam", [1, 4])
def test_native_step_chunked_translate_agrees(beam, monkeypatch):
    model = _model("pre-norm", False, seed=2)
    rng = np.random.default_rng(3)
    sources = [rng.integers(3, 19, size=int(n)).tolist() for n in rng.integers(1, 10, size=13)]
    kw = dict(beam_size=beam, max_decoding_length=40, return_scores=True, max_batch_size=5)
    got = {}
    for native in (True, False):
        monkeypatch.setattr(state, "NATIVE_STEP", native)
        got[native] = model.translate(sources, **kw)
    assert got[True] == got[False]


def test_attention_capture_takes_the_python_layers(monkeypatch):
    """need_attention steps run the Python layers (the native step returns no weights) and
    still match a native run's logits."""
    model = _model("post-norm", False)
    rng = np.random.default_rng(2)
    lengths = np.array([3, 5])
    memory = model.encode(rng.integers(3, 19, size=(2, 5)), lengths)
    s = model.init_decoder_state(memory, lengths, 4)
    assert s.native is not None
    tokens = np.array([EOS, 4])
    logits, attn = model.decode_step(s, tokens, need_attention=True)
    assert attn.shape == (2, 5)
    np.testing.assert_allclose(attn.sum(axis=1), 1.0, rtol=1e-5)
    s2 = model.init_decoder_state(memory, lengths, 4)
    np.testing.assert_array_equal(model.decode_step(s2, tokens)[0], logits)


def test_swish_falls_back_to_python():
    model = pt.Transformer(tiny_config(activation="swish"), seed=0)
    rng = np.random.default_rng(0)
    memory = model.encode(rng.integers(3, 19, size=(1, 4)), np.array([4]))
    assert model.init_decoder_state(memory, np.array([4]), 3).native is None


def test_plan_checks_its_arrays():
    model = _model("post-norm", False)
    rng = np.random.default_rng(0)
    memory = model.encode(rng.integers(3, 19, size=(2, 4)), np.array([4, 2]))
    s = model.init_decoder_state(memory, np.array([4, 2]), 3)
    x = np.zeros((2, 16), np.float32)
    plan = s.native
    with pytest.raises(ValueError, match="x"):
        plan.run(np.zeros((2, 15), np.float32), 0, s.kv_caches, s.cross_kvs, None)
    with pytest.raises(TypeError, match="x"):
        plan.run(x.astype(np.float64), 0, s.kv_caches, s.cross_kvs, None)
    with pytest.raises(ValueError, match="kv_caches"):
        plan.run(x, 0, s.kv_caches[:1], s.cross_kvs, None)
    with pytest.raises(ValueError, match="kv_caches"):
        plan.run(x, s.capacity, s.kv_caches, s.cross_kvs, None)
    with pytest.raises(ValueError, match="cross_kvs"):
        plan.run(x, 0, s.kv_caches, None, None)
    with pytest.raises(ValueError, match="cross_lengths"):
        plan.run(x, 0, s.kv_caches, s.cross_kvs, np.array([4, 9]))
    with pytest.raises(ValueError, match="pos"):
        plan.run(x, -1, s.kv_caches, s.cross_kvs, None)


@pytest.mark.parametrize("native", [False, True])
def test_decode_step_errors_are_the_same_on_both_paths(native, monkeypatch):
    """The native step checks the tokens itself (the plan embeds them): the same exception
    types, naming the argument, as check_ids on the Python path."""
    model = _model("post-norm", False)
    monkeypatch.setattr(state, "NATIVE_STEP", native)
    memory = model.encode(np.array([[3, 4, 5], [6, 7, 0]]), np.array([3, 2]))
    s = model.init_decoder_state(memory, np.array([3, 2]), 3)
    V = model.config.tgt_vocab_size
    with pytest.raises(IndexError, match=f"tokens: id {V} .* out of range"):
        model.decode_step(s, np.array([1, V]))
    with pytest.raises(IndexError, match="tokens: id -1"):
        model.decode_step(s, np.array([-1, 1]))
    with pytest.raises(TypeError, match="tokens"):
        model.decode_step(s, np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="tokens"):
        model.decode_step(s, [1, 2])
    with pytest.raises(ValueError, match="tokens"):
        model.decode_step(s, np.array([[1, 2]]))
    with pytest.raises(ValueError, match="tokens"):
        model.decode_step(s, np.array([1]))
    assert s.step == 0  # nothing ran
    for dtype in (np.int32, np.uint8):
        model.decode_step(s, np.array([1, 2], dtype=dtype))
    assert s.step == 2


def test_run_tokens_checks_its_arguments():
    model = _model("post-norm", True)
    memory = model.encode(np.array([[3, 4, 5], [6, 7, 0]]), np.array([3, 2]))
    s = model.init_decoder_state(memory, np.array([3, 2]), 3)
    plan = s.native
    assert plan.has_embedding and plan.has_output
    tok = np.array([1, 2])
    with pytest.raises(ValueError, match="empty"):
        plan.run_tokens(np.zeros(0, np.int64), 0, s.kv_caches, s.cross_kvs, None)
    with pytest.raises(ValueError, match="pos"):
        plan.run_tokens(tok, model.config.max_len, s.kv_caches, s.cross_kvs, None)
    with pytest.raises(ValueError, match="kv_caches"):
        plan.run_tokens(np.array([1, 2, 3]), 0, s.kv_caches, s.cross_kvs, None)
    h = plan.run_tokens(tok, 0, s.kv_caches, s.cross_kvs, None, project=False)
    assert h.shape == (2, model.config.d_model)
    cfg = model.config
    specs = [state._layer_spec(layer, None) for layer in model.decoder.layers]
    final = state._norm_spec(model.decoder.norm) if model.decoder.norm is not None else None

    def plan_with(**kw):
        return state._C.DecoderStepPlan(specs, final, cfg.norm_first, cfg.activation,
                                        cfg.d_model, cfg.num_heads, cfg.d_ff, None, 4, **kw)

    table = np.zeros((5, cfg.d_model), np.float32)
    positions = model.positions
    with pytest.raises(ValueError, match="embedding"):
        plan_with(embedding=(table, None))
    with pytest.raises(ValueError, match="embedding.table"):
        plan_with(embedding=(table, None, None, positions, 1.0, 6))
    with pytest.raises(ValueError, match="embedding.positions"):
        plan_with(embedding=(table, None, None, positions[:, :3], 1.0, 5))
    with pytest.raises(ValueError, match="run_tokens"):
        plan_with().run_tokens(tok, 0, s.kv_caches, s.cross_kvs, None)
    no_output = plan_with(embedding=(table, None, None, positions, 1.0, 5))
    with pytest.raises(ValueError, match="without an output"):
        no_output.run_tokens(tok, 0, s.kv_caches, s.cross_kvs, None)
    with pytest.raises(IndexError, match="tokens: id 5"):
        no_output.run_tokens(np.array([5, 0]), 0, s.kv_caches, s.cross_kvs, None, project=False)
