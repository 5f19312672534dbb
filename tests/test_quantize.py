"""int8 quantisation and int8 inference of whole models: the per-row scheme, int8 checkpoints,
compute_type on load, the CLI, and a trained model's translations in int8 against float32."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from model_cases import small_config

import pytransformer as pt
from pytransformer import io, ops
from pytransformer.cli import main
from pytransformer.models import quantize


@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 70),
    magnitude=st.floats(1e-6, 1e6),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_within_half_a_step(rows, cols, magnitude, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * magnitude).astype(np.float32)
    w[rng.random(rows) < 0.2] = 0.0  # some all-zero rows
    q, scale = ops.quantize_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (rows,)
    assert np.abs(q.astype(np.int32)).max() <= 127
    amax = np.abs(w).max(1)
    np.testing.assert_allclose(scale[amax > 0], 127 / amax[amax > 0], rtol=1e-6)
    assert (scale[amax == 0] == 1).all()
    back = ops.dequantize_int8(q, scale)
    half_step = 0.5 / scale.astype(np.float64)
    assert (np.abs(back - w) <= half_step[:, None] * (1 + 1e-5)).all()
    # each row's largest element maps to +-127 exactly
    nz = amax > 0
    assert (np.abs(q[nz]).max(1) == 127).all()


@pytest.mark.parametrize("cols", [1, 8, 77, 1024])
def test_activation_quantisation_matches_the_weight_scheme(isa, rng, cols):
    """The kernel's dynamic row quantisation (C++, both ISAs) and the numpy weight quantisation
    agree bit for bit, ties (x * scale exactly half-way) included."""
    x = (rng.standard_normal((33, cols)) * 3).astype(np.float32)
    x[4] = 0.0
    x[5] = np.float32(127.0)
    x[5, 1::2] = np.float32(2.5)  # scale 1: 2.5 rounds to 2 (half to even)
    q, s = ops.quantize_rows(x)
    q2, s2 = ops.quantize_int8(x)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(s, s2)


def test_quantize_validation():
    with pytest.raises(TypeError, match="weight: expected a floating array"):
        ops.quantize_int8(np.ones((2, 2), np.int32))
    with pytest.raises(TypeError, match="weight: expected a numpy.ndarray"):
        ops.quantize_int8([[1.0]])
    with pytest.raises(ValueError, match="weight: expected a non-empty 2-D"):
        ops.quantize_int8(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="inf or NaN"):
        ops.quantize_int8(np.array([[1.0, np.inf]], np.float32))
    with pytest.raises(TypeError, match="q: expected dtype int8"):
        ops.dequantize_int8(np.ones((2, 2), np.int16), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="x: expected 2-D"):
        ops.quantize_rows(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="compute_type: expected a str"):
        quantize.check_compute_type(8)
    with pytest.raises(ValueError, match="compute_type: expected one of"):
        quantize.check_compute_type("int4")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random 2+2-layer model saved float32 and int8 (tie_embeddings='none': the embeddings
    and the output projection are separate weights)."""
    cfg = small_config(61, 64, layers=2, max_len=40, tie_embeddings="none", dropout=0.0)
    model = pt.Transformer(cfg, seed=5).eval()
    d = tmp_path_factory.mktemp("q")
    model.save(d / "f32")
    quantize.quantize_model(pt.Transformer.load(d / "f32")).save(d / "int8")
    return model, d


def sources(rng, n=6, vocab=61, max_len=14):
    lengths = rng.integers(3, max_len + 1, n)
    return [list(rng.integers(3, vocab, int(length))) for length in lengths]


# Decoder inputs of step_logits: fixed, so both models see the same prefix (their own argmax
# would part at a near-tie, and the logits after that compare different prefixes).
FORCED = np.random.default_rng(7).integers(3, 37, (6, 6))


def step_logits(model, src, steps=6):
    lengths = np.array([len(s) for s in src])
    ids = np.zeros((len(src), lengths.max()), np.int64)
    for i, s in enumerate(src):
        ids[i, : len(s)] = s
    mem = model.encode(ids, lengths)
    state = model.init_decoder_state(mem, lengths, steps)
    tokens = np.full(len(src), model.config.bos_id)
    out = []
    for step in range(steps):
        logits, _ = model.decode_step(state, tokens)
        out.append(logits)
        tokens = FORCED[step, : len(src)]
    return np.stack(out)


def test_int8_logits_within_bound(saved, rng):
    """Stated bound: every logit of the int8 model within 3% of the float32 model's largest
    logit magnitude (observed about 1-1.5% on this model)."""
    model, d = saved
    q = pt.Transformer.load(d / "f32", compute_type="int8")
    assert q.compute_type == "int8"
    src = sources(rng)
    f32, int8 = step_logits(model, src), step_logits(q, src)
    assert np.abs(int8 - f32).max() <= 0.03 * np.abs(f32).max()
    assert not np.array_equal(int8, f32)  # the int8 path really ran


