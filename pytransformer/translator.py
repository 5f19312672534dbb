"""Text in, text out: a trained Transformer with its tokenizers, and the training pipeline behind
the ``pytransformer train`` command and the demo.

A translator directory holds::

    src_tokenizer.json, tgt_tokenizer.json   the tokenizers (the same file twice when shared)
    model/                                   config.json + model.safetensors (the final model)
    options.json                             default translate() options (imported models)
    vmap.txt                                 the vocabulary map of use_vmap=True (optional)
    checkpoints/step-*/                      resumable training checkpoints
    checkpoints/best/                        the model of the best validation (BLEU, or loss)
    checkpoints/log.jsonl                    the training log (``pytransformer plot`` reads it)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pathlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from ._native import set_num_threads
from .checks import check_bool, check_float, check_int, check_optional_int
from .decode import stream
from .decode.vmap import VMAP_FILE, VocabMap
from .io import atomic_open, atomic_write_text, iter_lines, split_lines
from .models import Transformer, TransformerConfig
from .text.metrics import score_translations
from .text.tokenizer import CharTokenizer, SentencePieceTokenizer, load_tokenizer
from .train import distributed
from .train.allocator import reuse_freed_memory
from .train.average import average_checkpoints, last_checkpoints
from .train.data import TokenBatcher, make_batch
from .train.optim import Adam
from .train.presets import DEFAULT_PRESET, Preset, get_preset
from .train.schedule import Noam
from .train.shards import ShardBatcher, open_data
from .train.trainer import BEST_DIR, Trainer, latest_checkpoint

__all__ = [
    "Translator", "TrainOptions", "train_translator", "train_translator_on_data", "iter_lines",
]

# translate()'s options that generate_tokens has no use for: a model's options.json may set
# them (an imported model's beam size), and they must not make generate_tokens refuse.
_SEARCH_ONLY = ("beam_size", "num_hypotheses", "length_penalty", "max_batch_size", "batch_type")


class Translator:
    """A Transformer and the tokenizers of its two languages.

    inter_threads: batches translated at once, each on its own worker thread (CTranslate2's
    name; results are identical to inter_threads=1, in input order). intra_threads: the kernel
    threads each batch uses (`pytransformer.set_num_threads`: a process-wide setting, set here
    when given; None leaves it as it is). The process then runs up to inter_threads x
    intra_threads threads.
    """

    def __init__(
        self,
        model: Transformer,
        src_tokenizer: Any,
        tgt_tokenizer: Any,
        *,
        inter_threads: int = 1,
        intra_threads: int | None = None,
    ):
        if not isinstance(model, Transformer):
            raise TypeError(f"model: expected a Transformer, got {type(model).__name__}")
        cfg = model.config
        for name, tok, size in (("src_tokenizer", src_tokenizer, cfg.src_vocab_size),
                                ("tgt_tokenizer", tgt_tokenizer, cfg.tgt_vocab_size)):
            if tok.vocab_size != size:
                raise ValueError(
                    f"{name}: vocabulary of {tok.vocab_size} does not match the model's {size}"
                )
        self.model = model.eval()
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        # Defaults for translate()'s options (beam_size, max_decoding_length, ...): an imported
        # model brings its own (a Marian generation_config.json); saved as options.json.
        self.options: dict[str, Any] = {}
        self.inter_threads = check_int("inter_threads", inter_threads, 1)
        self.intra_threads = check_optional_int("intra_threads", intra_threads, 1)
        if self.intra_threads is not None:
            set_num_threads(self.intra_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # two threads' first calls must not start two pools
        # The vocabulary shortlist of use_vmap=True (vmap.txt of the directory, or load_vmap).
        self.vmap: VocabMap | None = None

    def load_vmap(self, path: str | os.PathLike, *, unknown: str = "skip") -> VocabMap:
        """Reads a vocabulary map in CTranslate2's vmap format (``source tokens<TAB>target
        tokens`` per line, tokens of this translator's tokenizers) for ``use_vmap=True``: the
        output layer then scores only the union of the candidates of a batch's source tokens and
        the special tokens. unknown="skip" drops unknown tokens (counted in the map's
        ``skipped``), "error" rejects them. It is saved with the translator (vmap.txt)."""
        cfg = self.model.config
        always = {cfg.pad_id, cfg.bos_id, cfg.eos_id}
        if getattr(self.tgt_tokenizer, "unk_id", None) is not None:
            always.add(self.tgt_tokenizer.unk_id)
        self.vmap = VocabMap.from_file(
            path, _token_to_id(self.src_tokenizer), _token_to_id(self.tgt_tokenizer),
            always=sorted(always), unknown=unknown, tgt_vocab_size=cfg.tgt_vocab_size,
        )
        return self.vmap

    def _merged(self, options: dict[str, Any], n_best: int) -> dict[str, Any]:
        """translate()'s options over self.options, with the vocabulary map of use_vmap and
        the unknown token of disable_unk."""
        opts = {**self.options, **options, "num_hypotheses": n_best}
        if check_bool("use_vmap", opts.get("use_vmap", False)):
            if self.vmap is None:
                raise ValueError("use_vmap: this translator has no vocabulary map (a vmap.txt "
                                 "in its directory, or Translator.load_vmap)")
            opts["vocab_subset_fn"] = self.vmap.subset
        if opts.get("disable_unk") and getattr(self.tgt_tokenizer, "unk_id", None) is not None:
            opts.setdefault("unk_id", self.tgt_tokenizer.unk_id)
        return opts

    def close(self) -> None:
        """Stops the worker threads of inter_threads > 1 (started again when needed)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Translator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _executor(self) -> ThreadPoolExecutor | None:
        if self.inter_threads == 1:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.inter_threads,
                                                thread_name_prefix="pytransformer-translate")
            return self._pool

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        compute_type: str | None = None,
        *,
        inter_threads: int = 1,
        intra_threads: int | None = None,
    ) -> Translator:
        """Loads ``directory/model`` (or, before training finished, the newest checkpoint);
        compute_type "int8" runs it in int8, "float32" in float32, None as stored (see
        `Transformer.load`). inter_threads, intra_threads: as for `Translator`."""
        root = pathlib.Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"directory: {root} does not exist")
        model_dir = root / "model"
        if not (model_dir / "config.json").exists():
            latest = latest_checkpoint(root / "checkpoints")
            if latest is None:
                raise FileNotFoundError(f"directory: no model or checkpoint under {root}")
            model_dir = pathlib.Path(latest)
        check_int("inter_threads", inter_threads, 1)
        check_optional_int("intra_threads", intra_threads, 1)
        model = Transformer.load(model_dir, compute_type=compute_type)
        translator = cls(model, load_tokenizer(root / "src_tokenizer.json"),
                         load_tokenizer(root / "tgt_tokenizer.json"),
                         inter_threads=inter_threads, intra_threads=intra_threads)
        if (root / "options.json").is_file():
            translator.options = _load_options(root / "options.json")
        if (root / VMAP_FILE).is_file():
            translator.load_vmap(root / VMAP_FILE)
        return translator

    def save(self, directory: str | os.PathLike) -> None:
        root = pathlib.Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.src_tokenizer.save(root / "src_tokenizer.json")
        self.tgt_tokenizer.save(root / "tgt_tokenizer.json")
        self.model.save(root / "model")
        if self.options:
            atomic_write_text(root / "options.json", json.dumps(self.options, indent=2) + "\n")
        if self.vmap is not None:
            self.vmap.to_file(root / VMAP_FILE, _id_to_token(self.src_tokenizer),
                              _id_to_token(self.tgt_tokenizer))

    def encode_sources(self, sentences: Sequence[str]) -> list[list[int]]:
        if isinstance(sentences, str):
            raise TypeError("sentences: expected a list of strings, got one string")
        return [self.src_tokenizer.encode(s) for s in sentences]

    def translate(self, sentences: Sequence[str], *, n_best: int = 1, **options: Any) -> list[Any]:
        """Translates each sentence; returns strings, or lists of ``n_best`` strings when
        ``n_best`` > 1 (``num_hypotheses``, CTranslate2's name, is taken for n_best
        too). ``options`` go to ``Transformer.translate`` (beam_size,
        length_penalty, max_decoding_length, max_batch_size, ...) over the defaults of
        ``self.options``. With inter_threads > 1 the batches run on that many worker threads
        (`decode.translate_batches`), with the same results."""
        options = dict(options)
        n_best = _n_best(n_best, options)
        results = self._translate_ids(self.encode_sources(sentences), n_best, options)
        return self._texts(results, n_best)

    def _translate_ids(self, sources: list, n_best: int, options: dict[str, Any]) -> list:
        opts = self._merged(options, n_best)
        executor = self._executor()
        if executor is None:
            return self.model.translate(sources, **opts)
        return stream.translate_batches(self.model, sources, executor=executor, **opts)

    def _texts(self, results: list, n_best: int) -> list[Any]:
        texts = [[self.tgt_tokenizer.decode(h) for h in r.hypotheses] for r in results]
        return texts if n_best > 1 else [t[0] for t in texts]

    def translate_iterable(
        self,
        lines: Iterable[str],
        *,
        n_best: int = 1,
        read_batch_size: int | None = None,
        **options: Any,
    ) -> Iterator[Any]:
        """Translates sentences from any iterable (a file's lines, a generator), reading it
        lazily; yields one translation per sentence (a string, or a list of n_best strings), in
        input order.

        The input is read in blocks of read_batch_size sentences (None: max_batch_size x 16,
        as CTranslate2's translate_iterable; with ``batch_type="tokens"`` blocks of that many
        source tokens) and each block is translated as `translate` would (through
        `decode.translate_iterable`, sampling keyed by position in the whole input), so memory
        stays bounded for any input size and the first translations come after the first
        block. options: as for `translate`. A bad option name or value raises
        (TypeError/ValueError) before any input is read; a sentence that is not a string
        raises TypeError naming its index when its block is reached.
        """
        options = dict(options)
        n_best = _n_best(n_best, options)
        merged = self._merged(options, n_best)
        stream.check_option_names(merged)
        size, _ = stream.read_block_size(read_batch_size, merged)
        self.translate([], n_best=n_best, **options)  # checks the option values
        if isinstance(lines, str) or not isinstance(lines, Iterable):
            raise TypeError(f"lines: expected an iterable of strings, got {type(lines).__name__}")
        return self._translated_lines(lines, n_best, size, merged)

    def _translated_lines(self, lines, n_best, size, opts) -> Iterator[Any]:
        # Each line encoded once, as decode.translate_iterable's blocks read it (it counts a
        # block's tokens on the ids); with workers the next block starts before this one is
        # yielded.
        ids = (self.src_tokenizer.encode(s) for s in _checked_lines(lines))
        results = stream.translate_iterable(self.model, ids, read_batch_size=size,
                                            executor=self._executor(), **opts)
        for result in results:
            yield self._texts([result], n_best)[0]

    def translate_file(
        self,
        input_path: str | os.PathLike,
        output_path: str | os.PathLike,
        *,
        n_best: int = 1,
        read_batch_size: int | None = None,
        **options: Any,
    ) -> int:
        """Translates a UTF-8 file line by line into output_path (one translation per line;
        with n_best > 1, n_best lines per sentence: ``index<TAB>translation``), reading and
        writing as it goes (`translate_iterable`: bounded memory). output_path is replaced
        atomically once every line is written: an error or an interrupt leaves it as it was.
        Lines are split on "\\n" only (a trailing "\\r" dropped, as `io.split_lines` does).
        Returns the number of input lines."""
        count = 0
        with open(input_path, "rb") as src, atomic_open(output_path, "w") as out:
            results = self.translate_iterable(
                iter_lines(src, os.fspath(input_path)), n_best=n_best,
                read_batch_size=read_batch_size, **options,
            )
            for count, result in enumerate(results, 1):
                write_translation(out, count - 1, result, n_best)
        return count

    def generate_tokens(self, sentence: str, **options: Any) -> Iterator[Any]:
        """Translates one sentence, yielding a `decode.GenerationStepResult` per target token
        as the model produces it, its ``token`` the text that token adds to the translation
        (so the pieces joined are ``translate([sentence], beam_size=1)[0]`` for the same
        options). options: those of `decode.generate_tokens` (max_decoding_length,
        min_decoding_length, sampling_topk, sampling_topp, sampling_temperature, seed,
        end_token: ids or target token strings, target_prefix: ids or the text the
        translation starts with, repetition_penalty, no_repeat_ngram_size, max_input_length,
        return_log_prob) and disable_unk (never the unknown token), over the defaults of
        ``self.options`` that apply; beam_size > 1 raises ValueError (beam search cannot
        stream)."""
        if not isinstance(sentence, str):
            raise TypeError(f"sentence: expected a string, got {type(sentence).__name__}")
        known = {*inspect.signature(stream.generate_tokens).parameters, "disable_unk"}
        defaults = {k: v for k, v in self.options.items()
                    if k in known and k not in _SEARCH_ONLY}
        opts = {**defaults, **options}
        if "suppress_tokens" in opts:
            raise TypeError("suppress_tokens: not an option here (the text level takes "
                            "disable_unk; decode.generate_tokens takes ids)")
        if check_bool("disable_unk", opts.pop("disable_unk", False)):
            opts["suppress_tokens"] = [self.tgt_tokenizer.unk_id]
        stream.check_option_names(opts, stream.generate_tokens)
        if opts.get("end_token") is not None:
            opts["end_token"] = self._end_token_ids(opts["end_token"])
        if isinstance(opts.get("target_prefix"), str):
            opts["target_prefix"] = self._prefix_ids(opts["target_prefix"])
        steps = stream.generate_tokens(self.model, self.src_tokenizer.encode(sentence), **opts)
        return self._with_text(steps)

    def _with_text(self, steps: Iterator[Any]) -> Iterator[Any]:
        # Each piece is the growth of the decoded prefix: a token's text can depend on its
        # neighbours (SentencePiece's word-initial spaces, bytes of one character).
        ids: list[int] = []
        text = ""
        for step in steps:
            ids.append(step.token_id)
            now = self.tgt_tokenizer.decode(ids)
            piece = now[len(text):] if now.startswith(text) else now
            text = now
            yield dataclasses.replace(step, token=piece)

    def translate_tokens(
        self, batch: Sequence[Sequence[str]], *, n_best: int = 1, **options: Any
    ) -> list[Any]:
        """Translates pre-tokenized sentences (lists of token strings, as CTranslate2's
        translate_batch takes them): returns lists of target tokens, or n_best such lists per
        sentence when n_best > 1. Needs tokenizers over a token list (`text.VocabTokenizer`:
        the imported models have them); unknown tokens map to the unknown token."""
        for name, tok in (("src_tokenizer", self.src_tokenizer),
                          ("tgt_tokenizer", self.tgt_tokenizer)):
            if not hasattr(tok, "encode_tokens"):
                raise TypeError(
                    f"{name}: a {type(tok).__name__} has no token list (translate_tokens needs "
                    "a VocabTokenizer; use translate() for text)"
                )
        if isinstance(batch, str) or not isinstance(batch, Sequence):
            raise TypeError("batch: expected a list of token lists")
        for i, tokens in enumerate(batch):
            if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
                raise TypeError(f"batch[{i}]: expected a list of token strings")
        sources = [self.src_tokenizer.encode_tokens(list(t)) for t in batch]
        options = dict(options)
        n_best = _n_best(n_best, options)
        results = self._translate_ids(sources, n_best, options)
        out = [[self.tgt_tokenizer.decode_tokens(h) for h in r.hypotheses] for r in results]
        return out if n_best > 1 else [t[0] for t in out]

    def attention(
        self, sentence: str, **options: Any
    ) -> tuple[list[str], list[str], np.ndarray, str]:
        """(source tokens, target tokens, attention, translation) of the best translation.
        attention is (target x source): the last decoder layer's cross-attention averaged over
        heads, or the layer `attention_layer=` chooses; (heads x target x source) with
        `attention_heads=True`. Other options go to `translate`."""
        result = self.model.translate(
            self.encode_sources([sentence]), return_attention=True, **options
        )[0]
        ids = result.hypotheses[0]
        src_tokens = self.src_tokenizer.tokens(sentence)
        tgt_tokens = [self.tgt_tokenizer.decode([i]) or "·" for i in ids]
        return src_tokens, tgt_tokens, result.attention[0], self.tgt_tokenizer.decode(ids)

    def _prefix_ids(self, text: str) -> list[int]:
        """The target ids a translation starting with text starts with (no EOS)."""
        ids = self.tgt_tokenizer.encode(text)
        eos = getattr(self.tgt_tokenizer, "eos_id", None)
        return ids[:-1] if ids and ids[-1] == eos else ids

    def _end_token_ids(self, end_token: Any) -> Any:
        """end_token with its strings (target tokens) replaced by their ids."""
        if isinstance(end_token, (list, tuple)):
            return [self._end_token_ids(t) for t in end_token]
        return _token_id(self.tgt_tokenizer, end_token) if isinstance(end_token, str) else end_token


