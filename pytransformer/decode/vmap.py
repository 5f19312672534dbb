"""Vocabulary shortlists ("vmap", CTranslate2's `use_vmap`): a map from source tokens (or source
n-grams) to the target tokens a translation of them may use. The union over a batch's sources,
plus the tokens that are always allowed, is the `vocab_subset` a decoder state scores instead of
the whole target vocabulary (`Transformer.init_decoder_state(..., vocab_subset=...)`).

The file format is CTranslate2's: UTF-8 text, one rule per line,

    src_1 src_2 ... src_n<TAB>tgt_1 tgt_2 ... tgt_k

tokens separated by single spaces; the line with an empty source side lists the target tokens
every batch may use. Tokens are strings, so reading and writing take lookups between tokens and
ids (a dict, a list indexed by id, or a callable). Differences from CTranslate2, on purpose: a
line without a tab is an error (CTranslate2 reads it as a rule of its own), blank lines are
skipped (CTranslate2 lets one replace the always-allowed line), and repeated source sides add up
(CTranslate2 keeps the last). Unknown tokens are skipped and counted by default (`skipped`);
``unknown="error"`` rejects them, naming the file and line.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..checks import check_int
from ..io import atomic_write_text

__all__ = ["VocabMap", "VMAP_FILE", "load_vmap"]

VMAP_FILE = "vmap.txt"  # the name of a model directory's vocabulary map

Key = tuple[int, ...]


class VocabMap:
    """Source token ids (or n-grams of them) -> the target ids a translation may use.

    rules: a mapping {source id or tuple of source ids: target ids} (a tuple of n ids is an
    n-gram of consecutive source tokens; the empty tuple adds to `always`), or a list whose
    entry i holds the target ids of source id i. always: target ids every subset contains (the
    special tokens: eos at least, for the searches to end). tgt_vocab_size: when given, every
    target id must lie in [0, tgt_vocab_size).

    Raises:
        TypeError: rules is neither a mapping nor a list, or a key or id is not an int.
        ValueError: an n-gram key is not a tuple of ints.
        IndexError: an id is negative, or a target id is >= tgt_vocab_size.
    """

    def __init__(
        self,
        rules: Mapping[Any, Iterable[int]] | Sequence[Iterable[int]],
        always: Iterable[int] = (),
        *,
        tgt_vocab_size: int | None = None,
    ) -> None:
        self.tgt_vocab_size = (
            None if tgt_vocab_size is None else check_int("tgt_vocab_size", tgt_vocab_size, 1)
        )
        if isinstance(rules, Mapping):
            items = list(rules.items())
        elif isinstance(rules, Sequence) and not isinstance(rules, (str, bytes)):
            items = list(enumerate(rules))
        else:
            raise TypeError(
                "rules: expected a mapping or a list of target-id lists, got "
                f"{type(rules).__name__}"
            )
        fixed = [self._targets("always", always)]
        merged: dict[Key, list[np.ndarray]] = {}
        for key, targets in items:
            k = _key(key)
            ids = self._targets(f"rules[{key!r}]", targets)
            if k:
                merged.setdefault(k, []).append(ids)
            else:
                fixed.append(ids)
        self._rules = {k: _union(v) for k, v in merged.items()}
        self.always = _union(fixed)
        self.max_ngram = max((len(k) for k in self._rules), default=1)
        self.skipped = {"rules": 0, "targets": 0}  # what from_file left out (unknown tokens)

    def _targets(self, name: str, ids: Iterable[int]) -> np.ndarray:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Iterable, np.ndarray)):
            raise TypeError(f"{name}: expected target ids, got {type(ids).__name__}")
        out = np.array([_id(name, i) for i in ids], np.int64)
        n = self.tgt_vocab_size
        if n is not None and out.size and out.max() >= n:
            raise IndexError(f"{name}: target id {int(out.max())} is out of range [0, {n})")
        return out

    @property
    def rules(self) -> dict[Key, np.ndarray]:
        """{source n-gram (a tuple of ids): sorted unique target ids}, a copy."""
        return {k: v.copy() for k, v in self._rules.items()}

    def __len__(self) -> int:
        return len(self._rules)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VocabMap):
            return NotImplemented
        return (
            np.array_equal(self.always, other.always)
            and self._rules.keys() == other._rules.keys()
            and all(np.array_equal(v, other._rules[k]) for k, v in self._rules.items())
        )

    def __repr__(self) -> str:
        return (
            f"VocabMap({len(self._rules)} rules, max_ngram={self.max_ngram}, "
            f"{self.always.size} always allowed)"
        )

    def candidates(self, source: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sorted unique target ids for one source sequence: `always` and the targets of every
        n-gram of it (n <= max_ngram) that has a rule."""
        return self.subset([source])

    def subset(self, sources: Iterable[Sequence[int] | np.ndarray]) -> np.ndarray:
        """The union of `candidates` over a batch of source id sequences: a sorted unique int64
        array, as `vocab_subset` takes it. Padding ids may stay in (a pad id without a rule adds
        nothing).

        Raises:
            TypeError: sources is not a list of integer sequences.
            ValueError: a source is not 1-D.
            IndexError: a source id is negative.
        """
        if isinstance(sources, (str, bytes)) or not isinstance(sources, (Iterable, np.ndarray)):
            raise TypeError(
                f"sources: expected a list of source id sequences, got {type(sources).__name__}"
            )
        parts = [self.always]
        rules = self._rules
        for i, seq in enumerate(sources):
            ids = _source_ids(f"sources[{i}]", seq)
            for n in range(1, self.max_ngram + 1):
                for j in range(len(ids) - n + 1):
                    hit = rules.get(tuple(ids[j : j + n]))
                    if hit is not None:
                        parts.append(hit)
        return _union(parts)

    # -- files --------------------------------------------------------------------------------
    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        src_token_to_id: Mapping[str, int] | Callable[[str], int | None],
        tgt_token_to_id: Mapping[str, int] | Callable[[str], int | None],
        *,
        always: Iterable[int] = (),
        unknown: str = "skip",
        tgt_vocab_size: int | None = None,
    ) -> VocabMap:
        """Reads a vmap file (format in the module docstring). The lookups map a token to its
        id; a token they do not know (a dict without it, a callable returning None or raising
        KeyError) is unknown. unknown="skip": a rule with an unknown source token is left out,
        an unknown target token is dropped from its rule, both counted in `skipped`;
        unknown="error": ValueError. A lookup that maps unknown tokens to an unk id (as
        tokenizers do) makes them that id, which is what CTranslate2 does. always: target ids
        added to the file's always-allowed line (the special tokens).

        Raises:
            OSError: the file cannot be read.
            ValueError: not UTF-8, a line without a tab or with two, an unknown token with
                unknown="error" (each naming the file and line).
            TypeError: a lookup returns something other than an int.
        """
        if unknown not in ("skip", "error"):
            raise ValueError(f"unknown: expected 'skip' or 'error', got {unknown!r}")
        src = _lookup("src_token_to_id", src_token_to_id)
        tgt = _lookup("tgt_token_to_id", tgt_token_to_id)
        raw = pathlib.Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        rules: list[tuple[Key, list[int]]] = []
        skipped = {"rules": 0, "targets": 0}
        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if line.count("\t") != 1:
                what = "no tab" if "\t" not in line else "more than one tab"
                raise ValueError(
                    f"{where}: {what} (expected 'source tokens<TAB>target tokens')"
                )
            left, right = line.split("\t")
            key_tokens = [t for t in left.split(" ") if t]
            key_ids = [src(where, t) for t in key_tokens]
            if None in key_ids:
                if unknown == "error":
                    bad = key_tokens[key_ids.index(None)]
                    raise ValueError(f"{where}: unknown source token {bad!r}")
                skipped["rules"] += 1
                continue
            targets = []
            for t in (t for t in right.split(" ") if t):
                i = tgt(where, t)
                if i is None:
                    if unknown == "error":
                        raise ValueError(f"{where}: unknown target token {t!r}")
                    skipped["targets"] += 1
                else:
                    targets.append(i)
            rules.append((tuple(key_ids), targets))
        merged: dict[Key, list[int]] = {}
        for k, v in rules:
            merged.setdefault(k, []).extend(v)
        vmap = cls(merged, always, tgt_vocab_size=tgt_vocab_size)
        vmap.skipped = skipped
        return vmap

    def to_file(
        self,
        path: str | os.PathLike,
        src_id_to_token: Sequence[str] | Mapping[int, str] | Callable[[int], str | None],
        tgt_id_to_token: Sequence[str] | Mapping[int, str] | Callable[[int], str | None],
    ) -> None:
        """Writes the map in the vmap format (atomically): the always-allowed line first, then
        one line per rule, sorted by source ids. The lookups map an id to its token (a list
        indexed by id, a dict, or a callable).

        Raises:
            ValueError: an id has no token, or a token is empty or holds a space, tab or newline
                (the format could not read it back).
        """
        src = _reverse("src_id_to_token", src_id_to_token)
        tgt = _reverse("tgt_id_to_token", tgt_id_to_token)
        lines = ["\t" + " ".join(tgt("tgt_id_to_token", i) for i in self.always.tolist())]
        for key in sorted(self._rules):
            left = " ".join(src("src_id_to_token", i) for i in key)
            right = " ".join(tgt("tgt_id_to_token", i) for i in self._rules[key].tolist())
            lines.append(f"{left}\t{right}")
        atomic_write_text(path, "\n".join(lines) + "\n")


