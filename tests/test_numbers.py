import pytest

pytest.importorskip("num2words")

from pytransformer.numbers import make_number_splits, number_words  # noqa: E402


def test_german_reorders_units_before_tens():
    assert number_words(371) == ("three hundred and seventy-one", "dreihunderteinundsiebzig")


def test_splits_are_disjoint_and_complete():
    s = make_number_splits(max_number=300, n_valid=20, n_test=30, seed=3)
    assert (len(s.train), len(s.valid), len(s.test)) == (251, 20, 30)
    train_en = {en for en, _ in s.train}
    assert not train_en & {en for en, _ in s.test}
    assert not train_en & {en for en, _ in s.valid}
    assert [number_words(n) for n in s.test_numbers] == s.test


def test_splits_reject_bad_sizes():
    with pytest.raises(ValueError, match="n_valid"):
        make_number_splits(max_number=10, n_valid=6, n_test=5)
    with pytest.raises(ValueError, match="max_number"):
        make_number_splits(max_number=0)