def _token_id(tokenizer: Any, token: str) -> int:
    """The id of one token string of a tokenizer's vocabulary."""
    itos = getattr(tokenizer, "itos", None)
    if itos is not None:
        if token in itos:
            return itos.index(token)
    elif getattr(tokenizer, "sp", None) is not None:
        i = tokenizer.sp.piece_to_id(token)
        if tokenizer.sp.id_to_piece(i) == token:
            return int(i)
    raise ValueError(f"end_token: {token!r} is not a token of the target vocabulary")


def _n_best(n_best: int, options: dict[str, Any]) -> int:
    """n_best, or CTranslate2's name for it, num_hypotheses (taken out of options)."""
    if "num_hypotheses" in options:
        given = options.pop("num_hypotheses")
        if n_best != 1 and given != n_best:
            raise ValueError(f"num_hypotheses ({given}) and n_best ({n_best}) disagree")
        return given
    return n_best


def _checked_lines(lines: Iterable[Any]) -> Iterator[str]:
    for i, line in enumerate(lines):
        if not isinstance(line, str):
            raise TypeError(f"lines[{i}]: expected a string, got {type(line).__name__}")
        yield line


def write_translation(out: IO[str], index: int, result: Any, n_best: int) -> None:
    """Writes one translation as lines: the text, or with n_best > 1 ``index<TAB>text`` for each
    of the n-best (the format of ``pytransformer translate --n-best``)."""
    if n_best == 1:
        out.write(f"{result}\n")
    else:
        out.write("".join(f"{index}\t{h}\n" for h in result))


