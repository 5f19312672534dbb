"""The decoding entry points: `translate` (encoder-decoder, with CTranslate2's translate_batch
options) and `generate` (language model), their argument checks, batching and weight packing;
the searches themselves are in `search`, the logit edits in `logits`.

A model is driven through its step interface only (see `EncoderDecoder` and `LanguageModel`),
so this package imports no model class: the model classes import it to offer
`Transformer.translate` and `TransformerLM.generate`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..checks import (
    check_bool,
    check_float,
    check_ids,
    check_int,
    check_layer_index,
    check_optional_int,
    check_sequences,
    check_token_id,
)
from ..nn.layers import worth_packing
from .logits import LogitsProcessors
from .search import (
    LENGTH_PENALTY_KINDS,
    BeamSampling,
    Hypothesis,
    Problem,
    beam_search,
    expand,
    greedy_choice,
    hypothesis_attention,
    run_single,
    sampler,
)

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

    hypotheses: token ids (no BOS; the target prefix first; no end token unless
    return_end_token); scores: summed log-probabilities / lp(length), CTranslate2's (see
    `search`; None unless asked); attention: per hypothesis a float32 (len(hypothesis),
    source_length) array of a decoder layer's cross-attention averaged over heads, or
    (num_heads, len(hypothesis), source_length) per head (None unless asked); row i is the
    attention of the step that produced token i.
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
    make, args: tuple, pack: bool, packed: dict | None, extra: dict | None = None
) -> tuple[object, dict | None]:
    """(state, packed): make(*args, pack_weights=..., **extra) builds a chunk's decoder state.
    When the chunk is worth packing, the first such chunk of a call packs the step weights and
    every later one reuses that copy."""
    state = make(*args, pack_weights=pack and packed is None, **(extra or {}))
    if pack:
        packed = state.packed_weights = packed or getattr(state, "packed_weights", None)
    return state, packed


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def translate(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    target_prefix: Sequence[Sequence[int] | None] | None = None,
    *,
    beam_size: int = 4,
    patience: float = 1.0,
    num_hypotheses: int = 1,
    length_penalty: float = 1.0,
    length_penalty_kind: str = "power",
    coverage_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    disable_unk: bool = False,
    unk_id: int | None = None,
    suppress_sequences: Sequence[Sequence[int]] | None = None,
    end_token: int | Sequence[int] | None = None,
    return_end_token: bool = False,
    max_input_length: int | None = None,
    max_decoding_length: int = 256,
    min_decoding_length: int = 0,
    use_vmap: bool = False,
    vocab_subset_fn: Callable[[list[np.ndarray]], np.ndarray | None] | None = None,
    sampling_topk: int = 1,
    sampling_topp: float = 1.0,
    sampling_temperature: float = 1.0,
    seed: int | None = None,
    return_scores: bool = False,
    return_attention: bool = False,
    return_alternatives: bool = False,
    min_alternative_expansion_prob: float = 0.0,
    max_batch_size: int | None = None,
    batch_type: str = "examples",
    attention_layer: int = -1,
    attention_heads: bool = False,
    sentence_ids: Sequence[int] | None = None,
) -> list[TranslationResult]:
    """Translates token-id sequences with an encoder-decoder model (``Transformer``), with
    CTranslate2's ``translate_batch`` options and semantics (see `search` for the rules).

    sources: source token-id sequences (any lengths; padding is done here, no EOS is appended);
    an empty source translates to its target prefix (or nothing) with score 0, as CTranslate2.
    target_prefix: per source None or token ids the hypotheses start with (forced, returned, and
    counted by the length limits; their log-probabilities are not in the score).
    beam_size=1 is greedy decoding (or sampling); patience: a beam search (with a length or
    coverage penalty) stops once round(beam_size * patience) hypotheses have finished;
    num_hypotheses best hypotheses are returned per source, best first (at most
    round(beam_size * patience), except with return_alternatives or beam_size=1 sampling).
    Scores: summed log-probabilities / L ** length_penalty, L the hypothesis length with its
    EOS and prefix (length_penalty_kind="gnmt": / ((5 + L) / 6) ** length_penalty), plus
    coverage_penalty * sum of log(min(attention mass of a source position, 1)).
    repetition_penalty (> 0): logits of tokens already in the hypothesis are divided by it if
    positive, multiplied if negative; no_repeat_ngram_size: no n-gram twice; disable_unk: never
    the unknown token (config.unk_id, else unk_id); suppress_sequences: token-id sequences never
    produced (a single token: never emitted); config.suppress_ids are never emitted either.
    end_token: an id or ids ending a hypothesis (default config.eos_id); return_end_token keeps
    it in the hypothesis. max_input_length: sources are cut to it (None or 0: the model's
    max_len, which also bounds a positive value), with a warning. Hypotheses have at most
    max_decoding_length tokens (capped at the model's max_len positions) and end tokens are
    masked while shorter than min_decoding_length.
    use_vmap with vocab_subset_fn: vocab_subset_fn(the chunk's source id arrays) gives the
    target ids the chunk may produce (None: all), passed to init_decoder_state(vocab_subset=).
    sampling_topk (1: greedy; 0: the whole vocabulary), sampling_topp, sampling_temperature:
    random sampling (with beam_size > 1: 2 * beam_size candidates drawn per step, as
    CTranslate2); seed: each source (and hypothesis) draws from its own generator derived from
    seed and its index, so the tokens do not depend on the batching. sentence_ids: the numbers
    that stand for those indices (one distinct int >= 0 per source; default 0, 1, ...): a caller
    that splits one input into several calls (`decode.translate_iterable`,
    `decode.translate_batches`) passes each part's positions in the whole input, so the parts
    draw what one call would.
    return_alternatives: num_hypotheses alternatives at the first position after the target
    prefix (the most likely tokens there whose probability is >= min_alternative_expansion_prob,
    in that order), each continued by the search; an alternative's score is its token's
    log-probability plus the continuation's normalised score.
    max_batch_size bounds the sentences (batch_type="examples") or source tokens with padding
    ("tokens") decoded together (None: DEFAULT_MAX_BATCH_SIZE = 64 sentences, whatever the
    batch_type; sources are sorted by length, batched, and returned in the input order).
    return_attention returns the cross-attention of decoder layer attention_layer (negative:
    from the last), averaged over heads or, with attention_heads=True, per head; one row per
    returned token, one column per source token (zeros past a truncated source).

    Raises (before any work) TypeError/ValueError naming a bad parameter, IndexError for a token
    id outside its vocabulary.
    """
    o = _check_translate_options(model, locals())
    max_len = int(_config_value(model, "max_len"))
    src_vocab = int(_config_value(model, "src_vocab_size", "vocab_size"))
    srcs = check_sequences(sources, "sources", src_vocab, sys.maxsize, allow_empty=True)
    o.keys = check_sentence_ids(sentence_ids, len(srcs))
    prefixes = _check_prefixes(target_prefix, len(srcs), o.tgt_vocab)
    if not srcs:
        return []
    orig_lens = [s.size for s in srcs]
    srcs = cut_sources(srcs, o.max_input, max_len)
    prefixes = [p[: o.max_dec] for p in prefixes]
    results: list[TranslationResult | None] = [None] * len(srcs)
    todo = []
    for i, (s, p) in enumerate(zip(srcs, prefixes, strict=True)):
        if s.size == 0 or p.size == o.max_dec:  # nothing to decode (CTranslate2's shortcut)
            results[i] = _fixed_result(o, p, orig_lens[i])
        else:
            todo.append(i)
    o.any_prefix = any(prefixes[i].size for i in todo)
    lengths = [srcs[i].size for i in todo]
    packed: dict = {}
    for batch in plan_batches(lengths, o.max_batch, o.tokens_batch):
        chunk = [todo[j] for j in batch]
        _translate_chunk(model, o, chunk, srcs, prefixes, orig_lens, results, packed)
    return results  # type: ignore[return-value]


@dataclass
class _Options:
    """translate()'s checked options."""

    beam: int
    patience: float
    nhyp: int
    alpha: float
    kind: str
    coverage: float
    processors: LogitsProcessors | None
    end_ids: np.ndarray
    keep_end: bool
    max_input: int
    max_dec: int
    min_dec: int
    subset_fn: Callable | None
    topk: int
    topp: float
    temperature: float
    seed: int | None
    want_scores: bool
    want_attn: bool
    alternatives: bool
    min_alt_prob: float
    max_batch: int
    tokens_batch: bool
    attn_opts: dict
    bos: int
    pad: int
    tgt_vocab: int
    heads: int  # attention heads returned per hypothesis (0: averaged)
    any_prefix: bool = False  # some source of the call has a target prefix
    keys: list[int] = field(default_factory=list)  # each source's sampling key (sentence_ids)

    @property
    def sampling(self) -> bool:
        return self.topk != 1 and self.temperature != 0.0


def batch_settings(batch_type: str, max_batch_size: Any) -> tuple[int, bool]:
    """(max_batch, by_tokens) from batch_type (checked before) and max_batch_size: None is
    DEFAULT_MAX_BATCH_SIZE sentences, whatever the batch_type."""
    if max_batch_size is None:
        return DEFAULT_MAX_BATCH_SIZE, False
    return check_int("max_batch_size", max_batch_size, 1), batch_type == "tokens"


def check_decoding_lengths(max_dec: Any, min_dec: Any, max_len: int) -> tuple[int, int]:
    """(max_decoding_length, min_decoding_length), checked against each other and max_len."""
    max_dec = check_int("max_decoding_length", max_dec, 1)
    min_dec = check_int("min_decoding_length", min_dec, 0)
    if min_dec > max_dec:
        raise ValueError(
            f"min_decoding_length ({min_dec}) exceeds max_decoding_length ({max_dec})"
        )
    if min_dec > max_len:
        raise ValueError(f"min_decoding_length ({min_dec}) exceeds the model's max_len {max_len}")
    return max_dec, min_dec


def check_sampling(topk: Any, topp: Any, temperature: Any, seed: Any) -> tuple:
    """(sampling_topk, sampling_topp, sampling_temperature, seed), checked."""
    return (check_int("sampling_topk", topk, 0),
            check_float("sampling_topp", topp, maximum=1.0, positive=True),
            check_float("sampling_temperature", temperature, 0.0),
            check_optional_int("seed", seed, 0))


def _check_translate_options(model: Any, a: dict) -> _Options:
    beam = check_int("beam_size", a["beam_size"], 1)
    patience = check_float("patience", a["patience"], positive=True)
    nhyp = check_int("num_hypotheses", a["num_hypotheses"], 1)
    alpha = check_float("length_penalty", a["length_penalty"])
    kind = a["length_penalty_kind"]
    if kind not in LENGTH_PENALTY_KINDS:
        raise ValueError(
            f"length_penalty_kind: must be one of {LENGTH_PENALTY_KINDS}, got {kind!r}"
        )
    coverage = check_float("coverage_penalty", a["coverage_penalty"])
    rep = check_float("repetition_penalty", a["repetition_penalty"], positive=True)
    ngram = check_int("no_repeat_ngram_size", a["no_repeat_ngram_size"], 0)
    max_len = int(_config_value(model, "max_len"))
    max_dec, min_dec = check_decoding_lengths(
        a["max_decoding_length"], a["min_decoding_length"], max_len)
    max_input = check_optional_int("max_input_length", a["max_input_length"], 0) or 0
    topk, topp, temperature, seed = check_sampling(
        a["sampling_topk"], a["sampling_topp"], a["sampling_temperature"], a["seed"])
    alternatives = check_bool("return_alternatives", a["return_alternatives"])
    min_alt = check_float("min_alternative_expansion_prob", a["min_alternative_expansion_prob"],
                          0.0, maximum=1.0)
    sampling = topk != 1 and temperature != 0.0
    max_finished = int(np.floor(beam * patience + 0.5))
    if nhyp > max_finished and not alternatives and not (beam == 1 and sampling):
        raise ValueError(
            f"num_hypotheses ({nhyp}) exceeds round(beam_size * patience) ({max_finished})"
        )
    batch_type = a["batch_type"]
    if batch_type not in ("examples", "tokens"):
        raise ValueError(f"batch_type: must be 'examples' or 'tokens', got {batch_type!r}")
    max_batch, tokens_batch = batch_settings(batch_type, a["max_batch_size"])
    use_vmap = check_bool("use_vmap", a["use_vmap"])
    fn = a["vocab_subset_fn"]
    if fn is not None and not callable(fn):
        raise TypeError(f"vocab_subset_fn: expected a callable, got {type(fn).__name__}")
    tgt_vocab = int(_config_value(model, "tgt_vocab_size", "vocab_size"))
    eos = int(_config_value(model, "eos_id"))
    end_ids = check_end_tokens(a["end_token"], eos, tgt_vocab)
    always, seqs = _check_suppress(a["suppress_sequences"], tgt_vocab)
    cfg = getattr(model, "config", model)
    always += [int(t) for t in getattr(cfg, "suppress_ids", ()) or ()]
    if check_bool("disable_unk", a["disable_unk"]):
        unk = getattr(cfg, "unk_id", None)
        if unk is None:
            unk = a["unk_id"]
        if unk is None:
            raise ValueError("disable_unk: the model config has no unk_id; pass unk_id")
        always.append(check_int("unk_id", unk, 0, tgt_vocab - 1))
    elif a["unk_id"] is not None:
        check_int("unk_id", a["unk_id"], 0, tgt_vocab - 1)
    processors = None
    if always or seqs or rep != 1.0 or ngram:
        processors = LogitsProcessors(np.unique(np.array(always, dtype=np.int64)), seqs, rep,
                                      ngram)
    return _Options(
        beam=beam, patience=patience, nhyp=nhyp, alpha=alpha, kind=kind, coverage=coverage,
        processors=processors, end_ids=end_ids,
        keep_end=check_bool("return_end_token", a["return_end_token"]),
        max_input=max_input, max_dec=min(max_dec, max_len), min_dec=min_dec,
        subset_fn=fn if use_vmap else None, topk=topk, topp=topp, temperature=temperature,
        seed=seed, want_scores=check_bool("return_scores", a["return_scores"]),
        want_attn=check_bool("return_attention", a["return_attention"]),
        alternatives=alternatives, min_alt_prob=min_alt, max_batch=max_batch,
        tokens_batch=tokens_batch,
        attn_opts=_attention_options(model, a["attention_layer"], a["attention_heads"]),
        bos=int(_config_value(model, "bos_id")), pad=int(_config_value(model, "pad_id")),
        tgt_vocab=tgt_vocab,
        heads=int(_config_value(model, "num_heads")) if a["attention_heads"] else 0,
    )


def check_end_tokens(value: Any, eos: int, vocab: int) -> np.ndarray:
    """The ids that end a hypothesis: EOS when value is None, else one id or a non-empty list of
    them. Ids outside the vocabulary raise IndexError (the rule of ``checks``)."""
    if value is None:
        return np.array([eos], dtype=np.int64)
    single = not isinstance(value, (list, tuple, np.ndarray))
    values = [value] if single else list(value)
    if not values:
        raise ValueError("end_token: expected a token id or a non-empty list of them")
    ids = [check_token_id("end_token" if single else f"end_token[{i}]", v, vocab)
           for i, v in enumerate(values)]  # fmt: skip
    return np.unique(np.array(ids, dtype=np.int64))


def _check_suppress(value: Any, vocab: int) -> tuple[list[int], list[np.ndarray]]:
    """(single tokens, sequences of 2+ tokens); empty sequences are ignored (CTranslate2)."""
    if value is None:
        return [], []
    seqs = check_sequences(value, "suppress_sequences", vocab, sys.maxsize, allow_empty=True)
    return [int(s[0]) for s in seqs if s.size == 1], [s for s in seqs if s.size > 1]


def _check_prefixes(value: Any, n: int, vocab: int) -> list[np.ndarray]:
    if value is None:
        return [np.zeros(0, dtype=np.int64)] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"target_prefix: expected a list, got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"target_prefix: {len(value)} prefixes for {n} sources")
    given = [(i, p) for i, p in enumerate(value) if p is not None]
    arrays = check_sequences([p for _, p in given], "target_prefix", vocab, sys.maxsize,
                             allow_empty=True)
    out = [np.zeros(0, dtype=np.int64)] * n
    for (i, _), arr in zip(given, arrays, strict=True):
        out[i] = arr
    return out


def _fixed_result(o: _Options, prefix: np.ndarray, src_len: int) -> TranslationResult:
    """CTranslate2's answer without decoding: the prefix itself, score 0."""
    hyp = prefix.tolist()
    att = np.zeros(((o.heads,) if o.heads else ()) + (len(hyp), src_len), dtype=np.float32)
    return TranslationResult(
        hypotheses=[list(hyp) for _ in range(o.nhyp)],
        scores=[0.0] * o.nhyp if o.want_scores else None,
        attention=[att.copy() for _ in range(o.nhyp)] if o.want_attn else None,
    )


def plan_batches(lengths: Sequence[int], max_batch: int, by_tokens: bool) -> list[list[int]]:
    """The batches `translate` decodes, as lists of indices into `lengths` (the source lengths;
    only nonzero ones: empty sources are answered without decoding): sorted longest first
    (ties in input order), then max_batch sentences a batch, or with by_tokens as many as keep
    sentences x longest length within max_batch."""
    order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i])
    if not by_tokens:
        return _chunks(order, max_batch)
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        n = lengths[i]
        if cur and (len(cur) + 1) * max(width, n, 1) > max_batch:
            out.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, n, 1)
    if cur:
        out.append(cur)
    return out


