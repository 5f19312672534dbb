"""A tokenizer over a fixed token list: the form imported models bring their vocabularies in.

`VocabTokenizer` maps pieces to ids through a vocabulary (a list of token strings, the id of a
token its index), the pieces coming from a SentencePiece model or, without one, from splitting
on whitespace. It covers Hugging Face's MarianTokenizer (SentencePiece pieces looked up in
`vocab.json`, `</s>` appended to the source, a leading `>>xx<<` language code kept as one token)
and CTranslate2 vocabularies (whitespace tokens in and out).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from typing import Any

from ..checks import check_bool
from ..io import atomic_write_text


class VocabTokenizer:
    """Pieces <-> ids through a token list.

    tokens: the vocabulary, index = id (no duplicates). sentencepiece: a serialized
    SentencePiece model (bytes) that splits text into pieces and joins them back, or None to
    split on whitespace and join with single spaces. pad/eos/unk/bos: the special tokens'
    strings (bos may be None when the vocabulary has none); append_eos: `encode` ends every
    sequence with the eos id (Marian's source side). Unknown pieces map to unk. skip: the
    tokens `decode_tokens` leaves out (default pad, eos, bos; `decode` also drops unk).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        sentencepiece: bytes | None = None,
        *,
        pad: str = "<pad>",
        eos: str = "</s>",
        unk: str = "<unk>",
        bos: str | None = None,
        append_eos: bool = False,
        skip: Sequence[str] | None = None,
    ) -> None:
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
            raise TypeError("tokens: expected a list of strings")
        self.itos = list(tokens)
        if not self.itos:
            raise ValueError("tokens: empty vocabulary")
        self.stoi = {}
        for i, t in enumerate(self.itos):
            if t in self.stoi:
                raise ValueError(f"tokens: {t!r} appears twice (ids {self.stoi[t]} and {i})")
            self.stoi[t] = i
        self.specials = {"pad": pad, "eos": eos, "unk": unk, "bos": bos}
        for role, token in self.specials.items():
            if token is not None and token not in self.stoi:
                raise ValueError(f"{role}: special token {token!r} is not in the vocabulary")
        self.pad_id = self.stoi[pad]
        self.eos_id = self.stoi[eos]
        self.unk_id = self.stoi[unk]
        self.bos_id = self.stoi[bos] if bos is not None else self.pad_id
        self.append_eos = check_bool("append_eos", append_eos)
        # Left out of decoded output: pad, eos, bos (decoder start), and in text also unk.
        if skip is None:
            skip = [t for k, t in self.specials.items() if t is not None and k != "unk"]
        unknown = [t for t in skip if t not in self.stoi]
        if unknown:
            raise ValueError(f"skip: {unknown} are not in the vocabulary")
        self.skip = list(skip)
        self._control_ids = {self.stoi[t] for t in self.skip}
        self.sentencepiece = sentencepiece
        self.sp = None
        if sentencepiece is not None:
            if not isinstance(sentencepiece, bytes):
                raise TypeError("sentencepiece: expected the serialized model as bytes")
            self.sp = _processor(sentencepiece)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def tokens(self, text: str) -> list[str]:
        """The pieces of text (without the appended eos)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a string, got {type(text).__name__}")
        code, rest = _split_language_code(text)
        if self.sp is None:
            return code + rest.split()
        return code + list(self.sp.encode(rest, out_type=str))

    def encode_tokens(self, pieces: Sequence[str]) -> list[int]:
        """Ids of pieces (unknown ones: unk), plus eos when append_eos."""
        ids = [self.stoi.get(p, self.unk_id) for p in pieces]
        return ids + [self.eos_id] if self.append_eos else ids

    def encode(self, text: str) -> list[int]:
        return self.encode_tokens(self.tokens(text))

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """The pieces of ids; pad, eos, bos and out-of-range ids left out (unk kept)."""
        n = len(self.itos)
        return [self.itos[i] for i in map(int, ids) if 0 <= i < n and i not in self._control_ids]

    def decode(self, ids: Sequence[int]) -> str:
        """With a SentencePiece model: detokenised text, the special tokens, unk included, left
        out (as Hugging Face's skip_special_tokens). Without: the `decode_tokens` joined by
        spaces (unk kept, as CTranslate2 writes it)."""
        if self.sp is None:
            return " ".join(self.decode_tokens(ids))
        unk = self.itos[self.unk_id]
        pieces = [p for p in self.decode_tokens(ids) if p != unk]
        return self.sp.decode_pieces(pieces).replace("\u2581", " ").strip()

    def to_dict(self) -> dict[str, Any]:
        blob = None if self.sentencepiece is None else base64.b64encode(self.sentencepiece).decode()
        return {"type": "vocab", "tokens": self.itos, "sentencepiece": blob,
                "append_eos": self.append_eos, "skip": self.skip, **self.specials}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabTokenizer:
        blob = d.get("sentencepiece")
        return cls(
            d["tokens"], None if blob is None else base64.b64decode(blob), pad=d["pad"],
            eos=d["eos"], unk=d["unk"], bos=d.get("bos"), append_eos=bool(d.get("append_eos")),
            skip=d.get("skip"),
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))


def _split_language_code(text: str) -> tuple[list[str], str]:
    """A leading ">>xx<<" target-language code (multilingual OPUS-MT) is one token."""
    if text.startswith(">>"):
        end = text.find("<<")
        if end != -1:
            return [text[: end + 2]], text[end + 2 :]
    return [], text


def _processor(blob: bytes) -> Any:
    try:
        import sentencepiece
    except ImportError as exc:
        raise ImportError(
            "SentencePiece is not installed: pip install sentencepiece (this tokenizer has a "
            "SentencePiece model)"
        ) from exc
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=blob)
    except RuntimeError as exc:
        raise ValueError(f"sentencepiece: not a valid SentencePiece model ({exc})") from None