def load_vmap(
    directory: str | os.PathLike,
    src_token_to_id: Mapping[str, int] | Callable[[str], int | None],
    tgt_token_to_id: Mapping[str, int] | Callable[[str], int | None],
    *,
    always: Iterable[int] = (),
    unknown: str = "skip",
    tgt_vocab_size: int | None = None,
) -> VocabMap | None:
    """The VocabMap of a model directory's `VMAP_FILE` (see `VocabMap.from_file`), or None when
    the directory has none."""
    path = pathlib.Path(directory) / VMAP_FILE
    if not path.is_file():
        return None
    return VocabMap.from_file(
        path, src_token_to_id, tgt_token_to_id, always=always, unknown=unknown,
        tgt_vocab_size=tgt_vocab_size,
    )


def _id(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected int ids, got {type(value).__name__}")
    if value < 0:
        raise IndexError(f"{name}: id {int(value)} is negative")
    return int(value)


def _key(key: Any) -> Key:
    if isinstance(key, tuple):
        return tuple(_id(f"rules key {key!r}", i) for i in key)
    if isinstance(key, (list, str, bytes)):
        raise ValueError(f"rules: key {key!r} must be an int or a tuple of ints (an n-gram)")
    return (_id("rules key", key),)


def _union(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p.size]
    if not parts:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate(parts)).astype(np.int64, copy=False)


