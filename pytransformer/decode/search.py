"""The search engines: greedy decoding and sampling, batched beam search, alternatives, over a
step callable. They follow CTranslate2's `translate_batch` (4.x) rules.

The engines drive a decoder only through a `Problem`: ``step(tokens (B,)) -> (logits (B, V),
attention or None)`` and ``state.reorder(indices)``. They know nothing else of the model, so they
are tested against small reference "models" as well as the real Transformer; `api` builds the
problem from a model.

Conventions shared by every search:
- A sentence is fed its *prefix* first, one token a step: its start token, then either a target
  prefix (translation, ``keep_prefix``: those tokens are *forced* outputs, part of the returned
  hypothesis, counted by the length limits and the length penalty, seen by the repetition
  rules, but their log-probabilities are not in the score) or a prompt (a language model: fed
  only). All rows share the step (position), so prefixes of different lengths need no padding.
- A hypothesis' length L counts its output tokens: the kept prefix, the generated tokens and the
  end token that stopped it, if any (CTranslate2 counts the EOS it then removes).
- A hypothesis ends when it produces an end token (masked on the logits, before the softmax,
  while fewer than ``min_gen`` output tokens precede it) or has ``max_gen`` output tokens.
  Returned token lists hold no end token unless ``keep_end``.
- score = (sum of the generated tokens' log-probabilities, end token included) / lp(L), with
  lp(L) = L ** alpha (``length_penalty_kind="power"``, CTranslate2's) or ((5 + L) / 6) ** alpha
  ("gnmt"); alpha = 0 gives the plain sum; plus, with a coverage penalty beta,
  beta * sum over source positions of log(min(attention mass received, 1)) (positions with mass
  0 skipped). Greedy and sampled hypotheses are scored the same way.

Beam search (CTranslate2's): each step takes the 2K best (or, sampling, 2K drawn) extensions of
a sentence's K live beams by summed log-probability. Of the first K, those ending in an end token
(every one at the last step) are finished hypotheses, set aside; each one's slot is refilled
with the next non-end candidate among the other K, so the beam stays K wide (with several end
tokens there may be none left: the finished candidate then also goes on, as CTranslate2 does).
A sentence stops at its last step; with alpha = 0 and no coverage penalty when its best
candidate has ended at some step and num_hypotheses have finished; otherwise when
round(K * patience) have finished. Its finished hypotheses are then scored and the
num_hypotheses best returned; every trailing end token is dropped from the returned tokens.

Known differences from CTranslate2, all at edges: masked tokens get -inf (CTranslate2: the
lowest float), so a beam with fewer than 2K possible extensions has dead slots instead of
hopeless live ones; beams keep their parent's row where they can (fewer cache moves), so
exact score ties may break differently. (Its rule on end tokens after a target prefix, which
it applies to every sentence of a batch where one has a prefix, `translate` applies to every
sentence of a call where one has a prefix, so that results do not depend on max_batch_size.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .. import ops
from .._native import _C
from .logits import LogitsProcessors

__all__ = [
    "Problem", "Hypothesis", "run_single", "beam_search", "expand", "greedy_choice", "sampler",
    "length_penalty", "LENGTH_PENALTY_KINDS", "BeamSampling", "hypothesis_attention",
]

LENGTH_PENALTY_KINDS = ("power", "gnmt")
_PENALIZED = -1e10  # CTranslate2's score for an end token it refuses at a prefix's end


def length_penalty(length: int | np.ndarray, alpha: float, kind: str = "power"):
    """lp(L): L ** alpha ("power", CTranslate2's) or ((5 + L) / 6) ** alpha ("gnmt")."""
    length = np.asarray(length, dtype=np.float64)
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    return length**alpha


# --------------------------------------------------------------------------------------------
# The search problem: what every search needs besides the model


@dataclass
class Problem:
    """A batch of sentences to decode together with one decoder state.

    step(tokens (B,)) -> (logits (B, V) float32, attention (B, S) or None); state.reorder keeps
    rows. prefixes[i] is fed first (see the module docstring; keep_prefix: its tokens after the
    first are forced outputs). min_gen/max_gen bound the output token count. end_ids: the tokens
    that end a hypothesis (may be empty). processors: the logit edits (None: none).
    Alternatives (a continuation of fixed heads): cont_from[i] output tokens form a head whose
    score head[i] is added after normalisation; L, the processors' history and the coverage
    penalty start after it. eos_rule (n,) bool or None: the sentences to which CTranslate2's
    rule applies that at the first free step only the best candidate may end (it replaces the
    others' end tokens by token 0 with score -1e10); CTranslate2 applies it to every sentence of
    a batch where some sentence has a target prefix.
    """

    step: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    state: object
    prefixes: list[np.ndarray]
    min_gen: np.ndarray
    max_gen: np.ndarray
    end_ids: np.ndarray
    alpha: float
    kind: str = "power"
    keep_prefix: bool = False
    keep_end: bool = False
    src_lengths: np.ndarray | None = None  # to cut attention rows to each source's length
    processors: LogitsProcessors | None = None
    coverage_penalty: float = 0.0
    head: np.ndarray | None = None
    cont_from: np.ndarray | None = None
    eos_rule: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.prefixes)

    @property
    def prefix_lens(self) -> np.ndarray:
        return np.array([p.size for p in self.prefixes], dtype=np.int64)

    def out_offsets(self) -> np.ndarray:
        """Fed tokens that are not outputs: the start token, or the whole prompt."""
        return np.zeros(self.n, np.int64) if self.keep_prefix else self.prefix_lens - 1

    def total_steps(self) -> int:
        """Decode steps needed: the last output token is never fed."""
        return int((self.out_offsets() + self.max_gen).max())

    @cached_property
    def bounds(self) -> StepBounds:
        """The steps past which every sentence generates, may end, or must end (see StepBounds)."""
        off = self.out_offsets()
        bans = (off + self.min_gen).astype(np.int64)
        if not self.n:
            return StepBounds(0, bans, 0, 0, 0)
        return StepBounds(int((self.prefix_lens - 1).max()), bans, int(bans.min()),
                          int(bans.max()), int((off + self.max_gen - 1).min()))

    def is_end(self, tok: np.ndarray) -> np.ndarray:
        e = self.end_ids
        if e.size == 1:
            return tok == e[0]
        if e.size == 0:
            return np.zeros(np.shape(tok), dtype=bool)
        return np.isin(tok, e)