@dataclass
class TrainOptions:
    """Settings of ``train_translator`` and ``train_translator_on_data`` (the CLI's --config
    file holds the same keys; flags override them).

    preset: a recipe of ``train.presets`` (tiny, small, base, big) giving the model shape,
    ``max_tokens``, ``lr`` and ``warmup`` where those are not set here; ``model`` entries override
    the preset's. Limits (training stops at the first reached; at least one is needed): ``steps``
    updates, ``max_time`` seconds, ``max_epochs`` passes over the data, early stopping after
    ``patience`` validations without a better ``valid_bleu`` (or ``valid_loss`` without BLEU).
    accumulate: batches per update (gradient accumulation). valid_every: updates between
    validations (loss, and greedy-decoding BLEU/chrF against the raw references when
    ``valid_bleu`` and sacrebleu is installed). final: which weights go to ``out/model``:
    "best" (of the validations; the last weights when there was none), "last", or "average"
    (the mean of the newest ``average_last`` checkpoints; ``average_last`` > 0 implies it).
    """

    model: dict[str, Any] = field(default_factory=dict)  # TransformerConfig fields
    preset: str | None = DEFAULT_PRESET
    tokenizer: str = "sentencepiece"  # or "char"
    vocab_size: int = 8000
    shared_vocab: bool = False
    steps: int | None = 2000
    max_time: float | None = None
    max_epochs: int | None = None
    max_tokens: int | None = None  # None: the preset's
    accumulate: int = 1
    lr: float | None = None  # peak learning rate, reached after `warmup` steps (the paper's)
    warmup: int | None = None
    label_smoothing: float = 0.1
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    valid_every: int = 250
    valid_bleu: bool = True
    patience: int | None = None
    average_last: int = 0
    final: str = "best"
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}")
        return cls(**d)

    def recipe(self) -> tuple[dict[str, Any], int, float, int]:
        """(model fields, max_tokens, lr, warmup): the preset's, with what is set here on top."""
        preset = get_preset(self.preset) if self.preset is not None else None
        model = {**(preset.model if preset else {}), **self.model}
        if preset is None:
            preset = Preset("none", max_tokens=4096, lr=1e-3, warmup=400)
        return (
            model,
            preset.max_tokens if self.max_tokens is None else self.max_tokens,
            preset.lr if self.lr is None else self.lr,
            preset.warmup if self.warmup is None else self.warmup,
        )

    def check(self) -> None:
        """Raises ValueError naming the first setting out of range."""
        if self.steps is None and self.max_time is None and self.max_epochs is None:
            raise ValueError("steps/max_time/max_epochs: give at least one training limit")
        if self.final not in ("best", "last", "average"):
            raise ValueError(f"final: expected 'best', 'last' or 'average', got {self.final!r}")
        check_int("accumulate", self.accumulate, 1)
        check_int("average_last", self.average_last, 0)
        if self.final == "average" and self.average_last == 0:
            raise ValueError("final: 'average' needs average_last > 0")
        if self.max_time is not None:
            check_float("max_time", self.max_time, 0.0, positive=True)
        self.recipe()


