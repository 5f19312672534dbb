"""Tokenizers: a built-in character-level one (numpy only) and SentencePiece (the `demo` extra).

Both share ids 0..3 for the special tokens so a model config can rely on them:
``pad_id=0, bos_id=1, eos_id=2, unk_id=3``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

from ..io import atomic_write_text
from .vocab import VocabTokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


class Tokenizer(Protocol):
    """What the trainer, the CLI and the demo need from a tokenizer."""

    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def tokens(self, text: str) -> list[str]: ...

    def save(self, path: str | os.PathLike) -> None: ...


class CharTokenizer:
    """One id per character seen in the training text; unseen characters map to ``<unk>``."""

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars):
            raise ValueError("chars: characters must be unique")
        if any(len(c) != 1 for c in chars):
            raise ValueError("chars: every entry must be a single character")
        self.itos = list(SPECIALS) + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos) if i >= len(SPECIALS)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Builds the vocabulary from the characters of ``texts`` (sorted: reproducible)."""
        chars = sorted({c for text in texts for c in text})
        if not chars:
            raise ValueError("texts: no characters to build a vocabulary from")
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, UNK_ID) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS) and i < len(self.itos))

    def tokens(self, text: str) -> list[str]:
        return list(text)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps({"type": "char", "chars": self.itos[len(SPECIALS):]}))


class SentencePieceTokenizer:
    """A SentencePiece model with the special-token ids above (``pip install sentencepiece``)."""

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, model_proto: bytes):
        spm = _import_sentencepiece()
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8000, model_type: str = "unigram"
    ) -> SentencePieceTokenizer:
        """Trains on ``texts``; a vocabulary larger than the text allows is shrunk to fit."""
        spm = _import_sentencepiece()
        lines = [t for t in texts if t.strip()]
        if not lines:
            raise ValueError("texts: no non-empty lines to train SentencePiece on")
        try:
            return cls(_train_sentencepiece(spm, lines, vocab_size, model_type))
        except RuntimeError as exc:
            # SentencePiece names the largest vocabulary the text supports; retry with it.
            fit = re.search(r"value <= (\d+)", str(exc))
            if not fit:
                raise
            return cls(_train_sentencepiece(spm, lines, int(fit.group(1)), model_type))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) > UNK_ID])

    def tokens(self, text: str) -> list[str]:
        return list(self.sp.encode(text, out_type=str))

    def save(self, path: str | os.PathLike) -> None:
        blob = base64.b64encode(self.model_proto).decode()
        atomic_write_text(path, json.dumps({"type": "sentencepiece", "model": blob}))


def load_tokenizer(
    path: str | os.PathLike,
) -> CharTokenizer | SentencePieceTokenizer | VocabTokenizer:
    """Loads a tokenizer written by ``save``."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
        kind = data["type"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"path: {path} is not a pytransformer tokenizer file ({exc})") from exc
    if kind == "char":
        return CharTokenizer(data["chars"])
    if kind == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(data["model"]))
    if kind == "vocab":  # an imported model's vocabulary (text.vocab)
        try:
            return VocabTokenizer.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"path: {path} is not a valid vocab tokenizer ({exc})") from exc
    raise ValueError(f"path: unknown tokenizer type {kind!r} in {path}")


def _train_sentencepiece(spm, lines: list[str], vocab_size: int, model_type: str) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        character_coverage=1.0, minloglevel=2,
    )
    return buf.getvalue()


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as exc:
        raise ImportError(
            "SentencePiece is not installed: pip install 'pytransformer[demo]' or use CharTokenizer"
        ) from exc
    return sentencepiece