@dataclass(frozen=True)
class StepBounds:
    """Per problem, so the steps can skip per-row tests that cannot hold: from step
    all_generate on every sentence generates; sentence i may end from step bans[i] on (its
    minimum length bans the end tokens before); no sentence reaches its maximum length before
    step first_stop. ban_min, ban_max: the least and greatest of bans."""

    all_generate: int
    bans: np.ndarray
    ban_min: int
    ban_max: int
    first_stop: int


@dataclass
class Hypothesis:
    score: float  # normalised (what translate returns)
    logprob: float  # sum of the generated tokens' log-probabilities
    tokens: list[int]
    attention: np.ndarray | None


def _log_softmax_(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of logits (n, V), in place when they are a float32 C-contiguous
    writable buffer (the model's fresh output): no copy of the vocabulary-wide matrix."""
    x = _writable(x)
    return ops.log_softmax(x, out=x)


def _writable(x: np.ndarray) -> np.ndarray:
    """x itself when it is a float32 C-contiguous writable buffer, else such a copy."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
        x = np.array(x, dtype=np.float32, order="C")
    return x


def _keep_attention(hist, attn, rows, t: int, shape: tuple[int, int]):
    """The attention history (rows x steps x ...) with step t of `rows` set to attn; made on
    the first step that brings attention (None: the step gave none)."""
    if attn is None:
        return hist
    if hist is None:
        hist = np.zeros(shape + attn.shape[1:], dtype=np.float32)
    hist[rows, t] = attn
    return hist


def _seq_buffer(prob: Problem, rows: int, width: int) -> np.ndarray:
    """(rows, width) int64 with each sentence's prefix at the start."""
    seq = np.zeros((rows, width), dtype=np.int64)
    for i, p in enumerate(prob.prefixes):
        seq[i, : p.size] = p
    return seq


def _process(prob: Problem, x: np.ndarray, sent: np.ndarray, rows: np.ndarray, t: int,
             seq: np.ndarray, off: np.ndarray) -> None:
    """Applies the processors and the minimum length to logits x (r, V) in place: row r belongs
    to sentence sent[r] and is row rows[r] of seq; t is the step."""
    pr = prob.processors
    if pr is not None:
        hist = None
        if pr.needs_history and t > 0:
            hist = seq[rows, 1 : t + 1]  # with processors the prefix is kept: outputs from 1
            if prob.cont_from is not None:
                hist = np.where(np.arange(t) < prob.cont_from[sent][:, None], -1, hist)
        pr.apply(x, hist)
    if prob.end_ids.size:
        _ban_ends(prob, x, sent, t)


def _ban_ends(prob: Problem, x: np.ndarray, sent: np.ndarray, t: int) -> None:
    """Masks the end tokens of the rows whose sentence is still short of its minimum length.
    The whole-batch cases (no sentence short, or all of them) skip the per-row test."""
    b = prob.bounds
    if t >= b.ban_max:
        return
    if t < b.ban_min:
        x[:, prob.end_ids] = -np.inf
        return
    short = np.flatnonzero(t < b.bans[sent])
    if short.size:
        x[short[:, None], prob.end_ids] = -np.inf


def _score(prob: Problem, sent: int, logprob: float, length: int, attn: np.ndarray | None):
    cf = 0 if prob.cont_from is None else int(prob.cont_from[sent])
    L = length - cf
    with np.errstate(divide="ignore", invalid="ignore"):
        score = float(logprob / length_penalty(L, prob.alpha, prob.kind)) if L > 0 else 0.0
    if prob.coverage_penalty != 0.0 and attn is not None:
        a = attn[cf:length]
        if a.ndim == 3:  # per head: the penalty reads the mean, as the default attention
            a = a.mean(axis=1)
        cov = a.sum(axis=0)
        cov = cov[cov > 0]
        score += prob.coverage_penalty * float(np.log(np.minimum(cov, 1.0)).sum())
    if prob.head is not None:
        score += float(prob.head[sent])
    return score


def _make_hypothesis(prob, sent, toks, logprob, attn_rows) -> Hypothesis:
    """toks: every output token (the end token that stopped it included); attn_rows: their
    attention (len(toks), ...) or None."""
    score = _score(prob, sent, logprob, len(toks), attn_rows)
    if not prob.keep_end:  # every trailing end token goes (CTranslate2)
        n = len(toks)
        while n and prob.is_end(toks[n - 1]):
            n -= 1
        toks = toks[:n]
    attn = None if attn_rows is None else hypothesis_attention(prob, sent, attn_rows[: len(toks)])
    return Hypothesis(score, float(logprob), [int(x) for x in toks], attn)


def hypothesis_attention(prob: Problem, sent: int, rows: np.ndarray) -> np.ndarray:
    """Attention rows (T, S) or (T, H, S) of sentence sent, cut to its source length, as
    returned: (T, S) or (H, T, S)."""
    src = rows.shape[-1] if prob.src_lengths is None else int(prob.src_lengths[sent])
    a = rows[..., :src]
    return np.ascontiguousarray(np.moveaxis(a, 0, -2)) if a.ndim == 3 else a.copy()


# --------------------------------------------------------------------------------------------
# One row per sentence: greedy and sampling


def greedy_choice(logp: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return logp.argmax(axis=1)


def run_single(
    prob: Problem,
    choose: Callable[[np.ndarray, np.ndarray], np.ndarray],
    want_logprobs: bool,
    need_attention: bool,
) -> list[Hypothesis]:
    """Decodes one hypothesis per sentence; choose(logits (n,V), sentence ids (n,)) -> tokens.

    Finished sentences leave the batch (state.reorder) so later steps cost less. Histories are
    kept per sentence id, so leaving needs no copy of them.
    """
    n = prob.n
    P = prob.prefix_lens
    off = prob.out_offsets()
    results: list[Hypothesis | None] = [None] * n
    total = prob.total_steps() if n else 0
    seq = _seq_buffer(prob, n, total + 1)
    sums = np.zeros(n, dtype=np.float64)
    attn_hist = None
    act = np.arange(n)
    if (prob.max_gen == 0).any():  # nothing to generate
        for i in np.flatnonzero(prob.max_gen == 0):
            results[i] = Hypothesis(0.0, 0.0, [], None)
        act = np.flatnonzero(prob.max_gen > 0)
        if act.size == 0:
            return results  # type: ignore[return-value]
        prob.state.reorder(act)
    plain = prob.processors is None and prob.end_ids.size == 0
    bounds = prob.bounds
    for t in range(total):
        logits, attn = prob.step(seq[act, t])
        if need_attention:
            attn_hist = _keep_attention(attn_hist, attn, act, t, (n, total))
        if t >= bounds.all_generate:
            rows, sent = None, act
        else:
            generating = t >= P[act] - 1
            if not generating.any():
                continue
            rows = np.flatnonzero(generating)
            sent = act[rows]
        x = _writable(logits if rows is None or rows.size == act.size else logits[rows])
        if not plain:
            _process(prob, x, sent, sent, t, seq, off)
        if want_logprobs:
            x = _log_softmax_(x)
        tok = choose(x, sent)
        if want_logprobs:
            sums[sent] += x[np.arange(sent.size), tok]
        seq[sent, t + 1] = tok
        ended = prob.is_end(tok)
        if t < bounds.first_stop:
            if not ended.any():
                continue
            done = ended
        else:
            done = ended | (t + 1 - off[sent] >= prob.max_gen[sent])
            if not done.any():
                continue
        if rows is None:
            rows = np.arange(act.size)
        for r in np.flatnonzero(done):
            i = int(sent[r])
            count = t + 1 - int(off[i])
            toks = seq[i, off[i] + 1 : t + 2]
            a = None if attn_hist is None else attn_hist[i, off[i] : off[i] + count]
            results[i] = _make_hypothesis(prob, i, toks, sums[i], a)
        keep = np.ones(act.size, dtype=bool)
        keep[rows[done]] = False
        act = act[keep]
        if act.size == 0:
            break
        prob.state.reorder(np.flatnonzero(keep))
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Beam search


@dataclass
class BeamSampling:
    """Random sampling inside a beam (CTranslate2's RandomSampler over the beam's candidates):
    2K candidates drawn without replacement (Gumbel top-2K) from softmax(cum / temperature),
    restricted to the top_k candidates of the sentence (0: all) and the top_p nucleus."""

    top_k: int
    top_p: float
    temperature: float
    rngs: list[np.random.Generator]  # one per sentence of the problem


def beam_search(
    prob: Problem,
    beam_size: int,
    num_hypotheses: int,
    need_attention: bool,
    patience: float = 1.0,
    sampling: BeamSampling | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search (see the module docstring); returns each sentence's best hypotheses,
    best first, at most num_hypotheses.

    Layout: the decoder rows are (active sentences x k slots), row = sentence_index * k + slot;
    k is 1 until a sentence first generates, then beam_size. cum (n_act, k) holds each slot's
    summed log-probability; -inf marks a dead slot (a copy of a live row kept only so every
    sentence has k rows; it can never be selected).
    """
    n, K = prob.n, beam_size
    C = 2 * K
    P = prob.prefix_lens
    off = prob.out_offsets()
    max_finished = max(1, int(np.floor(K * patience + 0.5)))  # C's round(): halves away from 0
    early_exit = prob.alpha == 0 and prob.coverage_penalty == 0
    finished: list[list[tuple]] = [[] for _ in range(n)]
    results: list[list[Hypothesis] | None] = [None] * n
    top_ended = np.zeros(n, dtype=bool)
    n_finished = np.zeros(n, dtype=np.int64)
    # A running count by a product, not np.cumsum: cumsum here kept Python objects (~200 blocks
    # over a few thousand calls before levelling off), which tests/test_memory.py sees as a leak.
    upper = np.triu(np.ones((K, K), dtype=np.int64))
    total = prob.total_steps()
    seq = _seq_buffer(prob, n, total + 1)
    act = np.arange(n)
    k = 1
    cum = np.zeros((n, 1), dtype=np.float64)
    attn_hist = None
    bounds = prob.bounds
    for t in range(total):
        logits, attn = prob.step(seq[:, t])
        if need_attention:
            attn_hist = _keep_attention(attn_hist, attn, slice(None), t, (seq.shape[0], total))
        n_act = act.size
        every = t >= bounds.all_generate
        gen = None if every else t >= P[act] - 1
        if every or gen.any():
            c_val, c_slot, c_tok = _beam_candidates(prob, logits, act, gen, cum, k, C, seq, t,
                                                    off, sampling)
        else:
            c_val, c_slot, c_tok = _no_candidates(n_act, C)
        if every and t < bounds.first_stop and _quiet(prob, c_val, c_tok, K):
            pick, ci, k_new = None, np.arange(n_act), K  # no finishing rule applies this step
        else:
            gen = np.ones(n_act, dtype=bool) if gen is None else gen
            if not gen.all():  # sentences still reading their prefix: its token, in slot 0
                fi = np.flatnonzero(~gen)
                c_val[fi, 0] = cum[fi, 0]
                c_tok[fi, 0] = seq[fi * k, t + 1]
            count = t + 1 - off[act]
            last = gen & (count >= prob.max_gen[act])
            if prob.eos_rule is not None:
                first = gen & (t == P[act] - 1) & prob.eos_rule[act]
                if first.any():
                    bad = first[:, None] & prob.is_end(c_tok)
                    bad[:, 0] = False
                    c_tok[bad], c_val[bad] = 0, _PENALIZED
            ends = gen[:, None] & prob.is_end(c_tok)
            finite = c_val > -np.inf
            fin = (ends[:, :K] | last[:, None]) & finite[:, :K]
            done = last.copy()
            if fin.any():
                _set_aside(fin, act, k, t, off, seq, c_val, c_slot, c_tok, attn_hist, finished)
                top_ended[act] |= fin[:, 0]
                n_finished[act] += fin.sum(axis=1)
                nfin = n_finished[act]
                if early_exit:
                    done |= top_ended[act] & (nfin >= num_hypotheses)
                else:
                    done |= nfin >= max_finished
                pick = _refill(fin, ends, upper, K)
                s_val = _take(c_val, pick)
            else:  # most steps: nothing ended, the first K candidates go on as they are
                pick = None
                s_val = c_val[:, :K]
            done |= ~(s_val > -np.inf).any(axis=1)
            if done.any():
                for i in np.flatnonzero(done):
                    b = int(act[i])
                    results[b] = _finalize(prob, b, finished[b], num_hypotheses)
                if done.all():
                    break
            ci = np.flatnonzero(~done)
            k_new = K if (k == K or gen.any()) else 1
        # Slot j takes candidate pick[j], dead slots copy the first live one and, with k_new ==
        # k, every parent's first child stays in its parent's row (see csrc/decode/beam.h).
        s_val, s_tok, parents, moved = _C.beam_settle(c_val, c_slot, c_tok, pick, ci, k, k_new)
        if moved:
            prob.state.reorder(parents)
            seq = seq[parents]
            if attn_hist is not None:
                attn_hist = attn_hist[parents]
        seq[:, t + 1] = s_tok.ravel()
        cum, act, k = s_val, act[ci], k_new
    for b in act:  # only reached if the steps ran out first (cannot happen: last step ends all)
        if results[b] is None:
            results[b] = _finalize(prob, int(b), finished[b], num_hypotheses)
    return results  # type: ignore[return-value]


def _quiet(prob: Problem, c_val: np.ndarray, c_tok: np.ndarray, K: int) -> bool:
    """True when a step where every sentence generates and none is at its maximum length needs
    none of the finishing rules: no end token among any sentence's first K candidates and a
    live best candidate in every sentence (candidates come best first)."""
    return not prob.is_end(c_tok[:, :K]).any() and bool((c_val[:, 0] > -np.inf).all())


def _set_aside(fin, act, k, t, off, seq, c_val, c_slot, c_tok, attn_hist, finished) -> None:
    """Moves the candidates `fin` marks (n_act, K) into their sentences' finished lists."""
    for i, j in zip(*np.nonzero(fin), strict=True):
        b = int(act[i])
        parent = i * k + int(c_slot[i, j])
        toks = np.append(seq[parent, off[b] + 1 : t + 1], c_tok[i, j])
        a = None if attn_hist is None else attn_hist[parent, off[b] : t + 1].copy()
        finished[b].append((float(c_val[i, j]), toks, a))


def _refill(fin: np.ndarray, ends: np.ndarray, upper: np.ndarray, K: int) -> np.ndarray:
    """The candidate each of the K slots continues with (n_act, K): each finished slot takes
    the next candidate past the first K that does not end; when none is left (several end
    tokens), the finished candidate itself goes on (CTranslate2)."""
    ok = ~ends[:, K:]
    order = np.argsort(~ok, axis=1, kind="stable")
    rank = fin.astype(np.int64) @ upper - 1  # finished slots before and at each
    has = fin & (rank < ok.sum(axis=1)[:, None])
    return np.where(has, K + _take(order, np.clip(rank, 0, K - 1)), np.arange(K))


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """np.take_along_axis(x, idx, 1) for 2-D x and idx, by plain fancy indexing (the library
    call costs several microseconds of Python on the tiny arrays of a beam step)."""
    return x[np.arange(x.shape[0])[:, None], idx]


def _finalize(prob, b, entries, limit) -> list[Hypothesis]:
    hyps = [_make_hypothesis(prob, b, toks, logprob, a) for logprob, toks, a in entries]
    order = sorted(range(len(hyps)), key=lambda i: -hyps[i].score)  # stable: earlier first
    return [hyps[i] for i in order[:limit]]


def _no_candidates(n: int, C: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, slot, token) arrays (n, C) holding no candidate: -inf, 0, 0."""
    return (np.full((n, C), -np.inf), np.zeros((n, C), dtype=np.int64),
            np.zeros((n, C), dtype=np.int64))


def _beam_candidates(prob, logits, act, gen, cum, k, C, seq, t, off, sampling):
    """The C best (or drawn) extensions (value, slot, token) of every generating sentence, in
    order: best first, ties by slot then token; (n_act, C) arrays, rows of the sentences not
    generating hold no candidate. gen None: every sentence generates."""
    n_act = act.size
    V = logits.shape[1]
    gi = np.arange(n_act) if gen is None else np.flatnonzero(gen)
    g = gi.size
    lp3 = logits.reshape(n_act, k, V)
    rows = _writable((lp3 if g == n_act else lp3[gi]).reshape(g * k, V))
    if prob.processors is not None or (prob.end_ids.size and t < prob.bounds.ban_max):
        seq_rows = (gi[:, None] * k + np.arange(k)).ravel()
        _process(prob, rows, np.repeat(act[gi], k), seq_rows, t, seq, off)
    if sampling is None:
        # The best C of a sentence lie among the best C of each of its rows (cum is per row):
        # only those log-probabilities are computed, not the vocabulary-wide rows.
        found = _C.beam_candidates(rows, cum if g == n_act else cum[gi], C)
    else:
        found = _sampled_candidates(_log_softmax_(rows), cum[gi], act[gi], sampling, C)
    if g == n_act:
        return found
    out = _no_candidates(n_act, C)
    for full, part in zip(out, found, strict=True):
        full[gi] = part
    return out


def _sampled_candidates(logp, cum, sent, s: BeamSampling, C: int):
    """The C candidates (value, slot, token), (g, C) each, drawn for the g sentences `sent`."""
    g = sent.size
    V = logp.shape[1]
    cand = (cum[:, :, None] + logp.reshape(g, -1, V).astype(np.float64)).reshape(g, -1)
    x = cand.copy()
    w = x.shape[1]
    if 0 < s.top_k < w:
        kth = np.partition(x, w - s.top_k, axis=1)[:, w - s.top_k][:, None]
        x[x < kth] = -np.inf
    with np.errstate(over="ignore", invalid="ignore"):
        x = (x - x.max(axis=1, keepdims=True)) / s.temperature
    if s.top_p < 1.0:
        order = np.argsort(-x, axis=1, kind="stable")
        p = np.exp(np.take_along_axis(x, order, 1))
        p /= p.sum(axis=1, keepdims=True)
        drop = (np.cumsum(p, axis=1) - p) >= s.top_p
        np.put_along_axis(x, order, np.where(drop, -np.inf, np.take_along_axis(x, order, 1)), 1)
    noise = np.stack([s.rngs[b].gumbel(size=w) for b in sent])
    pert = np.where(np.isfinite(x), x + noise, -np.inf)
    m = min(C, w)
    top = np.argsort(-pert, axis=1, kind="stable")[:, :m]
    val = np.take_along_axis(cand, top, 1)
    c_val, c_slot, c_tok = _no_candidates(g, C)
    c_val[:, :m] = np.where(np.take_along_axis(pert, top, 1) > -np.inf, val, -np.inf)
    c_slot[:, :m] = top // V
    c_tok[:, :m] = top % V
    return c_val, c_slot, c_tok


# --------------------------------------------------------------------------------------------
# Alternatives: the candidates at the first position after the prefix


def expand(prob: Problem, count: int, min_prob: float, need_attention: bool = False) -> list:
    """Feeds each sentence's prefix and returns (tokens, log-probabilities, attention rows of the
    prefix and the expanded position or None) of its `count` most likely next tokens, best
    first (ties: lower id), stopping before the first whose probability is below min_prob. As
    CTranslate2's expansion: end tokens are masked there, and the processors see no history."""
    n = prob.n
    P = prob.prefix_lens
    out: list = [None] * n
    total = int(P.max())
    seq = _seq_buffer(prob, n, total)
    act = np.arange(n)
    attn_hist = None
    for t in range(total):
        logits, attn = prob.step(seq[act, t])
        if need_attention:
            attn_hist = _keep_attention(attn_hist, attn, act, t, (n, total))
        now = np.flatnonzero(t == P[act] - 1)
        if now.size == 0:
            continue
        x = _writable(logits[now])
        if prob.processors is not None:
            prob.processors.apply(x, None)
        if prob.end_ids.size:
            x[:, prob.end_ids] = -np.inf
        x = _log_softmax_(x)
        m = min(count, x.shape[1])
        for r, i in zip(range(now.size), act[now], strict=True):
            order = np.lexsort((np.arange(x.shape[1]), -x[r]))[:m]
            lp = x[r, order].astype(np.float64)
            keep = int(np.argmin(np.exp(lp) >= min_prob)) if (np.exp(lp) < min_prob).any() else m
            a = None if attn_hist is None else attn_hist[i, : t + 1].copy()
            out[int(i)] = (order[:keep].astype(np.int64), lp[:keep], a)
        stay = np.ones(act.size, dtype=bool)
        stay[now] = False
        act = act[stay]
        if act.size == 0:
            break
        prob.state.reorder(np.flatnonzero(stay))
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Sampling


def sampler(
    temperature: float, top_k: int, top_p: float, rngs: list[np.random.Generator]
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """choose(logits (n,V), sentence ids (n,)) drawing from softmax(logits / T) restricted to the
    top_k tokens (0 = all), then to the smallest prefix (by probability) whose mass reaches top_p.
    Each sentence draws from its own generator, so its tokens do not depend on the batch."""

    def choose(logits: np.ndarray, sent: np.ndarray) -> np.ndarray:
        x = logits.astype(np.float64)
        # Shifted before the division: every entry is <= 0, so a temperature whose 1/T overflows
        # sends the rest to -inf (probability 0) and leaves the maximum at 0, i.e. greedy. Divided
        # first, logits / 1e-310 overflow to +-inf and inf - inf makes every probability NaN.
        with np.errstate(over="ignore", invalid="ignore"):
            x = (x - x.max(axis=1, keepdims=True)) / temperature
        x[np.isnan(x)] = -np.inf  # a masked (-inf) logit over a tiny temperature
        n, v = x.shape
        if 0 < top_k < v:
            idx = np.argpartition(x, v - top_k, axis=1)[:, v - top_k :]
            x = np.take_along_axis(x, idx, 1)
        else:
            idx = None
        if top_p < 1.0:
            order = np.argsort(-x, axis=1, kind="stable")
            x = np.take_along_axis(x, order, 1)
            idx = order if idx is None else np.take_along_axis(idx, order, 1)
        probs = np.exp(x - x.max(axis=1, keepdims=True))
        if top_p < 1.0:
            probs /= probs.sum(axis=1, keepdims=True)
            before = np.cumsum(probs, axis=1) - probs
            probs[before >= top_p] = 0.0  # keep while the mass before a token is below top_p
        c = np.cumsum(probs, axis=1)
        u = np.array([rngs[s].random() for s in sent])
        # The first j with c[j] > u * total has probs[j] > 0 (a zero adds nothing to c).
        j = (c <= (u * c[:, -1])[:, None]).sum(axis=1)
        # u * total can round up to total: fall back on the last token with mass.
        last = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
        j = np.minimum(j, last)
        return j if idx is None else idx[np.arange(n), j]

    return choose