def _token_to_id(tok: Any) -> Any:
    """A tokenizer's token -> id lookup (None for a token it does not have)."""
    itos = getattr(tok, "itos", None)  # CharTokenizer, VocabTokenizer (specials included)
    if itos is not None:
        return {t: i for i, t in enumerate(itos)}.get
    sp = tok.sp  # SentencePiece maps an unknown piece to unk: tell it from the real one

    def find(piece: str) -> int | None:
        i = sp.piece_to_id(piece)
        return i if sp.id_to_piece(i) == piece else None
    return find


def _id_to_token(tok: Any) -> Any:
    itos = getattr(tok, "itos", None)
    return itos if itos is not None else tok.sp.id_to_piece


def _load_options(path: pathlib.Path) -> dict[str, Any]:
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable options file ({exc})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{path}: expected a JSON object of translate() options")
    return options


def _make_tokenizers(src: Sequence[str], tgt: Sequence[str], opts: TrainOptions):
    def build(texts: Sequence[str]):
        if opts.tokenizer == "char":
            return CharTokenizer.train(texts)
        if opts.tokenizer == "sentencepiece":
            return SentencePieceTokenizer.train(texts, vocab_size=opts.vocab_size)
        raise ValueError(f"tokenizer: expected 'sentencepiece' or 'char', got {opts.tokenizer!r}")

    if opts.shared_vocab:
        shared = build(list(src) + list(tgt))
        return shared, shared
    return build(src), build(tgt)