def test_int8_checkpoint_is_smaller_and_loads(saved, rng):
    model, d = saved
    f32_file, int8_file = d / "f32" / "model.safetensors", d / "int8" / "model.safetensors"
    header = io.read_safetensors_header(int8_file)
    tensors = header[0] if isinstance(header, tuple) else header
    weights = [param for param, _ in quantize.quantized_params(model).values()]
    assert len(weights) == 2 + 2 * 4 + 2 * 7 + 1  # embeddings, encoder, decoder, output
    for param in weights:
        assert tensors[param.name][0] == "I8"
        assert tensors[param.name + "_scale"][0] == "F32"
    # Each float32 weight became int8 rows (a quarter of its bytes) plus one float32 scale per
    # row; allow 4 KiB for the longer header.
    linear_bytes = sum(param.data.nbytes for param in weights)
    int8_bytes = sum(param.size + 4 * param.shape[0] for param in weights)
    saved_bytes = os.path.getsize(f32_file) - os.path.getsize(int8_file)
    assert saved_bytes >= linear_bytes - int8_bytes - 4096
    src = sources(rng)
    from_f32 = step_logits(pt.Transformer.load(d / "f32", compute_type="int8"), src)
    from_int8 = step_logits(pt.Transformer.load(d / "int8", compute_type="int8"), src)
    np.testing.assert_array_equal(from_int8, from_f32)  # int8 rows kept as they are
    # By default an int8 file runs int8; loaded as float32 it is the dequantised model: close
    # to, not equal to, float32.
    assert quantize.compute_type(pt.Transformer.load(d / "int8")) == "int8"
    assert quantize.compute_type(pt.Transformer.load(d / "f32")) == "float32"
    deq = pt.Transformer.load(d / "int8", compute_type="float32")
    assert quantize.compute_type(deq) == "float32"
    f32, f32_deq = step_logits(model, src), step_logits(deq, src)
    assert 0 < np.abs(f32_deq - f32).max() <= 0.03 * np.abs(f32).max()


