"""Logit processors: what a decoding step does to the logits before they become probabilities.

CTranslate2's order, which only matters for the penalty (masks set a fixed value): first the
repetition penalty rescales the logits of tokens already in the hypothesis, then every mask
sets its tokens to -inf (never emitted): n-grams that would repeat, the always-suppressed tokens
(single-token suppress_sequences, the unknown token with disable_unk, the model's
config.suppress_ids), the last token of each longer suppressed sequence whose other tokens end
the hypothesis, and the end tokens while a hypothesis is shorter than its minimum length.

A hypothesis' history is an int64 matrix (rows, L), right-aligned: row r's tokens are the last
ones of its row, earlier columns hold -1 (a row that saw fewer tokens, or whose history starts
later); -1 never equals a token id, so a comparison with a short row fails by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["LogitsProcessors"]


@dataclass
class LogitsProcessors:
    """The per-step logit edits of one decoding call.

    always: token ids masked at every step; sequences: suppressed sequences of 2+ tokens;
    repetition_penalty: a previous token's logit is divided by it when positive, multiplied when
    negative (> 1 discourages repeats); no_repeat_ngram_size: 0 or n, a token that would
    complete an n-gram already in the hypothesis is masked.
    """

    always: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sequences: list[np.ndarray] = field(default_factory=list)
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @property
    def needs_history(self) -> bool:
        return bool(self.sequences) or self.repetition_penalty != 1.0 or (
            self.no_repeat_ngram_size > 0
        )

    def apply(self, x: np.ndarray, hist: np.ndarray | None) -> None:
        """Edits logits x (rows, V) in place; hist (rows, L) as the module docstring says (None
        or L = 0: no history yet)."""
        has_hist = hist is not None and hist.shape[1] > 0
        if has_hist and self.repetition_penalty != 1.0:
            _penalize(x, hist, self.repetition_penalty)
        if has_hist and self.no_repeat_ngram_size > 0:
            _ban_ngrams(x, hist, self.no_repeat_ngram_size)
        if self.always.size:
            x[:, self.always] = -np.inf
        if has_hist:
            L = hist.shape[1]
            for seq in self.sequences:
                m = seq.size - 1
                if L < m:
                    continue
                rows = np.flatnonzero((hist[:, L - m :] == seq[:-1]).all(axis=1))
                if rows.size:
                    x[rows, seq[-1]] = -np.inf


def _penalize(x: np.ndarray, hist: np.ndarray, penalty: float) -> None:
    r, c = np.nonzero(hist >= 0)
    tok = hist[r, c]
    v = x[r, tok]
    # A token seen twice is written twice with the same value: both read the logit before.
    x[r, tok] = np.where(v < 0, v * penalty, v / penalty)


def _ban_ngrams(x: np.ndarray, hist: np.ndarray, n: int) -> None:
    """Masks every token t such that (last n-1 tokens, t) already occurs in the row; rows whose
    history is shorter than n are left alone (CTranslate2's rule)."""
    L = hist.shape[1]
    if L < n:
        return
    win = np.lib.stride_tricks.sliding_window_view(hist, n, axis=1)  # (rows, L-n+1, n)
    # Right-aligned: a window whose first token is real lies inside the row's history, and a row
    # with fewer than n tokens has no such window.
    match = win[:, :, 0] >= 0
    if n > 1:
        match &= (win[:, :, : n - 1] == hist[:, None, L - n + 1 :]).all(axis=2)
    r, w = np.nonzero(match)
    if r.size:
        x[r, win[r, w, n - 1]] = -np.inf