def _check_parallel(src: Sequence[str], tgt: Sequence[str], what: str) -> None:
    if len(src) != len(tgt):
        raise ValueError(f"{what}: {len(src)} source lines but {len(tgt)} target lines")
    if len(src) == 0:
        raise ValueError(f"{what}: no sentence pairs")


def _paper_schedule(d_model: int, warmup: int, peak_lr: float) -> Noam:
    """The paper's warm-up then inverse-sqrt decay, scaled so its peak is ``peak_lr``."""
    if not peak_lr > 0:
        raise ValueError(f"lr: expected a positive peak learning rate, got {peak_lr}")
    return Noam(d_model, warmup, factor=peak_lr * (d_model * warmup) ** 0.5)


def _encode_pairs(src_tok, tgt_tok, src: Sequence[str], tgt: Sequence[str]) -> list:
    return [(src_tok.encode(s), tgt_tok.encode(t)) for s, t in zip(src, tgt, strict=True)]


def _bleu_available() -> bool:
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        return False
    return True


def _bleu_metric(sources: list, references: list[str], tgt_tok: Any):
    """Validation BLEU/chrF: greedy decoding, detokenised, against the raw references."""
    longest = max((len(s) for s in sources), default=0)
    max_len = 2 * longest + 10

    def metric(model: Transformer) -> dict[str, float]:
        model.eval()
        results = model.translate(sources, beam_size=1, max_decoding_length=max_len,
                                  max_batch_size=128)
        hyps = [tgt_tok.decode(r.hypotheses[0]) for r in results]
        scores = score_translations(hyps, references)
        return {"valid_bleu": scores["bleu"], "valid_chrf": scores["chrf"]}

    return metric