def _rng(root: np.random.SeedSequence, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(root.entropy, spawn_key=key))


def _translate_chunk(model, o: _Options, chunk, srcs, prefixes, orig_lens, results, packed):
    lengths = np.array([srcs[i].size for i in chunk], dtype=np.int64)
    ids = np.full((len(chunk), max(1, int(lengths.max()))), o.pad, dtype=np.int64)
    for r, i in enumerate(chunk):
        ids[r, : lengths[r]] = srcs[i]
    memory = model.encode(ids, lengths)
    subset = None
    if o.subset_fn is not None:
        subset = o.subset_fn([srcs[i] for i in chunk])
        if subset is not None:
            subset = check_ids("vocab_subset_fn()", np.asarray(subset), o.tgt_vocab, 1)
    need_attn = o.want_attn or o.coverage != 0.0
    root = np.random.SeedSequence(o.seed)

    def problem(rows: np.ndarray, pre: list[np.ndarray], steps: int, **kw) -> Problem:
        """A Problem over chunk rows `rows` (repeats allowed) fed `pre` first."""
        # Translations run about as long as their sources: the guess that decides packing.
        guess = min(steps, max(o.min_dec, int(lengths[rows].mean()) + 8))
        width = rows.size * kw.pop("beam", o.beam)
        extra = {} if subset is None else {"vocab_subset": subset}
        same = rows.size == len(chunk) and (rows == np.arange(rows.size)).all()
        mem = memory if same else memory[rows]  # (a model's memory need not be an array)
        state = _shared_state(model, mem, lengths[rows], steps, width, guess, packed, extra)

        def step(tokens, state=state):
            if not need_attn:
                return model.decode_step(state, tokens)
            return model.decode_step(state, tokens, need_attention=True, **o.attn_opts)

        base = dict(
            step=step, state=state, prefixes=pre,
            min_gen=np.full(len(pre), o.min_dec, dtype=np.int64),
            max_gen=np.full(len(pre), o.max_dec, dtype=np.int64),
            end_ids=o.end_ids, alpha=o.alpha, kind=o.kind, keep_prefix=True,
            keep_end=o.keep_end, src_lengths=lengths[rows], processors=o.processors,
            coverage_penalty=o.coverage,
        )
        return Problem(**(base | kw))

    def search(prob: Problem, keys: list[tuple[int, ...]], nhyp: int) -> list[list[Hypothesis]]:
        rngs = [_rng(root, *key) for key in keys] if o.sampling else []
        if o.beam > 1:
            samp = BeamSampling(o.topk, o.topp, o.temperature, rngs) if o.sampling else None
            return beam_search(prob, o.beam, nhyp, need_attn, o.patience, samp)
        choose = (sampler(o.temperature, o.topk, o.topp, rngs) if o.sampling
                  else greedy_choice)
        hyps = run_single(prob, choose, o.want_scores or nhyp > 1 or o.coverage != 0.0,
                          need_attn)
        return [[h] for h in hyps]

    rows = np.arange(len(chunk))
    pre = [np.concatenate([[o.bos], prefixes[i]]).astype(np.int64) for i in chunk]
    if o.alternatives:
        nbest = _alternatives(o, chunk, prefixes, pre, problem, search)
    elif o.beam == 1 and o.nhyp > 1:  # sampling: nhyp independent draws per source, sorted
        rep = np.repeat(rows, o.nhyp)
        prob = problem(rep, [pre[r] for r in rep], o.max_dec)
        flat = search(prob, [(o.keys[chunk[r]], h) for r in rows for h in range(o.nhyp)], 1)
        nbest = []
        for r in rows:
            hyps = [h[0] for h in flat[r * o.nhyp : (r + 1) * o.nhyp]]
            nbest.append(sorted(hyps, key=lambda h: -h.score))
    else:
        rule = np.full(len(chunk), o.any_prefix) if o.any_prefix else None
        prob = problem(rows, pre, o.max_dec, eos_rule=rule)
        nbest = search(prob, [(o.keys[chunk[r]],) for r in rows], o.nhyp)
    for r, i in enumerate(chunk):
        hyps = nbest[r]
        attn = None
        if o.want_attn:
            attn = [_pad_source(h.attention, orig_lens[i]) for h in hyps]
        results[i] = TranslationResult(
            hypotheses=[h.tokens for h in hyps],
            scores=[h.score for h in hyps] if o.want_scores else None,
            attention=attn,
        )


