"""``pytransformer preprocess``: parallel text files to a binarized data directory.

Trains the tokenizer(s) on a sample of the corpus, encodes it block by block (memory stays flat in
the corpus size) into the memory-mapped shards of ``train.shards``, filters pairs a translation
model should not learn from, and writes the manifest last. Lines are what ``io.split_lines``
calls lines: text between "\\n" characters, one trailing "\\r" dropped; U+2028, form feeds and
the other characters ``str.splitlines`` would break at stay inside their line, so the two sides
stay aligned.

The data directory holds, besides the shards and the manifest, ``src_tokenizer.json`` and
``tgt_tokenizer.json`` (the same model twice for a joint vocabulary) and, when a validation set
was given, its raw text ``valid.src.txt`` / ``valid.tgt.txt`` (the references of validation BLEU).
"""

from __future__ import annotations

import io as pyio
import itertools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from . import io
from .checks import check_float, check_int
from .text.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    CharTokenizer,
    SentencePieceTokenizer,
    _import_sentencepiece,
)
from .train.shards import ShardWriter, begin_data_dir, open_data, write_manifest

__all__ = ["PreprocessOptions", "FilterReport", "preprocess", "read_lines"]

_BLOCK = 10_000  # lines encoded and written together
_OWN_FILES = ("src_tokenizer.json", "tgt_tokenizer.json", "valid.src.txt", "valid.tgt.txt")


@dataclass
class PreprocessOptions:
    """Settings of ``preprocess`` (the CLI flags of the same names).

    tokenizer: "sentencepiece" (unigram) or "char"; vocab_size: SentencePiece pieces per model
    (shrunk when the text is too small for it); joint: one vocabulary for both languages
    (needed for tied source/target embeddings); vocab_sample, vocab_sample_bytes: at most this
    many sentences, and about this many bytes of text, sampled evenly from the whole corpus,
    train each SentencePiece model (its training holds some 25 bytes per character: the byte
    budget is what bounds preprocess's peak memory, about 0.5 GB at the default); max_len:
    pairs with more tokens than this on either side are dropped; max_ratio:
    pairs whose longer side has more than this many times the tokens of the shorter are dropped
    (Moses' clean-corpus-n uses 9); shard_size: sentence pairs per shard.
    """

    tokenizer: str = "sentencepiece"
    vocab_size: int = 8000
    joint: bool = True
    vocab_sample: int = 1_000_000
    vocab_sample_bytes: int = 16_000_000
    max_len: int = 250
    max_ratio: float = 9.0
    shard_size: int = 1_000_000

    def __post_init__(self) -> None:
        if self.tokenizer not in ("sentencepiece", "char"):
            raise ValueError(
                f"tokenizer: expected 'sentencepiece' or 'char', got {self.tokenizer!r}"
            )
        check_int("vocab_size", self.vocab_size, 8)
        check_int("vocab_sample", self.vocab_sample, 1)
        check_int("vocab_sample_bytes", self.vocab_sample_bytes, 1)
        check_int("max_len", self.max_len, 1)
        check_float("max_ratio", self.max_ratio, 1.0)
        check_int("shard_size", self.shard_size, 1)


@dataclass
class FilterReport:
    """What ``preprocess`` read and kept: pairs read, kept, and dropped for an empty side, for a
    side over max_len tokens, or for a length ratio over max_ratio (each pair counted once, under
    the first reason in that order)."""

    read: int = 0
    kept: int = 0
    empty: int = 0
    too_long: int = 0
    ratio: int = 0
    examples: dict[str, int] = field(default_factory=dict)  # reason -> first line number (1-based)

    def drop(self, reason: str, line: int) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        self.examples.setdefault(reason, line)

    def summary(self) -> str:
        parts = [f"{self.read} pairs read, {self.kept} kept"]
        for reason, what in (("empty", "an empty side"), ("too_long", "over max_len tokens"),
                             ("ratio", "a length ratio over max_ratio")):
            n = getattr(self, reason)
            if n:
                parts.append(f"{n} dropped for {what} (first: line {self.examples[reason]})")
        return "; ".join(parts)


def read_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a UTF-8 file, streamed, with ``io.split_lines`` semantics ("\\n" only)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        yield from io.iter_lines(f, path)