@dataclass
class _Run:
    """What a training run needs beyond its options: tokenizers, data and validation."""

    src_tok: Any
    tgt_tok: Any
    make_batcher: Any  # (ids dict, max_tokens, seed) -> DataSource
    longest: int  # the longest sentence cost in training and validation data
    valid_pairs: list | None = None
    valid_refs: list[str] | None = None


def _fit(root: pathlib.Path, run: _Run, opts: TrainOptions, resume: bool,
         progress: bool) -> Translator:
    """Builds the model, optimizer and Trainer, trains, and saves the final model."""
    opts.check()
    reuse_freed_memory()  # steps reuse the previous step's memory (see train.allocator)
    model_fields, max_tokens, lr, warmup = opts.recipe()
    ckpt_dir = root / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"resume: no checkpoint under {ckpt_dir}")
    model_cfg = {"max_len": max(256, run.longest), **model_fields}
    if run.src_tok is run.tgt_tok or opts.shared_vocab:
        model_cfg.setdefault("tie_embeddings", "all")
    config = TransformerConfig(
        src_vocab_size=run.src_tok.vocab_size, tgt_vocab_size=run.tgt_tok.vocab_size,
        pad_id=run.src_tok.pad_id, bos_id=run.tgt_tok.bos_id, eos_id=run.tgt_tok.eos_id,
        **model_cfg,
    )
    model = Transformer(config, seed=opts.seed)
    ids = dict(pad_id=config.pad_id, bos_id=config.bos_id, eos_id=config.eos_id)
    batcher = run.make_batcher(ids, max(max_tokens, run.longest), opts.seed)
    w, reducer = distributed.world(), None
    if w.size > 1:
        batcher = distributed.RankShare(batcher, w.rank, w.size)
        reducer = distributed.MPIReducer(w)
    valid = metric = None
    if run.valid_pairs:
        vp = run.valid_pairs
        valid = [make_batch(vp[i : i + 64], **ids) for i in range(0, len(vp), 64)]
        if opts.valid_bleu and run.valid_refs is not None and _bleu_available():
            metric = _bleu_metric([s for s, _ in vp], run.valid_refs, run.tgt_tok)
    best = None if valid is None else "valid_bleu" if metric is not None else "valid_loss"
    optimizer = Adam(
        model.parameters(), lr=_paper_schedule(config.d_model, warmup, lr),
        max_grad_norm=opts.max_grad_norm,
    )
    trainer = Trainer(
        model, optimizer, batcher, valid_data=valid, label_smoothing=opts.label_smoothing,
        seed=opts.seed, accumulate=opts.accumulate, checkpoint_dir=ckpt_dir,
        checkpoint_every=opts.checkpoint_every,
        keep_checkpoints=max(opts.keep_checkpoints, opts.average_last),
        valid_every=opts.valid_every, progress=progress, valid_metrics=metric,
        best_metric=best, patience=opts.patience if best else None, reducer=reducer,
    )
    if latest is not None:
        trainer.load_checkpoint(latest)
    try:
        trainer.fit(opts.steps, max_time=opts.max_time, max_epochs=opts.max_epochs)
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        raise
    if w.is_root:
        model = _final_model(root, model, trainer, opts)
    w.barrier("waiting for rank 0 to save the model")
    if not w.is_root:
        model = Transformer.load(root / "model")
    return Translator(model, run.src_tok, run.tgt_tok)


