"""ops.PackedWeight (weights packed once for decoding) against float64 numpy and the unpacked
product, and the decoders' pack_weights switch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_cases import small_config
from test_gemm import K_SIZES, SIZES, assert_close, rand, reference

import pytransformer as pt
from pytransformer import Transformer, TransformerLM
from pytransformer.ops import PackedWeight, matmul

# Past MC = 144 the packed path takes A in several row blocks.
M_SIZES = SIZES + [150, 290]


@pytest.fixture
def isa(gemm_isa):
    """Every test here runs under each of the float GEMM's kernel sets (avx512 included)."""
    return gemm_isa


def a_view(rng, M, K, layout, batch=None):
    """op(a) of shape ([batch,] M, K) stored contiguously, transposed or with a column stride."""
    pre = () if batch is None else (batch,)
    if layout == "transposed":
        return np.swapaxes(rand(rng, pre + (K, M)), -1, -2)
    if layout == "strided":
        return rand(rng, pre + (M, 2 * K))[..., ::2]
    return rand(rng, pre + (M, K))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.sampled_from(M_SIZES),
    N=st.sampled_from(SIZES),
    K=st.sampled_from(K_SIZES),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    batch=st.sampled_from([None, 3]),
    use_bias=st.booleans(),
    activation=st.sampled_from([None, "relu", "gelu"]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64(isa, M, N, K, layout, batch, use_bias, activation, seed):
    rng = np.random.default_rng(seed)
    a = a_view(rng, M, K, layout, batch)
    w = rand(rng, (N, K))
    bias = rand(rng, (N,)) if use_bias else None
    c = matmul(a, PackedWeight(w), bias=bias, activation=activation)
    r, tol = reference(a, w, trans_b=True, bias=bias, activation=activation)
    assert_close(c, r, tol)


@pytest.mark.parametrize("M", [17, 32, 33, 100, 150])
@pytest.mark.parametrize("N,K", [(16, 256), (50, 257), (300, 520)])
def test_same_bits_as_unpacked_above_16_rows(isa, rng, M, N, K):
    a, w, bias = rand(rng, (M, K)), rand(rng, (N, K)), rand(rng, (N,))
    want = matmul(a, w, trans_b=True, bias=bias, activation="relu")
    got = matmul(a, PackedWeight(w), bias=bias, activation="relu")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("M,N,K", [(7, 300, 200), (32, 1000, 300), (150, 100, 64)])
def test_bit_identical_across_thread_counts(isa, threads, rng, M, N, K):
    a, pw = rand(rng, (M, K)), PackedWeight(rand(rng, (N, K)))
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(matmul(a, pw))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize(
    "view", ["transposed", "row_slice", "negative_rows", "fortran"], ids=str
)
def test_packs_any_weight_layout(rng, view):
    base = rand(rng, (40, 70))
    w = {
        "transposed": rand(rng, (70, 40)).T,
        "row_slice": base[::2],
        "negative_rows": base[::-1],
        "fortran": np.asfortranarray(base),
    }[view]
    a = rand(rng, (9, w.shape[1]))
    r, tol = reference(a, w, trans_b=True)
    assert_close(matmul(a, PackedWeight(w)), r, tol)


def test_snapshot_does_not_follow_the_weight(rng):
    w = rand(rng, (20, 30))
    pw = PackedWeight(w)
    a = rand(rng, (8, 30))
    before = matmul(a, pw)
    w *= 2.0
    np.testing.assert_array_equal(matmul(a, pw), before)
    assert pw.shape == (20, 30) and "out_features=20" in repr(pw)


def test_out_written_in_place(rng):
    a, w = rand(rng, (2, 5, 33)), rand(rng, (21, 33))
    out = np.full((2, 5, 21), np.nan, np.float32)
    assert matmul(a, PackedWeight(w), out=out) is out
    r, tol = reference(a, w, trans_b=True)
    assert_close(out, r, tol)


def test_empty_rows(rng):
    pw = PackedWeight(rand(rng, (5, 8)))
    assert matmul(np.zeros((0, 8), np.float32), pw).shape == (0, 5)
    assert matmul(np.zeros((2, 0, 8), np.float32), pw).shape == (2, 0, 5)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: PackedWeight(np.ones((4, 4))), TypeError, "weight"),
        (lambda: PackedWeight(np.ones(4, np.float32)), ValueError, "weight"),
        (lambda: PackedWeight(np.ones((0, 4), np.float32)), ValueError, "weight"),
        (lambda: PackedWeight([[1.0]]), TypeError, "weight"),
        (lambda: matmul(np.ones((3, 5), np.float32), _pw(4, 6)), ValueError, "a: inner"),
        (lambda: matmul(np.ones((3, 6), np.float64), _pw(4, 6)), TypeError, "a"),
        (lambda: matmul(np.ones(6, np.float32), _pw(4, 6)), ValueError, "a"),
        (lambda: matmul(np.ones((3, 6), np.float32), _pw(4, 6), trans_b=True), ValueError, "b:"),
        (lambda: matmul(np.ones((6, 3), np.float32), _pw(4, 6), trans_a=True), ValueError, "b:"),
        (
            lambda: matmul(np.ones((3, 6), np.float32), _pw(4, 6), bias=np.ones(5, np.float32)),
            ValueError,
            "bias",
        ),
        (
            lambda: matmul(np.ones((3, 6), np.float32), _pw(4, 6), out=np.ones((3, 5), np.float32)),
            ValueError,
            "out",
        ),
        (
            lambda: matmul(np.ones((3, 6), np.float32), _pw(4, 6), activation="tanh"),
            ValueError,
            "activation",
        ),
        (lambda: pt._C.matmul_prepacked(np.ones((3, 6), np.float32), _pw(40, 6).data, 4),
         ValueError, "packed"),
    ],
)
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def _pw(n: int, k: int) -> PackedWeight:
    return PackedWeight(np.ones((n, k), np.float32))