def cut_sources(srcs: list[np.ndarray], max_input: int | None, max_len: int) -> list[np.ndarray]:
    """The sources cut to max_input_length (None or 0: the model's max_len, which also bounds
    it), with one warning saying how many were."""
    limit = min(max_input, max_len) if max_input else max_len
    cut = sum(s.size > limit for s in srcs)
    if not cut:
        return srcs
    warnings.warn(f"sources: {cut} longer than {limit} tokens truncated", stacklevel=3)
    return [s[:limit] for s in srcs]


def check_sentence_ids(ids: Any, n: int) -> list[int]:
    """translate()'s sentence_ids for n sources, checked (None: 0, 1, ..., n - 1)."""
    if ids is None:
        return list(range(n))
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise TypeError(f"sentence_ids: expected a sequence of ints, got {type(ids).__name__}")
    out = [check_int(f"sentence_ids[{i}]", v, 0) for i, v in enumerate(ids)]
    if len(out) != n:
        raise ValueError(f"sentence_ids: {len(out)} ids for {n} sources")
    if len(set(out)) != n:
        raise ValueError("sentence_ids: must be distinct")
    return out


def _pad_source(a: np.ndarray | None, width: int) -> np.ndarray | None:
    if a is None or a.shape[-1] >= width:
        return a
    pad = [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]
    return np.pad(a, pad)


