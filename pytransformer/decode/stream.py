"""Streaming decoding over the batch API of `api`: an input of any length read lazily in blocks
(`translate_iterable`), one sentence's tokens as they are produced (`generate_tokens`), and a
list's batches run on worker threads (`translate_batches`).

translate_iterable holds one block of sources and results at a time (two with worker threads),
so memory does not grow with the input. Each block goes through `api.translate` (or
`translate_batches`), which sorts it by length and splits it into batches, so a block costs
what the same call on a list costs.

Options are handed to `api.translate` untouched: whatever names it takes work here, and a name
it does not take is refused before any input is read.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import ops
from ..checks import check_float, check_int, check_sequences, check_token_id
from ..nn.layers import worth_packing
from . import api
from .api import EncoderDecoder, TranslationResult
from .logits import LogitsProcessors
from .search import greedy_choice, sampler

__all__ = [
    "translate_iterable", "translate_batches", "submit_batches", "Batches", "generate_tokens",
    "GenerationStepResult", "blocks", "read_block_size", "check_option_names", "located",
    "READ_BLOCK_FACTOR",
]

# A block read by translate_iterable holds this many batches (CTranslate2's translate_iterable
# reads max_batch_size * 16 too): enough sentences for the length sort to make batches of
# similar lengths, few enough that a block's sources and results stay small.
READ_BLOCK_FACTOR = 16


def check_option_names(options: dict[str, Any], func: Callable | None = None) -> None:
    """Raises TypeError naming the first option `func` (default: `api.translate`) does not
    take, with the names it does take."""
    func = api.translate if func is None else func
    params = inspect.signature(func).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    for name in options:
        if name not in known:
            raise TypeError(f"{name}: not an option of {func.__name__}; the options are "
                            f"{', '.join(known)}")


def _batch_settings(options: dict[str, Any]) -> tuple[int, bool]:
    """(max_batch_size, by_tokens) as `api.translate` reads them from the same options."""
    return api.batch_settings(options.get("batch_type", "examples"),
                              options.get("max_batch_size"))


def read_block_size(read_batch_size: int | None, options: dict[str, Any]) -> tuple[int, bool]:
    """(block size, by_tokens): what translate_iterable reads at a time, in sentences or, with
    ``batch_type="tokens"`` in options, in source tokens. None: max_batch_size (as options
    give it, else `api.DEFAULT_MAX_BATCH_SIZE`) x READ_BLOCK_FACTOR."""
    max_batch, by_tokens = _batch_settings(options)
    if read_batch_size is None:
        return max_batch * READ_BLOCK_FACTOR, by_tokens
    return check_int("read_batch_size", read_batch_size, 1), by_tokens


def blocks(items: Iterable[Any], size: int, cost: Callable[[Any], int] | None = None
           ) -> Iterator[list[Any]]:
    """Consecutive lists of `items`, read lazily: each holds `size` items, or (with cost)
    items whose costs sum to at most `size` (at least one item, however costly). A full block
    is handed out before the next item is read."""
    block: list[Any] = []
    total = 0
    for item in items:
        c = 1 if cost is None else max(1, cost(item))
        if block and total + c > size:
            yield block
            block, total = [], 0
        block.append(item)
        total += c
        if total >= size:
            yield block
            block, total = [], 0
    if block:
        yield block


def translate_iterable(
    model: EncoderDecoder,
    iterable: Iterable[Sequence[int]],
    *,
    read_batch_size: int | None = None,
    executor: Executor | None = None,
    **options: Any,
) -> Iterator[TranslationResult]:
    """Translates token-id sequences from any iterable, reading it lazily; yields one
    `TranslationResult` per source, in input order.

    The input is read in blocks of read_batch_size sources (None: max_batch_size x
    READ_BLOCK_FACTOR; with ``batch_type="tokens"``, blocks of that many source tokens) and each
    block is translated with `api.translate` (sorted by length and batched inside the block).
    Only one block is held at a time, so any input size runs in bounded memory, and the first
    results come after the first block. With an executor, a block's batches run on its worker
    threads (`translate_batches`: the same results) and the next block is read and started
    before a block's results are yielded, so that the workers never wait for the caller: two
    blocks are held then.
    options: those of `api.translate` (beam_size, max_decoding_length, max_batch_size, ...).

    Raises, before reading any input, TypeError for an option `api.translate` does not take and
    what `api.translate` raises for a bad option value; errors in a source (TypeError,
    IndexError, ValueError) when its block is translated, naming its index in the block.
    """
    for name in ("target_prefix", "sentence_ids"):  # per-sentence lists: need the sentences
        if name in options:
            raise TypeError(f"{name}: not an option of translate_iterable (it is one per "
                            "sentence: use translate or translate_batches)")
    check_option_names(options)
    size, by_tokens = read_block_size(read_batch_size, options)
    api.translate(model, [], **options)  # checks every option value, translates nothing
    if isinstance(iterable, (str, bytes)) or not isinstance(iterable, Iterable):
        raise TypeError(
            f"iterable: expected an iterable of token-id sequences, got {type(iterable).__name__}"
        )
    return _translated_blocks(model, iterable, size, by_tokens, executor, options)


@contextlib.contextmanager
def located(start: int, count: int) -> Iterator[None]:
    """Re-raises an input error (TypeError, ValueError, IndexError) of a block with the place
    of the block in the whole input added: the error names a source by its index in the
    block."""
    try:
        yield
    except (TypeError, ValueError, IndexError) as exc:
        if type(exc) not in (TypeError, ValueError, IndexError):  # may take other arguments
            raise
        where = f"(in the block of inputs {start} to {start + count - 1})"
        raise type(exc)(f"{exc} {where}") from exc


def _translated_blocks(model, iterable, size, by_tokens, executor, options):
    items = blocks(iterable, size, len if by_tokens else None)
    start = 0
    if executor is None:
        for block in items:
            with located(start, len(block)):  # sampling keys: the places in the whole input
                results = api.translate(model, block, **options,
                                        sentence_ids=range(start, start + len(block)))
            start += len(block)
            yield from results
        return
    # The next block's batches start before this block's results are handed out, so the
    # workers have work while the caller consumes: two blocks in memory at most.
    queue: deque[tuple[int, int, Batches]] = deque()
    try:
        for block in items:
            with located(start, len(block)):
                queue.append((start, len(block), submit_batches(
                    model, block, executor, **options,
                    sentence_ids=range(start, start + len(block)))))
            start += len(block)
            if len(queue) > 1:
                yield from _results(*queue.popleft())
        while queue:
            yield from _results(*queue.popleft())
    finally:
        for *_, started in queue:
            started.cancel()


def _results(start: int, count: int, batches: Batches) -> list[TranslationResult]:
    with located(start, count):
        return batches.results()


class Batches:
    """The batches of one `submit_batches` call, running on an executor."""

    def __init__(self, size: int, work: list[tuple[list[int], Future]]):
        self._size, self._work = size, work

    def results(self) -> list[TranslationResult]:
        """Waits for every batch; the results in input order. Raises what a batch raised
        (the batches not started yet are then cancelled)."""
        out: list[TranslationResult | None] = [None] * self._size
        try:
            for chunk, future in self._work:
                for i, result in zip(chunk, future.result(), strict=True):
                    out[i] = result
        except BaseException:
            self.cancel()
            raise
        return out  # type: ignore[return-value]

    def cancel(self) -> None:
        """Cancels the batches not started (those running finish, their results unused)."""
        for _, future in self._work:
            future.cancel()


def submit_batches(
    model: EncoderDecoder, sources: Sequence[Sequence[int]], executor: Executor, **options: Any
) -> Batches:
    """Starts the batches of `translate_batches` on `executor` and returns at once; their
    `Batches.results()` are the results of ``translate_batches(model, sources, executor=
    executor, **options)``. Checks options and sources (raising as `api.translate` does)
    before anything starts."""
    options = dict(options)
    prefixes = options.pop("target_prefix", None)
    ids = options.pop("sentence_ids", None)
    check_option_names(options)
    api.translate(model, [], **options)
    # Checked here so that an error names the source by its index in `sources`, not in a
    # batch; and cut here, so that one warning says how many were.
    srcs = check_sequences(sources, "sources", _source_vocab(model), 1 << 62, allow_empty=True)
    srcs = api.cut_sources(srcs, options.get("max_input_length"), int(model.config.max_len))
    keys = api.check_sentence_ids(ids, len(srcs))
    if prefixes is not None and (not isinstance(prefixes, Sequence)
                                 or len(prefixes) != len(srcs)):
        raise ValueError(f"target_prefix: expected one entry (a list of ids or None) per "
                         f"source ({len(srcs)})")
    work: list[tuple[list[int], Future]] = []
    try:
        for chunk in _plan(srcs, *_batch_settings(options)):
            batch = [srcs[i] for i in chunk]
            kw = dict(options, sentence_ids=[keys[i] for i in chunk])
            if prefixes is not None:
                kw["target_prefix"] = [prefixes[i] for i in chunk]
            work.append((chunk, executor.submit(api.translate, model, batch, **kw)))
    except BaseException:
        Batches(len(srcs), work).cancel()
        raise
    return Batches(len(srcs), work)


def translate_batches(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    *,
    executor: Executor | None = None,
    **options: Any,
) -> list[TranslationResult]:
    """`api.translate`, with its batches run on `executor`'s worker threads (None: in this
    thread, one `api.translate` call).

    The sources are sorted by length and cut into batches as `api.translate` does (at most
    max_batch_size sources; with ``batch_type="tokens"``, at most max_batch_size padded source
    tokens), and each batch is one `api.translate` call on a worker. With ``batch_type=
    "examples"`` (the default) those are `api.translate`'s own batches, so the results are
    identical to the one call's, bit for bit, for any number of workers; results come back in
    input order. The kernels release the GIL, so the workers compute in parallel, each batch
    with the process's kernel thread count (`pytransformer.set_num_threads`). Each batch packs
    its own copy of the step weights when packing pays (one `api.translate` call packs once
    for all its batches): up to one copy per worker in memory at a time.

    Raises what `api.translate` raises; an error in one batch cancels the batches not started.
    """
    if executor is None:
        return api.translate(model, sources, **options)
    return submit_batches(model, sources, executor, **options).results()


def _source_vocab(model: EncoderDecoder) -> int:
    return int(api._config_value(model, "src_vocab_size", "vocab_size"))


def _plan(srcs: list[np.ndarray], max_batch: int, by_tokens: bool) -> list[list[int]]:
    """Batches of source indices: api.translate's own batches of the sources it decodes, the
    empty sources (which it answers without decoding, outside its batches) in the first one."""
    plan = api.plan_batches([s.size for s in srcs], max_batch, by_tokens)
    empty = [i for i in range(len(srcs)) if not srcs[i].size]
    if empty:
        plan = [plan[0] + empty, *plan[1:]] if plan else [empty]
    return plan


# --------------------------------------------------------------------------------------------
# One sentence, token by token


@dataclass(frozen=True)
class GenerationStepResult:
    """One token from `generate_tokens`.

    step: its index in the target (0 for the first); token_id: the target token id; log_prob:
    its natural log-probability (log-softmax of the step's logits after the repetition penalty
    and the masks, before temperature or top-k/top-p; None unless return_log_prob=True);
    token: the text it adds to the translation (set by `Translator.generate_tokens`; None
    here).
    """

    step: int
    token_id: int
    log_prob: float | None = None
    token: str | None = None


def generate_tokens(
    model: EncoderDecoder,
    source_ids: Sequence[int],
    *,
    max_decoding_length: int = 256,
    min_decoding_length: int = 0,
    sampling_topk: int = 1,
    sampling_topp: float = 1.0,
    sampling_temperature: float = 1.0,
    seed: int | None = None,
    end_token: int | Sequence[int] | None = None,
    target_prefix: Sequence[int] | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    suppress_tokens: Sequence[int] = (),
    max_input_length: int = 0,
    return_log_prob: bool = False,
    beam_size: int = 1,
) -> Iterator[GenerationStepResult]:
    """Translates one source, yielding each target token as soon as the model produces it.

    The tokens are those of `api.translate(model, [source_ids], beam_size=1, ...)` (greedy
    decoding: sampling_topk=1, the default) with the same max_decoding_length (capped at the
    model's max_len) and min_decoding_length (the end tokens are masked before that many
    tokens). sampling_topk=k > 1 samples from the k most likely tokens (0: from all), then from
    the nucleus of mass sampling_topp, at sampling_temperature (0: greedy); seed makes it
    reproducible (None: fresh randomness). Decoding ends at an end token (end_token: an id or a
    list of ids; None: the model's EOS), which is not yielded, or after max_decoding_length
    tokens. The model's config.suppress_ids are never produced. An empty source yields only its
    target_prefix, with log_prob 0.0 (translate neither decodes it: score 0).
    Beam search cannot stream (a beam's best prefix can change at any step): beam_size > 1
    raises ValueError, as CTranslate2's generate_tokens does.

    As CTranslate2's options of the same names: target_prefix tokens are forced first (and
    yielded; they count in both decoding lengths); repetition_penalty divides a positive logit
    of a token already in the target (prefix included) by it and multiplies a negative one
    (> 1 penalises repeats); no_repeat_ngram_size=n > 0 bans every token that would repeat an
    n-gram of the target; a source longer than max_input_length (0: the model's max_len) is
    cut to it, with a warning. Beyond
    them, suppress_tokens are ids never generated (`Translator.generate_tokens` puts the
    unknown token there for disable_unk).

    Stop early by closing the generator (or breaking out of the loop); its decoder state is
    then dropped. Raises, before any work, TypeError/ValueError naming a bad option,
    IndexError for a token id outside the vocabulary.
    """
    beam_size = check_int("beam_size", beam_size, 1)
    if beam_size > 1:
        raise ValueError(
            "beam_size: generate_tokens decodes greedily or by sampling (beam_size=1); beam "
            "search cannot stream its tokens (use translate)"
        )
    cfg = model.config
    max_len = int(cfg.max_len)
    max_dec, min_dec = api.check_decoding_lengths(max_decoding_length, min_decoding_length,
                                                  max_len)
    topk, topp, temperature, seed = api.check_sampling(
        sampling_topk, sampling_topp, sampling_temperature, seed)
    if not isinstance(return_log_prob, bool):
        raise TypeError(f"return_log_prob: expected a bool, got {type(return_log_prob).__name__}")
    vocab = int(cfg.tgt_vocab_size)
    banned = (_target_ids("suppress_tokens", suppress_tokens, vocab)
              + [int(t) for t in getattr(cfg, "suppress_ids", ()) or ()])
    rules = _Rules(
        ends=api.check_end_tokens(end_token, int(cfg.eos_id), vocab).tolist(),
        min_dec=min_dec,
        edits=LogitsProcessors(
            np.unique(np.array(banned, dtype=np.int64)),
            repetition_penalty=check_float("repetition_penalty", repetition_penalty,
                                           positive=True),
            no_repeat_ngram_size=check_int("no_repeat_ngram_size", no_repeat_ngram_size, 0),
        ),
    )
    prefix = [] if target_prefix is None else _target_ids("target_prefix", target_prefix, vocab)
    keep = check_int("max_input_length", max_input_length, 0)
    src = check_sequences([source_ids], "source_ids", _source_vocab(model), 1 << 62,
                          allow_empty=True)[0]
    limit = min(keep, max_len) if keep else max_len
    if src.size > limit:  # as translate: cut, with a warning, never refused
        warnings.warn(f"source_ids: longer than {limit} tokens, truncated", stacklevel=2)
        src = src[:limit]
    if topk == 1 or temperature == 0.0:
        choose = greedy_choice
    else:
        choose = sampler(temperature, topk, topp, [np.random.default_rng(seed)])
    return _token_stream(model, src, min(max_dec, max_len), prefix, rules, choose,
                         return_log_prob)


def _target_ids(name: str, ids: Any, vocab: int) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise TypeError(f"{name}: expected a sequence of token ids, got {type(ids).__name__}")
    return [check_token_id(f"{name}[{i}]", t, vocab) for i, t in enumerate(ids)]


@dataclass
class _Rules:
    """What generate_tokens does to a step's logits before choosing: translate's edits
    (`logits.LogitsProcessors`: repetition penalty, banned n-grams and tokens), then the end
    tokens masked below the minimum length."""

    ends: list[int]
    min_dec: int
    edits: LogitsProcessors

    def apply(self, logits: np.ndarray, target: list[int]) -> None:
        hist = np.array([target], dtype=np.int64) if self.edits.needs_history else None
        self.edits.apply(logits, hist)
        if len(target) < self.min_dec:
            logits[0, self.ends] = -np.inf


def _token_stream(model, src, max_dec, prefix, rules, choose, want_logprob):
    cfg = model.config
    if src.size == 0:  # as translate (and CTranslate2): an empty source gets only its prefix
        for step, token in enumerate(prefix[:max_dec]):
            yield GenerationStepResult(step, token, 0.0 if want_logprob else None)
        return
    lengths = np.array([src.size], dtype=np.int64)
    ids = np.full((1, max(1, src.size)), int(cfg.pad_id), dtype=np.int64)
    ids[0, : src.size] = src
    memory = model.encode(ids, lengths)
    # The packing decision of api.translate for this batch of one, so the products (and so
    # the tokens) are the ones it computes.
    steps = min(max_dec, max(rules.min_dec, src.size + 8))
    state = model.init_decoder_state(memory, lengths, max_dec,
                                     pack_weights=worth_packing(1, steps))
    token = int(cfg.bos_id)
    target: list[int] = []
    sent = np.zeros(1, dtype=np.int64)
    for step in range(max_dec):
        logits, _ = model.decode_step(state, np.array([token], dtype=np.int64))
        if step < len(prefix):
            token = prefix[step]
        else:
            rules.apply(logits, target)
            token = int(choose(logits, sent)[0])
            if token in rules.ends:
                return
        log_prob = None
        if want_logprob:
            logp = ops.log_softmax(np.array(logits, dtype=np.float32, order="C"))
            log_prob = float(logp[0, token])
        target.append(token)
        yield GenerationStepResult(step, token, log_prob)