# ---------------------------------------------------------------------------------------------
# decoders: packed and unpacked step weights decode the same
# ---------------------------------------------------------------------------------------------
def _config(**overrides):
    return small_config(
        40, 32, layers=2, num_heads=4, tgt_vocab_size=37, dropout=0.0, max_len=64, **overrides
    )


def _decode(model, sources, pack, steps=12):
    lengths = np.array([len(s) for s in sources])
    ids = np.zeros((len(sources), lengths.max()), np.int64)
    for i, s in enumerate(sources):
        ids[i, : len(s)] = s
    state = model.init_decoder_state(model.encode(ids, lengths), lengths, steps, pack_weights=pack)
    tokens = np.full(len(sources), model.config.bos_id)
    logits = []
    for _ in range(steps):
        lg, _ = model.decode_step(state, tokens)
        logits.append(lg)
        tokens = lg.argmax(-1)
    return state, np.stack(logits)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_packed_matches_unpacked(rng, norm_first):
    model = Transformer(_config(norm_first=norm_first), seed=3).eval()
    sources = [rng.integers(3, 40, size=n).tolist() for n in (5, 9, 2, 7, 11, 3, 6, 8)]
    s_packed, packed = _decode(model, sources, True)
    s_plain, plain = _decode(model, sources, False)
    assert s_packed.packed_weights is not None and s_plain.packed_weights is None
    np.testing.assert_allclose(packed, plain, rtol=1e-5, atol=1e-5)
    assert (packed.argmax(-1) == plain.argmax(-1)).all()


def test_translate_and_generate_packed_match_unpacked(rng, monkeypatch):
    import pytransformer.decode.api as decoding

    model = Transformer(_config(), seed=5).eval()
    lm = TransformerLM(_config(), seed=6).eval()
    sources = [rng.integers(3, 40, size=int(n)).tolist() for n in rng.integers(1, 20, size=24)]
    prompts = [rng.integers(3, 37, size=int(n)).tolist() for n in rng.integers(1, 10, size=24)]

    def run():
        t = model.translate(sources, beam_size=2, min_decoding_length=10, return_scores=True,
                            max_decoding_length=30)
        g = lm.generate(prompts, max_new_tokens=20, temperature=0.0)
        return t, g

    assert decoding.worth_packing(48, 20)  # these calls do pack by default
    t_packed, g_packed = run()
    monkeypatch.setattr(decoding, "worth_packing", lambda rows, steps: False)
    t_plain, g_plain = run()
    assert [r.hypotheses for r in t_packed] == [r.hypotheses for r in t_plain]
    np.testing.assert_allclose([r.scores for r in t_packed], [r.scores for r in t_plain],
                               atol=1e-4)
    assert g_packed == g_plain


def test_pack_weights_argument_is_checked():
    model = Transformer(_config(), seed=0).eval()
    memory = model.encode(np.ones((1, 3), np.int64), np.array([3]))
    with pytest.raises(TypeError, match="pack_weights"):
        model.init_decoder_state(memory, np.array([3]), 4, pack_weights="yes")
    lm = TransformerLM(_config(), seed=0)
    with pytest.raises(TypeError, match="pack_weights"):
        lm.init_state(2, 4, pack_weights=1)
    # A single short row is not worth packing; a large batch is.
    assert lm.init_state(1, 4).packed_weights is None
    assert lm.init_state(32, 64).packed_weights is not None


def test_state_keeps_the_weights_it_was_made_with(rng):
    """The packed copies are really what a packed state's steps read: changing a weight after
    the state was made changes only an unpacked state's output."""
    model = Transformer(_config(), seed=4).eval()
    sources = [rng.integers(3, 40, size=6).tolist() for _ in range(8)]
    _, before = _decode(model, sources, True, steps=3)
    lengths = np.full(8, 6)
    ids = np.array(sources)
    packed = model.init_decoder_state(model.encode(ids, lengths), lengths, 3, pack_weights=True)
    plain = model.init_decoder_state(model.encode(ids, lengths), lengths, 3, pack_weights=False)
    model.parameters()["decoder.layers.0.ffn.fc2.weight"][:] = 0.0
    tokens = np.full(8, model.config.bos_id)
    np.testing.assert_array_equal(model.decode_step(packed, tokens)[0], before[0])
    assert not np.allclose(model.decode_step(plain, tokens)[0], before[0])


def test_one_packing_serves_every_chunk(rng, monkeypatch):
    model = Transformer(_config(), seed=7).eval()
    sources = [rng.integers(3, 40, size=12).tolist() for _ in range(40)]
    calls = []
    real = PackedWeight.__init__

    def counting(self, weight):
        calls.append(weight.shape)
        real(self, weight)

    monkeypatch.setattr(PackedWeight, "__init__", counting)
    model.translate(sources, beam_size=2, max_decoding_length=16, max_batch_size=10)
    assert len(calls) == len(model.decoder.step_linears()) + 1  # once, not once per chunk
