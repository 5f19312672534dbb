"""Padding layout and the token-budget batcher: coverage, budget, bucketing, reproducibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytransformer.train.data import Batch, TokenBatcher, make_batch, make_lm_batch, synthetic_pairs

PAD, BOS, EOS = 0, 1, 2

sentences = st.lists(st.integers(3, 50), min_size=0, max_size=12)


def check_layout(batch: Batch, pairs):
    """Brute-force check of every cell against the documented layout."""
    assert batch.tgt_in.dtype == batch.tgt_out.dtype == np.int64
    assert (
        batch.tgt_in.shape == batch.tgt_out.shape == (len(pairs), max(len(t) for _, t in pairs) + 1)
    )
    if batch.src is not None:
        assert batch.src.dtype == np.int64
        assert batch.src.shape == (len(pairs), max(1, *(len(s) for s, _ in pairs)))
    for i, (src, tgt) in enumerate(pairs):
        if batch.src is not None:
            assert batch.src_lengths[i] == len(src)
            assert list(batch.src[i, : len(src)]) == list(src)
            assert (batch.src[i, len(src) :] == PAD).all()
        assert batch.tgt_lengths[i] == len(tgt) + 1
        assert list(batch.tgt_in[i, : len(tgt) + 1]) == [BOS, *tgt]
        assert list(batch.tgt_out[i, : len(tgt) + 1]) == [*tgt, EOS]
        assert (batch.tgt_in[i, len(tgt) + 1 :] == PAD).all()
        assert (batch.tgt_out[i, len(tgt) + 1 :] == PAD).all()
    assert batch.n_tokens == sum(len(t) + 1 for _, t in pairs)


@given(st.lists(st.tuples(sentences, sentences), min_size=1, max_size=6))
def test_make_batch_layout(pairs):
    check_layout(make_batch(pairs, PAD, BOS, EOS), pairs)


@given(st.lists(sentences, min_size=1, max_size=6))
def test_make_lm_batch_layout(seqs):
    batch = make_lm_batch(seqs, PAD, BOS, EOS)
    assert batch.src is None and batch.src_lengths is None and batch.n_src_tokens == 0
    check_layout(batch, [((), s) for s in seqs])


def test_make_batch_validation():
    with pytest.raises(ValueError, match="pairs"):
        make_batch([], PAD, BOS, EOS)
    with pytest.raises(TypeError, match=r"pairs\[0\]\[1\]"):
        make_batch([([3], [1.5])], PAD, BOS, EOS)
    with pytest.raises(IndexError, match=r"pairs\[1\]\[0\]"):
        make_batch([([3], [4]), ([-1], [4])], PAD, BOS, EOS)
    with pytest.raises(ValueError, match=r"pairs\[0\]\[0\]"):
        make_batch([([[3]], [4])], PAD, BOS, EOS)
    with pytest.raises(ValueError, match="pad_id"):
        make_batch([([3], [4])], -1, BOS, EOS)
    with pytest.raises(ValueError, match="sequences"):
        make_lm_batch([], PAD, BOS, EOS)


def epoch_batches(batcher: TokenBatcher) -> list[Batch]:
    return list(batcher)


def cost(batcher_lm: bool, batch: Batch, j: int) -> int:
    t = int(batch.tgt_lengths[j])
    return t if batcher_lm else max(int(batch.src_lengths[j]), t)


@given(
    n=st.integers(1, 120),
    max_len=st.integers(1, 40),
    max_tokens=st.integers(50, 400),
    max_sentences=st.one_of(st.none(), st.integers(1, 9)),
    lm=st.booleans(),
    seed=st.integers(0, 3),
)
def test_batcher_epoch_properties(n, max_len, max_tokens, max_sentences, lm, seed):
    pairs = synthetic_pairs("random", n, 30, 1, max_len, seed=seed)
    data = [t for _, t in pairs] if lm else pairs
    b = TokenBatcher(
        data,
        max_tokens,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        seed=seed,
        max_sentences=max_sentences,
        lm=lm,
    )
    for _ in range(2):  # two epochs
        batches = epoch_batches(b)
        assert len(batches) == len(b)
        seen = np.concatenate([x.indices for x in batches])
        assert sorted(seen.tolist()) == list(range(n))  # every sentence exactly once
        spans = []
        for x in batches:
            chosen = [data[i] for i in x.indices]
            check_layout(x, [((), s) for s in chosen] if lm else chosen)
            costs = [cost(lm, x, j) for j in range(x.size)]
            assert x.size * max(costs) <= max_tokens  # the budget
            assert max_sentences is None or x.size <= max_sentences
            spans.append((min(costs), max(costs), x.size))
        spans.sort(key=lambda sp: (sp[0], sp[1], -sp[2]))  # run order; a full batch before a rest
        for (_, hi, size), (nlo, _, _) in zip(spans, spans[1:], strict=False):
            assert hi <= nlo  # bucketed: batches are disjoint length ranges
            # greedy: the next-shortest sentence would not have fitted
            assert (size + 1) * max(hi, nlo) > max_tokens or size == max_sentences


def make_batcher(seed=0, n=200, **kw):
    pairs = synthetic_pairs("random", n, 50, 1, 30, seed=7)
    return TokenBatcher(pairs, 256, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=seed, **kw)


def signature(batches):
    return [x.indices.tolist() for x in batches]


def test_order_reproducible_from_seed_and_reshuffled_each_epoch():
    a, b, c = make_batcher(1), make_batcher(1), make_batcher(2)
    ea1, eb1, ec1 = signature(a), signature(b), signature(c)
    assert ea1 == eb1
    assert ea1 != ec1
    ea2 = signature(a)
    assert ea2 != ea1 and sorted(map(sorted, ea2)) != sorted(map(sorted, ea1))  # new batches
    assert ea2 == signature(b)


def test_no_shuffle_is_sorted_and_stable():
    b = make_batcher(shuffle=False)
    first = signature(b)
    assert first == signature(b)
    costs = [max(c) for c in ([b._cost[i] for i in x] for x in first)]
    assert costs == sorted(costs)


@pytest.mark.parametrize("taken", [0, 1, 5, 17, 30])
def test_resume_continues_the_same_sequence(taken):
    ref = make_batcher(3)
    stream = [ref.next_batch().indices.tolist() for _ in range(60)]  # crosses epoch boundaries
    run = make_batcher(3)
    for _ in range(taken):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # it must survive JSON
    resumed = make_batcher(999)  # a different seed: everything must come from the state
    resumed.load_state_dict(state)
    rest = [resumed.next_batch().indices.tolist() for _ in range(60 - taken)]
    assert rest == stream[taken:]
    assert resumed.epoch == ref.epoch


def test_state_for_other_data_is_rejected():
    state = make_batcher(n=200).state_dict()
    with pytest.raises(ValueError, match="different"):
        make_batcher(n=150).load_state_dict(state)
    with pytest.raises(ValueError, match="state"):
        make_batcher().load_state_dict({"epoch": 0})


def test_long_sentences():
    pairs = [([3] * 5, [4] * 5), ([3] * 50, [4] * 3), ([3] * 2, [4] * 2)]
    with pytest.raises(ValueError, match=r"data\[1\]"):
        TokenBatcher(pairs, 20, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    b = TokenBatcher(pairs, 20, pad_id=PAD, bos_id=BOS, eos_id=EOS, skip_long=True)
    assert b.n_skipped == 1
    assert sorted(np.concatenate([x.indices for x in b]).tolist()) == [0, 2]


def test_batcher_validation():
    pairs = synthetic_pairs("copy", 4, 10, 1, 3)
    for bad, error in ((0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="max_tokens"):
            TokenBatcher(pairs, bad, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="max_sentences"):
        TokenBatcher(pairs, 10, pad_id=PAD, bos_id=BOS, eos_id=EOS, max_sentences=0)
    with pytest.raises(ValueError, match="data"):
        TokenBatcher([], 10, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match=r"data\[0\]"):
        TokenBatcher([[3, 4, 5]], 10, pad_id=PAD, bos_id=BOS, eos_id=EOS)


def test_synthetic_pairs():
    for task in ("copy", "reverse", "random"):
        pairs = synthetic_pairs(task, 50, 20, 2, 6, seed=1)
        for src, tgt in pairs:
            assert 2 <= len(src) <= 6 and 2 <= len(tgt) <= 6
            assert src.min() >= 3 and src.max() < 20
            if task == "copy":
                assert list(tgt) == list(src)
            if task == "reverse":
                assert list(tgt) == list(src[::-1])
    a, b = (
        synthetic_pairs("random", 5, 20, 2, 6, seed=4),
        synthetic_pairs("random", 5, 20, 2, 6, seed=4),
    )
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="task"):
        synthetic_pairs("sort", 5, 20, 2, 6)