def _source_ids(name: str, seq: Any) -> list[int]:
    if isinstance(seq, (str, bytes)):
        raise TypeError(f"{name}: expected a sequence of ids, got {type(seq).__name__}")
    arr = np.asarray(seq)
    if arr.size == 0:
        return []
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of ids, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer ids, got dtype {arr.dtype}")
    if (arr < 0).any():
        raise IndexError(f"{name}: id {int(arr[arr < 0][0])} is negative")
    return arr.tolist()


def _lookup(name: str, table: Any) -> Callable[[str, str], int | None]:
    """token -> id or None (unknown), from a mapping or a callable."""
    if isinstance(table, Mapping):
        get = table.get
    elif callable(table):
        def get(token: str) -> Any:
            try:
                return table(token)
            except KeyError:
                return None
    else:
        raise TypeError(f"{name}: expected a dict or a callable, got {type(table).__name__}")

    def find(where: str, token: str) -> int | None:
        i = get(token)
        if i is None:
            return None
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or i < 0:
            raise TypeError(f"{where}: {name} gave {i!r} for {token!r}, expected an id >= 0")
        return int(i)

    return find


def _reverse(name: str, table: Any) -> Callable[[str, int], str]:
    """id -> token from a list, a mapping or a callable; a token the format can hold."""
    if isinstance(table, Mapping):
        get = table.get
    elif isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        def get(i: int) -> Any:
            return table[i] if i < len(table) else None
    elif callable(table):
        get = table
    else:
        raise TypeError(
            f"{name}: expected a list, a dict or a callable, got {type(table).__name__}"
        )

    def token(what: str, i: int) -> str:
        t = get(i)
        if not isinstance(t, str):
            raise ValueError(f"{what}: no token for id {i} (got {t!r})")
        if not t or any(c in t for c in " \t\n\r"):
            raise ValueError(f"{what}: token {t!r} of id {i} cannot be written in a vmap file")
        return t

    return token