def _pairs(src: str, tgt: str) -> Iterator[tuple[str, str]]:
    """Aligned lines of two files; a different line count is an error (found at the end)."""
    n = 0
    for n, pair in enumerate(itertools.zip_longest(read_lines(src), read_lines(tgt)), 1):
        if pair[0] is None or pair[1] is None:
            short, long_ = (src, tgt) if pair[0] is None else (tgt, src)
            raise ValueError(f"{short} has {n - 1} lines but {long_} has more")
        yield pair  # type: ignore[misc]
    if n == 0:
        raise ValueError(f"{src}: no lines")


def _check_aligned(src: str, tgt: str) -> int:
    """The number of lines of both files (one streaming pass that also checks UTF-8), before
    any work: a ValueError when the counts differ or the files are empty."""
    n_src, n_tgt = (sum(1 for _ in read_lines(p)) for p in (src, tgt))
    if n_src != n_tgt:
        raise ValueError(f"{src} has {n_src} lines but {tgt} has {n_tgt}")
    if n_src == 0:
        raise ValueError(f"{src}: no lines")
    return n_src


def _sample_lines(paths: list[str], limit: int, limit_bytes: int, per_file: int) -> list[str]:
    """Up to ``limit`` non-empty lines (and about ``limit_bytes`` of text) drawn evenly from the
    files (every k-th line), so the vocabulary sees the whole corpus, not its beginning, in
    bounded memory."""
    total = per_file * len(paths)
    size = sum(os.path.getsize(p) for p in paths)
    step = max(1, -(-total // limit), -(-size // limit_bytes))
    lines = []
    for p in paths:
        lines += [line for i, line in enumerate(read_lines(p)) if i % step == 0 and line.strip()]
    return lines[:limit]


def _train_sentencepiece(lines: list[str], vocab_size: int) -> SentencePieceTokenizer:
    spm = _import_sentencepiece()
    if not lines:
        raise ValueError("no non-empty lines to train SentencePiece on")

    def run(size: int) -> bytes:
        buf = pyio.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=size,
            model_type="unigram", pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            character_coverage=1.0, minloglevel=2, input_sentence_size=0,
        )
        return buf.getvalue()

    try:
        return SentencePieceTokenizer(run(vocab_size))
    except RuntimeError as exc:  # the text supports fewer pieces: SentencePiece names how many
        fit = re.search(r"value <= (\d+)", str(exc))
        if not fit:
            raise
        return SentencePieceTokenizer(run(int(fit.group(1))))


def _char_tokenizer(paths: list[str]) -> CharTokenizer:
    chars: set[str] = set()
    for p in paths:
        for line in read_lines(p):
            chars.update(line)
    return CharTokenizer.train(["".join(sorted(chars))])


def _tokenizers(src: str, tgt: str, n_lines: int, opts: PreprocessOptions,
                log: Callable[[str], None]):
    def build(paths: list[str]):
        if opts.tokenizer == "char":
            return _char_tokenizer(paths)
        lines = _sample_lines(paths, opts.vocab_sample, opts.vocab_sample_bytes, n_lines)
        log(f"training SentencePiece (vocab {opts.vocab_size}) on {len(lines)} lines")
        return _train_sentencepiece(lines, opts.vocab_size)

    if opts.joint:
        shared = build([src, tgt])
        return shared, shared
    return build([src]), build([tgt])


def _encoder(tok: Any) -> Callable[[list[str]], list[list[int]]]:
    sp = getattr(tok, "sp", None)
    if sp is not None:  # SentencePiece encodes a whole block in one call
        return lambda lines: sp.encode(lines)
    return lambda lines: [tok.encode(line) for line in lines]


def _keep(ls: int, lt: int, opts: PreprocessOptions) -> str | None:
    """The reason to drop a pair of these token lengths, or None to keep it."""
    if ls == 0 or lt == 0:
        return "empty"
    if ls > opts.max_len or lt > opts.max_len:
        return "too_long"
    if max(ls, lt) > opts.max_ratio * min(ls, lt):
        return "ratio"
    return None


def _encode_split(
    src: str, tgt: str, writer: ShardWriter, encoders: tuple, opts: PreprocessOptions | None,
    report: FilterReport,
) -> dict[str, Any]:
    """Encodes the pairs block by block into ``writer``; ``opts`` None keeps every pair."""
    enc_src, enc_tgt = encoders
    pairs = _pairs(src, tgt)
    line = 0
    while block := list(itertools.islice(pairs, _BLOCK)):
        s_ids = enc_src([s for s, _ in block])
        t_ids = enc_tgt([t for _, t in block])
        keep_s, keep_t = [], []
        for a, b in zip(s_ids, t_ids, strict=True):
            line += 1
            reason = None if opts is None else _keep(len(a), len(b), opts)
            if reason is None:
                keep_s.append(a)
                keep_t.append(b)
            else:
                report.drop(reason, line)
        report.read += len(block)
        report.kept += len(keep_s)
        writer.add_pairs(keep_s, keep_t)
    return writer.close()


def _copy_text(src_path: str, dst_path: str) -> None:
    """The lines of a file, rewritten with "\\n" line ends (split_lines semantics)."""
    with io.atomic_open(dst_path, "w") as out:
        for line in read_lines(src_path):
            out.write(line + "\n")


def preprocess(
    src: str | os.PathLike,
    tgt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    valid_src: str | os.PathLike | None = None,
    valid_tgt: str | os.PathLike | None = None,
    options: PreprocessOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> FilterReport:
    """Builds the data directory ``out_dir`` from the parallel files ``src``/``tgt`` (and an
    optional validation pair of files, encoded without filtering). Returns what was filtered.

    The manifest is written last; an interrupted run (or one that fails) leaves a directory that
    ``train`` refuses. Raises ValueError for misaligned or non-UTF-8 files, or when no pair
    survives the filters."""
    opts = options or PreprocessOptions()
    log = log or (lambda _msg: None)
    src, tgt, out_dir = os.fspath(src), os.fspath(tgt), os.fspath(out_dir)
    if (valid_src is None) != (valid_tgt is None):
        raise ValueError("valid_src/valid_tgt: give both or neither")
    n_lines = _check_aligned(src, tgt)
    if valid_src is not None and valid_tgt is not None:
        _check_aligned(os.fspath(valid_src), os.fspath(valid_tgt))
    begin_data_dir(out_dir, _OWN_FILES)
    src_tok, tgt_tok = _tokenizers(src, tgt, n_lines, opts, log)
    src_tok.save(os.path.join(out_dir, "src_tokenizer.json"))
    tgt_tok.save(os.path.join(out_dir, "tgt_tokenizer.json"))
    encoders = (_encoder(src_tok), _encoder(tgt_tok))
    report = FilterReport()
    log("encoding the training pairs")
    splits = {"train": _encode_split(src, tgt, ShardWriter(out_dir, "train", opts.shard_size),
                                     encoders, opts, report)}
    if report.kept == 0:
        raise ValueError(f"{src}: no sentence pair survives the filters ({report.summary()})")
    if valid_src is not None and valid_tgt is not None:
        valid_src, valid_tgt = os.fspath(valid_src), os.fspath(valid_tgt)
        splits["valid"] = _encode_split(
            valid_src, valid_tgt, ShardWriter(out_dir, "valid", opts.shard_size), encoders,
            None, FilterReport(),
        )
        _copy_text(valid_src, os.path.join(out_dir, "valid.src.txt"))
        _copy_text(valid_tgt, os.path.join(out_dir, "valid.tgt.txt"))
    meta = {
        "src_tokenizer": "src_tokenizer.json", "tgt_tokenizer": "tgt_tokenizer.json",
        "src_vocab_size": src_tok.vocab_size, "tgt_vocab_size": tgt_tok.vocab_size,
        "pad_id": src_tok.pad_id, "bos_id": tgt_tok.bos_id, "eos_id": tgt_tok.eos_id,
        "options": asdict(opts), "filtered": asdict(report),
        "sources": {"src": os.path.abspath(src), "tgt": os.path.abspath(tgt)},
    }
    if "valid" in splits:
        meta["valid_text"] = {"src": "valid.src.txt", "tgt": "valid.tgt.txt"}
    write_manifest(out_dir, splits, meta)
    open_data(out_dir)  # reads back what was written: sizes and offsets agree
    return report
