"""The demo task: English number words to German number words.

"three hundred and seventy-one" -> "dreihunderteinundsiebzig". German says the units before the
tens and writes the number as one word, so a model must learn to reorder and merge, not copy.
The numbers of the train, validation and test splits are disjoint: test numbers are never seen in
training. Needs ``num2words`` (the ``demo`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NumberSplits:
    """Parallel (english, german) sentence pairs per split, and the numbers behind them."""

    train: list[tuple[str, str]]
    valid: list[tuple[str, str]]
    test: list[tuple[str, str]]
    test_numbers: list[int]


def number_words(n: int) -> tuple[str, str]:
    """The English and German words for ``n``."""
    try:
        from num2words import num2words
    except ImportError as exc:
        raise ImportError("the demo needs num2words: pip install 'pytransformer[demo]'") from exc
    return num2words(n, lang="en"), num2words(n, lang="de")


def make_number_splits(
    max_number: int = 99_999, n_valid: int = 500, n_test: int = 1000, seed: int = 0
) -> NumberSplits:
    """Splits 0..max_number at random into disjoint validation, test and training numbers."""
    if max_number < 1:
        raise ValueError(f"max_number: must be >= 1, got {max_number}")
    if n_valid < 0 or n_test < 0 or n_valid + n_test >= max_number + 1:
        raise ValueError(
            f"n_valid, n_test: need 0 <= n_valid + n_test <= {max_number}, "
            f"got {n_valid} + {n_test}"
        )
    order = np.random.default_rng(seed).permutation(max_number + 1)
    valid, test, train = np.split(order, [n_valid, n_valid + n_test])
    return NumberSplits(
        train=[number_words(int(n)) for n in train],
        valid=[number_words(int(n)) for n in valid],
        test=[number_words(int(n)) for n in test],
        test_numbers=[int(n) for n in test],
    )
