"""The searches against CTranslate2's own: the same random-weight Transformer exported with
export_ctranslate2 and decoded by ctranslate2.Translator.translate_batch and by our translate,
option by option (greedy, beam 4, length penalties, n-best, minimum length, target prefix,
repetition rules, suppression, end tokens, alternatives): the same tokens on every sentence and
scores within 1e-4.

Scores: within 1e-4, except with return_alternatives, where CTranslate2 feeds the target prefix
to its decoder in one call (a full-sequence forward, not the step-by-step one): a sharp model's
log-probabilities then differ by ~1e-5 relative, so those scores get 1e-4 relative on top.

Ties: the weights are scaled up (x3) so that the distributions are sharp; for every sentence
and option below the first and second candidates that decide a hypothesis are far apart next to
float32 rounding (~1e-6 here), so no sentence is skipped. A change of model, seed or options
that brings a near-tie would show as a token difference whose score difference is ~1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2")

import pytransformer as pt  # noqa: E402
from pytransformer.interop import export_ctranslate2  # noqa: E402
from pytransformer.text.vocab import VocabTokenizer  # noqa: E402
from pytransformer.translator import Translator  # noqa: E402

V = 24
TOKS = ["<blank>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, V)]
EOS, UNK = 2, 3


def _model(eos_bias: float) -> pt.Transformer:
    cfg = pt.TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=16, num_heads=2,
                               d_ff=32, num_encoder_layers=1, num_decoder_layers=2,
                               activation="relu", positional_encoding="halves",
                               tie_embeddings="all", norm_first=True, pad_id=0, bos_id=1,
                               eos_id=EOS, max_len=64)
    model = pt.Transformer(cfg, seed=11)
    for p in model.parameters().values():
        p *= 3.0  # sharp distributions that depend on the source
    if eos_bias:
        sd = model.state_dict()
        sd["output.bias"] = sd["output.bias"].copy()
        sd["output.bias"][EOS] += eos_bias  # hypotheses end at many different lengths
        model.load_state_dict(sd)
    return model.eval()


@pytest.fixture(scope="module", params=[0.0, 8.0], ids=["plain", "eos-biased"])
def pair(request, tmp_path_factory):
    """(our model, CTranslate2 translator, EOS bias) holding the same weights."""
    root = tmp_path_factory.mktemp("ct2")
    model = _model(request.param)
    tok = VocabTokenizer(TOKS, pad="<blank>", bos="<s>", eos="</s>", unk="<unk>", skip=["</s>"])
    Translator(model, tok, tok).save(root / "ours")
    out = export_ctranslate2(root / "ours", root / "ct2")
    return model, ctranslate2.Translator(str(out), device="cpu", compute_type="float32"), \
        request.param


def _sources(n=12, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, V, size=int(rng.integers(1, 9))).tolist() for _ in range(n)]


SOURCES = _sources()


def _names(ids):
    return [TOKS[i] for i in ids]


def _compare(pair, **kw):
    model, ct, _ = pair
    kw.setdefault("max_decoding_length", 20)
    kw.setdefault("min_decoding_length", 0)  # CTranslate2's default is 1, ours 0
    prefix = kw.pop("target_prefix", None)
    ct_kw = dict(kw)
    for key in ("suppress_sequences",):
        if key in ct_kw:
            ct_kw[key] = [_names(s) for s in ct_kw[key]]
    ct_kw.pop("unk_id", None)
    ref = ct.translate_batch([_names(s) for s in SOURCES],
                             None if prefix is None else [_names(p) for p in prefix],
                             return_scores=True, **ct_kw)
    ours = model.translate(SOURCES, target_prefix=prefix, return_scores=True, **kw)
    lengths = set()
    for src, r, o in zip(SOURCES, ref, ours, strict=True):
        want = [[TOKS.index(t) for t in h] for h in r.hypotheses]
        assert o.hypotheses == want, (src, kw)
        rtol = 1e-4 if kw.get("return_alternatives") else 0.0
        np.testing.assert_allclose(o.scores, r.scores, rtol=rtol, atol=1e-4)
        lengths.update(len(h) for h in want)
    return lengths


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("beam_size,num_hypotheses", [(1, 1), (4, 1), (4, 4)])
def test_free_search(pair, beam_size, num_hypotheses, length_penalty):
    lengths = _compare(pair, beam_size=beam_size, num_hypotheses=num_hypotheses,
                       length_penalty=length_penalty)
    if pair[2]:  # hypotheses of many lengths: EOS and the beams' refill exercised
        assert len(lengths) >= 3


@pytest.mark.parametrize("beam_size", [1, 4])
@pytest.mark.parametrize(
    "options",
    [
        dict(min_decoding_length=6),
        dict(target_prefix=[s[:2] for s in SOURCES]),
        dict(target_prefix=[s[:1] for s in SOURCES], min_decoding_length=3),
        dict(target_prefix=[s[: i % 3] for i, s in enumerate(SOURCES)], num_hypotheses=1),
        dict(repetition_penalty=1.8),
        dict(repetition_penalty=0.6),
        dict(no_repeat_ngram_size=1),
        dict(no_repeat_ngram_size=2),
        dict(suppress_sequences=[[5], [7, 8], [9, 10, 11]]),
        dict(disable_unk=True, unk_id=UNK),
        dict(end_token=[EOS, 6], return_end_token=True),
        dict(return_alternatives=True, num_hypotheses=3),
        dict(return_alternatives=True, num_hypotheses=4, target_prefix=[s[:1] for s in SOURCES],
             min_alternative_expansion_prob=0.05),
    ],
    ids=["min-length", "prefix", "prefix-min", "prefix-some", "repetition", "repetition<1",
         "ngram1", "ngram2", "suppress", "unk", "end-tokens", "alternatives",
         "alternatives-prefix"],
)
def test_options(pair, beam_size, options):
    _compare(pair, beam_size=beam_size, **options)


@pytest.mark.parametrize("beam_size,patience,num_hypotheses", [(2, 2.0, 3), (3, 1.5, 4)])
def test_patience(pair, beam_size, patience, num_hypotheses):
    _compare(pair, beam_size=beam_size, patience=patience, num_hypotheses=num_hypotheses,
             length_penalty=0.6)