def _alternatives(o: _Options, chunk, prefixes, pre, problem, search) -> list[list[Hypothesis]]:
    """CTranslate2's return_alternatives: expand the position after the prefix, then continue
    every alternative (a fresh decoder state that is fed prefix + alternative)."""
    rows = np.arange(len(chunk))
    first = problem(rows, pre, int(max(p.size for p in pre)), beam=1)
    found = expand(first, o.nhyp, o.min_alt_prob, o.want_attn)
    rep, cont_pre, head, cont_from, keys, fixed = [], [], [], [], [], {}
    for r, (toks, lps, att) in enumerate(found):
        f = pre[r].size - 1
        if f + 1 >= o.max_dec:  # the alternative token is the last one allowed
            a = None if att is None else hypothesis_attention(first, r, att)
            fixed[r] = [Hypothesis(float(lp), float(lp), prefixes[chunk[r]].tolist() + [int(t)],
                                   a) for t, lp in zip(toks, lps, strict=True)]
            continue
        for a, (t, lp) in enumerate(zip(toks, lps, strict=True)):
            rep.append(r)
            cont_pre.append(np.append(pre[r], t))
            head.append(lp)
            cont_from.append(f + 1)
            keys.append((o.keys[chunk[r]], a))
    out: list[list[Hypothesis]] = [fixed.get(r, []) for r in rows]
    if rep:
        rep_a = np.array(rep)
        prob = problem(rep_a, cont_pre, o.max_dec, head=np.array(head),
                       cont_from=np.array(cont_from, dtype=np.int64))
        for r, hyps in zip(rep, search(prob, keys, 1), strict=True):
            out[r].append(hyps[0])
    return out


def _shared_state(model, memory, lengths, steps, width, guess, packed, extra):
    state, packed["w"] = _state_sharing_packing(
        model.init_decoder_state, (memory, lengths, steps), worth_packing(width, guess),
        packed.get("w"), extra,
    )
    return state


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
    beam_size > 1 is beam search (CTranslate2's rules, see `search`, with the GNMT penalty
    ((5 + L) / 6) ** length_penalty, L the generated tokens with the EOS), which takes no
    sampling options.
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
    if not seqs or max_new == 0:
        return [[] for _ in seqs]
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
            end_ids=np.array([] if eos is None else [eos], dtype=np.int64),
            alpha=alpha,
            kind="gnmt",
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