def _final_model(root: pathlib.Path, model: Transformer, trainer: Trainer,
                 opts: TrainOptions) -> Transformer:
    """Writes ``root/model`` (the last, best or averaged weights) and returns that model."""
    ckpt_dir, out = root / "checkpoints", root / "model"
    if opts.average_last > 0:
        paths = last_checkpoints(ckpt_dir, opts.average_last)
        average_checkpoints(paths, out)
        return Transformer.load(out)
    best_dir = ckpt_dir / BEST_DIR
    if opts.final == "best" and trainer.best is not None and best_dir.is_dir():
        model = Transformer.load(best_dir)
    model.save(out)
    return model


def train_translator(
    train_src: Sequence[str],
    train_tgt: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    valid_src: Sequence[str] | None = None,
    valid_tgt: Sequence[str] | None = None,
    options: TrainOptions | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Translator:
    """Trains tokenizers and a Transformer on parallel text held in memory (lists of sentences)
    and saves everything in ``out_dir``. For corpora too large for memory, binarize them with
    ``preprocess`` and use ``train_translator_on_data``.

    With ``resume=True`` the tokenizers and the newest checkpoint in ``out_dir`` are reused and
    training continues where it stopped, bit-identically to an uninterrupted run.
    A KeyboardInterrupt saves a checkpoint before it propagates.

    Launched under MPI (``mpiexec -n N``), the N ranks train one model data-parallel: an update
    takes ``accumulate`` batches of ``max_tokens`` on each rank; rank 0 trains the tokenizers and
    writes everything (``out_dir`` must be on a file system every rank sees); a checkpoint
    resumes under any N with the same ``accumulate`` x N. Wrap the call in
    ``distributed.guard()`` so that an error on one rank ends all of them at once.
    """
    opts = options or TrainOptions()
    opts.check()
    _check_parallel(train_src, train_tgt, "training data")
    w = distributed.world()
    root = pathlib.Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    if resume:
        src_tok = load_tokenizer(root / "src_tokenizer.json")
        tgt_tok = load_tokenizer(root / "tgt_tokenizer.json")
    elif w.is_root:
        src_tok, tgt_tok = _make_tokenizers(train_src, train_tgt, opts)
        src_tok.save(root / "src_tokenizer.json")
        tgt_tok.save(root / "tgt_tokenizer.json")
    w.barrier("waiting for rank 0's tokenizers")
    if not resume and not w.is_root:
        src_tok = load_tokenizer(root / "src_tokenizer.json")
        tgt_tok = load_tokenizer(root / "tgt_tokenizer.json")
    if opts.shared_vocab:
        tgt_tok = src_tok
    pairs = _encode_pairs(src_tok, tgt_tok, train_src, train_tgt)
    longest = max(max(len(s), len(t) + 1) for s, t in pairs)
    run = _Run(src_tok, tgt_tok, lambda ids, mt, seed: TokenBatcher(pairs, mt, seed=seed, **ids),
               longest)
    if valid_src is not None and valid_tgt is not None:
        _check_parallel(valid_src, valid_tgt, "validation data")
        run.valid_pairs = _encode_pairs(src_tok, tgt_tok, valid_src, valid_tgt)
        run.valid_refs = list(valid_tgt)
        run.longest = max(longest, *(max(len(s), len(t) + 1) for s, t in run.valid_pairs))
    return _fit(root, run, opts, resume, progress)


def train_translator_on_data(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    options: TrainOptions | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Translator:
    """Trains a Transformer on a data directory written by ``preprocess`` (memory-mapped shards:
    memory does not grow with the corpus) and saves it in ``out_dir`` with the data's
    tokenizers. Validation uses the data's "valid" split when it has one. ``options`` as for
    ``train_translator`` (its tokenizer settings are the data's and are ignored here)."""
    opts = options or TrainOptions()
    opts.check()
    data = open_data(data_dir)
    meta = data.meta
    root = pathlib.Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    src_tok = load_tokenizer(data.path(meta["src_tokenizer"]))
    joint = meta["src_tokenizer"] == meta["tgt_tokenizer"] or (
        pathlib.Path(data.path(meta["src_tokenizer"])).read_bytes()
        == pathlib.Path(data.path(meta["tgt_tokenizer"])).read_bytes()
    )
    tgt_tok = src_tok if joint else load_tokenizer(data.path(meta["tgt_tokenizer"]))
    if distributed.world().is_root:
        src_tok.save(root / "src_tokenizer.json")
        tgt_tok.save(root / "tgt_tokenizer.json")
    train = data.split("train")
    lengths = data.manifest["splits"]
    longest = max(max(e["max_length"]["src"], e["max_length"]["tgt"] + 1)
                  for e in lengths.values())
    run = _Run(src_tok, tgt_tok, lambda ids, mt, seed: ShardBatcher(
        train, mt, seed=seed, corpus_id=data.id, **ids), longest)
    if "valid" in data.splits:
        run.valid_pairs = data.split("valid").pairs()
        text = meta.get("valid_text")
        if text:
            run.valid_refs = split_lines(
                pathlib.Path(data.path(text["tgt"])).read_text(encoding="utf-8")
            )
    return _fit(root, run, opts, resume, progress)