def test_int8_model_memory_and_training_refused(saved):
    model, d = saved
    q = pt.Transformer.load(d / "int8", compute_type="int8")
    groups = quantize.quantized_params(model)
    released = sum(param.size for param, _ in groups.values())
    assert q.param_buffer.size <= model.param_buffer.size - released
    assert all(np.isnan(p.data).all() for p, _ in quantize.quantized_params(q).values())
    with pytest.raises(RuntimeError, match="inference only"):
        q.src_embed.backward(np.ones((1, 64), np.float32))
    with pytest.raises(RuntimeError, match="inference only"):
        q.output.backward(np.ones((1, 61), np.float32), np.ones((1, 64), np.float32))
    # saving an int8 model again gives the same file contents
    q.save(d / "again")
    a, _ = io.load_safetensors(d / "again" / "model.safetensors")
    b, _ = io.load_safetensors(d / "int8" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_tied_output_projection(rng, tmp_path):
    """With tie_embeddings='decoder' the target embedding and the output projection read one
    QuantizedWeight, saved once as int8; the embedding rows it gathers are the dequantised ones."""
    cfg = small_config(37, 32, layers=1, max_len=30, tie_embeddings="decoder")
    model = pt.Transformer(cfg, seed=2).eval()
    q = quantize.quantize_model(pt.Transformer(cfg, seed=2).eval())
    assert q.output.quantized is q.tgt_embed.quantized is not None
    w = model.tgt_embed.weight.data
    ids = rng.integers(0, 37, (3, 5))
    rows = q.tgt_embed.quantized.dequantize_rows(ids, scale=2.0)
    qi, s = ops.quantize_int8(w)
    np.testing.assert_allclose(rows, 2.0 * qi[ids] / s[ids][..., None], rtol=1e-6)
    # The float32 expression the lookup is specified by, bit for bit (any integer dtype of ids).
    exact = qi[ids].astype(np.float32) * (np.float32(2.0) / s[ids])[..., None]
    for dtype in (np.int64, np.int32, np.uint16):
        got = q.tgt_embed.quantized.dequantize_rows(ids.astype(dtype), scale=2.0)
        np.testing.assert_array_equal(got, exact)
    assert np.abs(rows - 2.0 * w[ids]).max() <= 2.0 * 0.5 / s.min() * (1 + 1e-5)
    with pytest.raises(IndexError, match="id 37"):
        q.tgt_embed.quantized.dequantize_rows(np.array([1, 37]))
    with pytest.raises(TypeError, match="ids: expected an integer"):
        q.tgt_embed.quantized.dequantize_rows(np.array([1.0]))
    q.save(tmp_path)
    tensors, _ = io.load_safetensors(tmp_path / "model.safetensors")
    assert tensors["tgt_embed.weight"].dtype == np.int8 and "output.weight" not in tensors
    src = sources(rng, vocab=37)
    again = pt.Transformer.load(tmp_path, compute_type="int8")
    assert again.output.quantized is again.tgt_embed.quantized
    np.testing.assert_array_equal(step_logits(again, src), step_logits(q, src))


def test_bad_int8_checkpoints(saved, tmp_path):
    model, d = saved
    tensors, meta = io.load_safetensors(d / "int8" / "model.safetensors")
    name = quantize.model_linears(model)[0].weight.name
    bad = dict(tensors)
    del bad[name + "_scale"]
    io.save_safetensors(tmp_path / "model.safetensors", bad, metadata=meta)
    (tmp_path / "config.json").write_text((d / "int8" / "config.json").read_text())
    with pytest.raises(io.CheckpointError, match="without"):
        pt.Transformer.load(tmp_path, compute_type="int8")
    bad = dict(tensors)
    bad[name + "_scale"] = -bad[name + "_scale"]
    io.save_safetensors(tmp_path / "model.safetensors", bad, metadata=meta)
    with pytest.raises(io.CheckpointError, match="positive and finite"):
        pt.Transformer.load(tmp_path, compute_type="float32")
    with pytest.raises(ValueError, match="compute_type"):
        pt.Transformer.load(d / "int8", compute_type="float16")


def test_threads_decode_one_int8_model(saved, rng):
    """Several Python threads translating with one int8 model get the serial results."""
    _, d = saved
    q = pt.Transformer.load(d / "int8", compute_type="int8")
    jobs = [sources(rng, n=3) for _ in range(4)]
    expected = [q.translate(src, beam_size=2, max_decoding_length=12) for src in jobs]
    got: list = [None] * len(jobs)

    def work(i):
        got[i] = q.translate(jobs[i], beam_size=2, max_decoding_length=12)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert got == expected


@pytest.fixture(scope="module")
def demo_translator(tmp_path_factory):
    """The quick demo's model (number words, 200 updates; about 20 s on two busy cores)."""
    pytest.importorskip("sentencepiece")
    from pytransformer.demo import demo_settings
    from pytransformer.numbers import make_number_splits
    from pytransformer.translator import train_translator

    settings = demo_settings(quick=True)
    settings.options.valid_every = 0
    splits = make_number_splits(settings.max_number, settings.n_valid, 200)
    src, tgt = map(list, zip(*splits.train, strict=True))
    out = tmp_path_factory.mktemp("demo")
    train_translator(src, tgt, str(out), options=settings.options, progress=False)
    return out, [s for s, _ in splits.test]


def test_trained_model_int8_greedy_matches_float32(demo_translator):
    from pytransformer.translator import Translator

    out, test_src = demo_translator
    f32 = Translator.load(out).translate(test_src, beam_size=1)
    int8 = Translator.load(out, compute_type="int8").translate(test_src, beam_size=1)
    same = np.mean([a == b for a, b in zip(f32, int8, strict=True)])
    assert same >= 0.97, same


def test_cli_quantize_and_translate(demo_translator, tmp_path, capsys):
    out, test_src = demo_translator
    (tmp_path / "src.txt").write_text("".join(f"{s}\n" for s in test_src[:20]))
    assert main(["quantize", str(out), "--out", str(tmp_path / "q")]) == 0
    assert "int8 model saved" in capsys.readouterr().err
    before = os.path.getsize(out / "model" / "model.safetensors")
    after = os.path.getsize(tmp_path / "q" / "model" / "model.safetensors")
    assert after < 0.5 * before
    hyp = {}
    runs = [("f32", out, ["--compute-type", "int8"]), ("q", tmp_path / "q", []),
            ("deq", tmp_path / "q", ["--compute-type", "float32"])]
    for name, model, extra in runs:
        assert main(["translate", "--model", str(model), "--input", str(tmp_path / "src.txt"),
                     "--output", str(tmp_path / f"{name}.txt"), "--beam-size", "1", *extra]) == 0
        hyp[name] = (tmp_path / f"{name}.txt").read_text()
    assert hyp["f32"] == hyp["q"]  # quantizing on load and loading the quantized file agree
    assert len(hyp["deq"].splitlines()) == 20
    assert main(["quantize", str(out), "--out", str(out)]) == 2
    assert "--out: must differ" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "MODEL_DIR" in capsys.readouterr().err
