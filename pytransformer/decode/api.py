"""The decoding entry points: `translate` (encoder-decoder) and `generate` (language model),
their argument checks, batching and weight packing; the searches themselves are in `search`.

A model is driven through its step interface only (see `EncoderDecoder` and `LanguageModel`),
so this package imports no model class: the model classes import it to offer
`Transformer.translate` and `TransformerLM.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..checks import (
    check_bool,
    check_float,
    check_int,
    check_layer_index,
    check_optional_int,
    check_sequences,
)
from ..nn.layers import worth_packing
from .search import Hypothesis, Problem, beam_search, greedy_choice, run_single, sampler

__all__ = [
    "TranslationResult", "translate", "generate", "DEFAULT_MAX_BATCH_SIZE",
    "EncoderDecoder", "LanguageModel",
]


class EncoderDecoder(Protocol):
    """What `translate` needs of a model (`pytransformer.Transformer` is one)."""

    config: Any  # src_vocab_size, max_len, num_decoder_layers, bos_id, eos_id, pad_id

    def encode(self, src_ids: np.ndarray, src_lengths: np.ndarray) -> np.ndarray: ...

    def init_decoder_state(
        self, memory: np.ndarray, src_lengths: np.ndarray, max_steps: int, *,
        pack_weights: bool | None = None,
    ) -> Any: ...

    def decode_step(self, state: Any, tokens: np.ndarray, **options: Any) -> tuple: ...


class LanguageModel(Protocol):
    """What `generate` needs of a model (`pytransformer.TransformerLM` is one)."""

    config: Any  # vocab_size or tgt_vocab_size, max_len, eos_id (may be None)

    def init_state(
        self, batch_size: int, max_steps: int, *, pack_weights: bool | None = None
    ) -> Any: ...

    def decode_step(self, state: Any, tokens: np.ndarray) -> tuple: ...


@dataclass
class TranslationResult:
    """One source's n-best list, best first.

    hypotheses: token ids (no BOS, no EOS); scores: length-normalised log-probabilities (None
    unless asked); attention: per hypothesis a float32 (len(hypothesis), source_length) array of
    a decoder layer's cross-attention averaged over heads, or (num_heads, len(hypothesis),
    source_length) per head (None unless asked); row i is the attention of the step that
    produced token i.
    """

    hypotheses: list[list[int]]
    scores: list[float] | None = None
    attention: list[np.ndarray] | None = None


def _config_value(model: object, *names: str) -> object:
    cfg = getattr(model, "config", model)
    for n in names:
        value = getattr(cfg, n, None)
        if value is not None:
            return value
    raise AttributeError(f"model config has none of {names}")


# Sentences decoded together when max_batch_size is None. Every row holds self-attention caches
# for the whole max_decoding_length (base model: 6 MiB a row at 256 positions), so an unbounded
# batch of thousands of sentences would need tens of GiB; past a few dozen sentences (x beams)
# the products are already large enough to run near full speed.
DEFAULT_MAX_BATCH_SIZE = 64


def _check_common(beam_size: Any, alpha: Any, max_batch_size: Any) -> tuple[int, float, int]:
    beam_size = check_int("beam_size", beam_size, 1)
    alpha = check_float("length_penalty", alpha)
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE
    return beam_size, alpha, check_int("max_batch_size", max_batch_size, 1)


def _attention_options(model: Any, layer: Any, heads: Any) -> dict:
    """decode_step's keyword arguments for the chosen attention (none for the default, so a
    model that only offers the last layer averaged over heads still works)."""
    heads = check_bool("attention_heads", heads)
    layer = check_int("attention_layer", layer)
    if layer == -1 and not heads:
        return {}
    n = int(_config_value(model, "num_decoder_layers"))
    layer = check_layer_index("attention_layer", layer, n)
    opts = {} if layer == n - 1 else {"attention_layer": layer}
    return opts | ({"attention_heads": True} if heads else {})


def _state_sharing_packing(
    make, args: tuple, pack: bool, packed: dict | None
) -> tuple[object, dict | None]:
    """(state, packed): make(*args, pack_weights=...) builds a chunk's decoder state. When the
    chunk is worth packing, the first such chunk of a call packs the step weights and every
    later one reuses that copy."""
    state = make(*args, pack_weights=pack and packed is None)
    if pack:
        packed = state.packed_weights = packed or getattr(state, "packed_weights", None)
    return state, packed


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def translate(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    *,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    max_decoding_length: int = 256,
    min_decoding_length: int = 0,
    num_hypotheses: int = 1,
    return_scores: bool = False,
    return_attention: bool = False,
    max_batch_size: int | None = None,
    attention_layer: int = -1,
    attention_heads: bool = False,
) -> list[TranslationResult]:
    """Translates token-id sequences with an encoder-decoder model (``Transformer``).

    sources: a list of source token-id sequences (any lengths, empty ones too; padding is done
    here, no EOS is appended). beam_size=1 is greedy decoding. length_penalty is GNMT's alpha.
    Hypotheses have at most max_decoding_length tokens (capped at the model's max_len positions)
    and at least min_decoding_length before their EOS. num_hypotheses (<= beam_size) best
    hypotheses are returned per source, best first. max_batch_size bounds the sentences decoded
    together (None: DEFAULT_MAX_BATCH_SIZE = 64; sources are sorted by length, batched, and
    returned in the input order).
    return_attention returns the cross-attention of decoder layer attention_layer (negative:
    from the last), averaged over heads or, with attention_heads=True, per head.

    Raises (before any work) TypeError/ValueError naming a bad parameter, IndexError for a token
    id outside the source vocabulary, ValueError for a source longer than max_len.
    """
    beam_size, alpha, max_batch_size = _check_common(beam_size, length_penalty, max_batch_size)
    max_len = int(_config_value(model, "max_len"))
    max_dec = check_int("max_decoding_length", max_decoding_length, 1)
    min_dec = check_int("min_decoding_length", min_decoding_length, 0)
    if min_dec > max_dec:
        raise ValueError(
            f"min_decoding_length ({min_dec}) exceeds max_decoding_length ({max_dec})"
        )
    if min_dec > max_len:
        raise ValueError(f"min_decoding_length ({min_dec}) exceeds the model's max_len {max_len}")
    nhyp = check_int("num_hypotheses", num_hypotheses, 1)
    if nhyp > beam_size:
        raise ValueError(f"num_hypotheses ({nhyp}) exceeds beam_size ({beam_size})")
    want_scores = check_bool("return_scores", return_scores)
    want_attn = check_bool("return_attention", return_attention)
    attn_opts = _attention_options(model, attention_layer, attention_heads)
    src_vocab = int(_config_value(model, "src_vocab_size", "vocab_size"))
    srcs = check_sequences(sources, "sources", src_vocab, max_len, allow_empty=True)
    if not srcs:
        return []
    max_dec = min(max_dec, max_len)
    bos = int(_config_value(model, "bos_id"))
    eos = int(_config_value(model, "eos_id"))
    pad = int(_config_value(model, "pad_id"))

    order = sorted(range(len(srcs)), key=lambda i: -srcs[i].size)
    results: list[TranslationResult | None] = [None] * len(srcs)
    packed = None
    for chunk in _chunks(order, max_batch_size):
        lengths = np.array([srcs[i].size for i in chunk], dtype=np.int64)
        ids = np.full((len(chunk), max(1, int(lengths.max()))), pad, dtype=np.int64)
        for r, i in enumerate(chunk):
            ids[r, : lengths[r]] = srcs[i]
        memory = model.encode(ids, lengths)
        # Translations run about as long as their sources: the guess that decides packing.
        steps = min(max_dec, max(min_dec, int(lengths.mean()) + 8))
        state, packed = _state_sharing_packing(
            model.init_decoder_state,
            (memory, lengths, max_dec),
            worth_packing(len(chunk) * beam_size, steps),
            packed,
        )

        def step(tokens, state=state):
            if not want_attn:
                return model.decode_step(state, tokens)
            return model.decode_step(state, tokens, need_attention=True, **attn_opts)

        prob = Problem(
            step=step,
            state=state,
            prefixes=[np.array([bos], dtype=np.int64)] * len(chunk),
            min_gen=np.full(len(chunk), min_dec, dtype=np.int64),
            max_gen=np.full(len(chunk), max_dec, dtype=np.int64),
            eos=eos,
            alpha=alpha,
            src_lengths=lengths,
        )
        if beam_size == 1:
            nbest = [[h] for h in run_single(prob, greedy_choice, want_scores, want_attn)]
        else:
            nbest = beam_search(prob, beam_size, nhyp, want_attn)
        for r, i in enumerate(chunk):
            hyps = nbest[r]
            results[i] = TranslationResult(
                hypotheses=[h.tokens for h in hyps],
                scores=[h.score for h in hyps] if want_scores else None,
                attention=[h.attention for h in hyps] if want_attn else None,
            )
    return results  # type: ignore[return-value]


def generate(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    beam_size: int = 1,
    length_penalty: float = 0.6,
    max_batch_size: int | None = None,
) -> list[list[int]]:
    """Continues each prompt with a decoder-only model (``TransformerLM``).

    Returns, per prompt, the generated token ids (without the prompt and without the EOS that
    ended them, if any): at most max_new_tokens, fewer if EOS comes first or the model's max_len
    positions run out. Prompts are fed as given (add a BOS yourself if the model expects one).

    beam_size=1 samples from softmax(logits / temperature), restricted to the top_k most likely
    tokens (0: no limit) and then to the nucleus of mass top_p; temperature=0 or top_k=1 is
    greedy decoding. Sampling is reproducible: the same seed gives the same tokens, whatever
    max_batch_size (each prompt draws from its own generator, derived from seed and its index;
    None: DEFAULT_MAX_BATCH_SIZE prompts at a time).
    beam_size > 1 is beam search (length_penalty = GNMT alpha), which takes no sampling options.
    """
    beam_size, alpha, max_batch_size = _check_common(beam_size, length_penalty, max_batch_size)
    max_new = check_int("max_new_tokens", max_new_tokens, 0)
    temperature = check_float("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    top_k = check_int("top_k", top_k, 0)
    top_p = check_float("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    seed = check_optional_int("seed", seed, 0)
    if beam_size > 1 and (temperature != 1.0 or top_k != 0 or top_p != 1.0):
        raise ValueError(
            "temperature, top_k, top_p: sampling options cannot be combined with beam_size > 1"
        )
    max_len = int(_config_value(lm, "max_len"))
    vocab = int(_config_value(lm, "vocab_size", "tgt_vocab_size"))
    seqs = check_sequences(prompts, "prompts", vocab, max_len, allow_empty=False)
    if not seqs:
        return []
    try:
        eos = _config_value(lm, "eos_id")
    except AttributeError:
        eos = None
    eos = None if eos is None else int(eos)
    greedy = temperature == 0.0 or top_k == 1
    children = np.random.SeedSequence(seed).spawn(len(seqs))

    order = sorted(range(len(seqs)), key=lambda i: -seqs[i].size)
    results: list[list[int] | None] = [None] * len(seqs)
    packed = None
    for chunk in _chunks(order, max_batch_size):
        prefixes = [seqs[i] for i in chunk]
        # Position p + g - 2 is the last one fed for g generated tokens: it must be < max_len.
        max_gen = np.array([min(max_new, max_len - p.size + 1) for p in prefixes], dtype=np.int64)
        prob = Problem(
            step=None,  # type: ignore[arg-type]
            state=None,
            prefixes=prefixes,
            min_gen=np.zeros(len(chunk), dtype=np.int64),
            max_gen=max_gen,
            eos=eos,
            alpha=alpha,
        )
        steps = prob.total_steps()
        if steps <= 0:
            for i in chunk:
                results[i] = []
            continue
        state, packed = _state_sharing_packing(
            lm.init_state,
            (len(chunk), steps),
            worth_packing(len(chunk) * beam_size, steps),
            packed,
        )
        prob.state = state
        prob.step = lambda tokens, state=state: lm.decode_step(state, tokens)
        if beam_size > 1:
            hyps = [h[0] if h else Hypothesis(0.0, 0.0, [], None) for h in
                    beam_search(prob, beam_size, 1, False)]
        else:
            if greedy:
                choose = greedy_choice
            else:
                rngs = [np.random.default_rng(children[i]) for i in chunk]
                choose = sampler(temperature, top_k, top_p, rngs)
            hyps = run_single(prob, choose, False, False)
        for r, i in enumerate(chunk):
            results[i] = hyps[r].tokens
    return results  # type: ignore[return-value]
