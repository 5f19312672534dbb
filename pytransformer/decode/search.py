"""The search engines: greedy decoding, batched beam search and sampling over a step callable.

The engines drive a decoder only through a `Problem`: ``step(tokens (B,)) -> (logits (B, V),
attention or None)`` and ``state.reorder(indices)``. They know nothing else of the model, so they
are tested against small reference "models" as well as the real Transformer; `api` builds the
problem from a model.

Conventions shared by every search:
- A sentence is fed its *prefix* first (``[bos]`` for translation, the prompt for a language
  model), one token a step; all rows share the step (position), so prompts of different lengths
  need no padding: a row whose prefix is longer keeps being fed its prefix while others generate.
- |Y|, the length used by the length penalty, counts the generated tokens *including* the EOS
  when there is one (every token whose log-probability is in the score).
- A hypothesis ends when it produces EOS (allowed only once ``min_length`` tokens precede it) or
  reaches ``max_length`` generated tokens (then it carries no EOS). Returned token lists never
  contain the prefix or the EOS.
- score = sum of the log-probabilities of the generated tokens (EOS included) / lp(|Y|), with
  lp(L) = ((5 + L) / 6) ** alpha (GNMT); alpha = 0 gives the plain sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import ops

__all__ = [
    "Problem", "Hypothesis", "run_single", "beam_search", "greedy_choice", "sampler",
    "length_penalty",
]


def length_penalty(length: int | np.ndarray, alpha: float) -> float | np.ndarray:
    """GNMT length penalty lp(L) = ((5 + L) / 6) ** alpha."""
    return _lp(length, alpha)


def _lp(length, alpha):
    return ((5.0 + np.asarray(length, dtype=np.float64)) / 6.0) ** alpha


# --------------------------------------------------------------------------------------------
# The search problem: what every search needs besides the model


@dataclass
class Problem:
    """A batch of sentences to decode together with one decoder state.

    step(tokens (B,)) -> (logits (B, V) float32, attention (B, S) or None); state.reorder keeps
    rows. prefixes[i] is fed first; min_gen/max_gen bound the generated token count (EOS counted
    in neither bound: EOS may follow min_gen tokens, and max_gen tokens end a hypothesis).
    """

    step: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    state: object
    prefixes: list[np.ndarray]
    min_gen: np.ndarray
    max_gen: np.ndarray
    eos: int | None
    alpha: float
    src_lengths: np.ndarray | None = None  # to cut attention rows to each source's length

    @property
    def n(self) -> int:
        return len(self.prefixes)

    @property
    def prefix_lens(self) -> np.ndarray:
        return np.array([p.size for p in self.prefixes], dtype=np.int64)

    def total_steps(self) -> int:
        """Decode steps needed: the last generated token is never fed."""
        return int((self.prefix_lens + self.max_gen - 1).max())


@dataclass
class Hypothesis:
    score: float  # normalised
    logprob: float  # sum of log-probabilities
    tokens: list[int]
    attention: np.ndarray | None


def _log_softmax_(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of logits (n, V), in place when they are a float32 C-contiguous
    writable buffer (the model's fresh output): no copy of the vocabulary-wide matrix."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
        x = np.array(x, dtype=np.float32, order="C")
    return ops.log_softmax(x, out=x)


def _seq_buffer(prob: Problem, rows: int, width: int) -> np.ndarray:
    """(rows, width) int64 with each sentence's prefix at the start."""
    seq = np.zeros((rows, width), dtype=np.int64)
    for i, p in enumerate(prob.prefixes):
        seq[i, : p.size] = p
    return seq


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
    results: list[Hypothesis | None] = [None] * n
    total = prob.total_steps() if n else 0
    seq = _seq_buffer(prob, n, total + 1)
    gen = np.zeros(n, dtype=np.int64)
    sums = np.zeros(n, dtype=np.float64)
    attn_hist = None
    act = np.arange(n)
    for i in np.flatnonzero(prob.max_gen == 0):  # nothing to generate
        results[i] = Hypothesis(0.0, 0.0, [], None)
    if (prob.max_gen == 0).any():
        act = np.flatnonzero(prob.max_gen > 0)
        if act.size < n:
            if act.size == 0:
                return results  # type: ignore[return-value]
            prob.state.reorder(act)
    for t in range(total):
        logits, attn = prob.step(seq[act, t])
        if need_attention and attn is not None:
            if attn_hist is None:
                attn_hist = np.zeros((n, total) + attn.shape[1:], dtype=np.float32)
            attn_hist[act, t] = attn
        generating = t >= P[act] - 1
        if not generating.any():
            continue
        rows = np.flatnonzero(generating)
        sent = act[rows]
        x = logits if rows.size == act.size else logits[rows]
        if want_logprobs:
            x = _log_softmax_(x)
        if prob.eos is not None:
            no_eos = gen[sent] < prob.min_gen[sent]
            if no_eos.any():
                x[no_eos, prob.eos] = -np.inf
        tok = choose(x, sent)
        if want_logprobs:
            sums[sent] += x[np.arange(rows.size), tok]
        seq[sent, t + 1] = tok
        gen[sent] += 1
        done = gen[sent] == prob.max_gen[sent]
        if prob.eos is not None:
            done |= tok == prob.eos
        if not done.any():
            continue
        for r in np.flatnonzero(done):
            i = int(sent[r])
            results[i] = _finish_single(prob, i, seq, gen[i], sums[i], attn_hist)
        keep = np.ones(act.size, dtype=bool)
        keep[rows[done]] = False
        act = act[keep]
        if act.size == 0:
            break
        prob.state.reorder(np.flatnonzero(keep))
    return results  # type: ignore[return-value]


def _finish_single(prob, i, seq, g, logprob, attn_hist) -> Hypothesis:
    p = prob.prefixes[i].size
    g = int(g)
    toks = seq[i, p : p + g]
    if prob.eos is not None and g > 0 and toks[-1] == prob.eos:
        toks = toks[:-1]
    attn = _hyp_attention(prob, attn_hist, i, i, p - 1, toks.size)
    score = float(logprob / _lp(g, prob.alpha)) if g else 0.0
    return Hypothesis(score, float(logprob), toks.tolist(), attn)


def _hyp_attention(prob, attn_hist, row, sent, start, count) -> np.ndarray | None:
    """A hypothesis' attention rows [start, start + count) of history row `row` (sentence
    `sent`), cut to its source length: (count, S), or (H, count, S) when kept per head."""
    if attn_hist is None:
        return None
    src = attn_hist.shape[-1] if prob.src_lengths is None else int(prob.src_lengths[sent])
    a = attn_hist[row, start : start + count, ..., :src]
    return np.ascontiguousarray(np.moveaxis(a, 0, -2)) if a.ndim == 3 else a.copy()


# --------------------------------------------------------------------------------------------
# Beam search


_GROUP = 32  # elements per group in _topk_rows


def _topk_rows(x: np.ndarray, k: int) -> np.ndarray:
    """Indices (R, k) of the k largest entries of each row of x (R, V), unordered.

    For a large V, a full selection per row (np.argpartition) costs ~10x a pass over the data.
    Instead: split each row into groups (group g holds the elements g, g + G, g + 2G, ... so the
    maxima are one vectorised reduction), keep the k groups with the largest maxima (every
    top-k element lies in them: a group holding one has a maximum >= the k-th value, and at most
    k groups do), and select among those k * 32 elements.
    """
    r, v = x.shape
    if k >= v:
        return np.broadcast_to(np.arange(v), x.shape).copy()
    if k == 1:
        return x.argmax(axis=1)[:, None]
    b = _GROUP
    if v < 8 * k * b:
        return np.argpartition(x, v - k, axis=1)[:, v - k :]
    ng = v // b  # groups; the v - ng * b trailing elements form one extra group
    v0 = ng * b
    gmax = x[:, :v0].reshape(r, b, ng).max(axis=1)
    if v0 < v:
        gmax = np.concatenate([gmax, x[:, v0:].max(axis=1, keepdims=True)], axis=1)
    sel = np.argpartition(gmax, gmax.shape[1] - k, axis=1)[:, -k:]
    idx = np.where((sel == ng)[:, :, None], v0 + np.arange(b), sel[:, :, None] + ng * np.arange(b))
    valid = (idx < v).reshape(r, k * b)
    idx = np.minimum(idx, v - 1).reshape(r, k * b)
    vals = np.where(valid, np.take_along_axis(x, idx, 1), -np.inf)
    j = np.argpartition(vals, k * b - k, axis=1)[:, -k:]
    return np.take_along_axis(idx, j, 1)


def beam_search(
    prob: Problem, beam_size: int, num_hypotheses: int, need_attention: bool
) -> list[list[Hypothesis]]:
    """Batched beam search; returns each sentence's finished hypotheses, best first.

    Layout: the decoder rows are (active sentences x k slots), row = sentence_index * k + slot.
    cum (n_act, k) holds each slot's summed log-probability; -inf marks a dead slot (a copy of a
    live row kept only so every sentence has k rows; it can never be selected).

    Each step takes, per sentence, the beam_size best extensions of its live slots by summed
    log-probability. Among them, EOS extensions (and every extension at max length) become
    finished hypotheses, kept apart; the others are the next live beams. A sentence stops when
    it has no live beam, or when it has num_hypotheses finished ones and no live beam can still
    beat the worst of them: a live beam's final score is at most cum / max over its reachable
    lengths L of lp(L), since log-probabilities are <= 0. With beam_size = 1 this is greedy
    decoding exactly; with a beam as wide as the search space it is exhaustive search.
    """
    n, K, eos = prob.n, beam_size, prob.eos
    P = prob.prefix_lens
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    total = prob.total_steps()
    seq = _seq_buffer(prob, n, total + 1)
    act = np.arange(n)
    k = 1
    cum = np.zeros((n, 1), dtype=np.float64)
    attn_hist = None
    for t in range(total):
        logits, attn = prob.step(seq[:, t])
        if need_attention and attn is not None:
            if attn_hist is None:
                attn_hist = np.zeros((seq.shape[0], total) + attn.shape[1:], dtype=np.float32)
            attn_hist[:, t] = attn
        n_act = act.size
        g = t - P[act] + 1  # tokens generated so far by each active sentence (< 0: in prefix)
        generating = g >= 0
        c_val = np.full((n_act, K), -np.inf)
        c_slot = np.zeros((n_act, K), dtype=np.int64)
        c_tok = np.zeros((n_act, K), dtype=np.int64)
        if generating.any():
            _beam_candidates(prob, logits, act, g, generating, cum, k, K, c_val, c_slot, c_tok)
        if not generating.all():  # sentences still reading their prefix keep their slots
            fi = np.flatnonzero(~generating)
            c_val[fi, :k] = cum[fi]
            c_slot[fi, :k] = np.arange(k)
            c_tok[fi, :k] = seq[fi[:, None] * k + np.arange(k), t + 1]
        finite = c_val > -np.inf
        g_new = g + 1
        at_max = generating & (g_new == prob.max_gen[act])
        done = finite & generating[:, None] & at_max[:, None]
        if eos is not None:
            done |= finite & generating[:, None] & (c_tok == eos)
        live = finite & ~done
        for i, j in zip(*np.nonzero(done), strict=True):
            b = int(act[i])
            parent = i * k + int(c_slot[i, j])
            hyp = _finish_beam(prob, b, seq, attn_hist, parent, t, int(c_tok[i, j]),
                               float(c_val[i, j]))
            _add_finished(finished[b], hyp, num_hypotheses)
        cont = live.any(axis=1)
        cont &= ~_cannot_improve(prob, finished, act, live, c_val, g_new, num_hypotheses)
        if not cont.any():
            break
        ci = np.flatnonzero(cont)
        k_new = int(live[ci].sum(axis=1).max())
        perm = np.argsort(~live[ci], axis=1, kind="stable")[:, :k_new]  # live first, in order
        s_live = np.take_along_axis(live[ci], perm, 1)
        s_slot = np.take_along_axis(c_slot[ci], perm, 1)
        s_tok = np.take_along_axis(c_tok[ci], perm, 1)
        s_val = np.take_along_axis(c_val[ci], perm, 1)
        s_slot = np.where(s_live, s_slot, s_slot[:, :1])  # dead slots copy the best live one
        s_tok = np.where(s_live, s_tok, s_tok[:, :1])
        s_val = np.where(s_live, s_val, -np.inf)
        if k_new == k:  # slots are interchangeable: keep each parent's first child in its row
            keep = _stay_in_place(s_slot)
            s_slot, s_tok, s_val = (np.take_along_axis(x, keep, 1) for x in (s_slot, s_tok, s_val))
        parents = (ci[:, None] * k + s_slot).ravel()
        if parents.size != seq.shape[0] or (parents != np.arange(parents.size)).any():
            prob.state.reorder(parents)
            seq = seq[parents]
            if attn_hist is not None:
                attn_hist = attn_hist[parents]
        seq[:, t + 1] = s_tok.ravel()
        cum, act, k = s_val, act[ci], k_new
    return finished


def _stay_in_place(slots: np.ndarray) -> np.ndarray:
    """A column order per row of `slots` (n, k) (each beam's parent slot) that puts the first
    beam of every parent in the parent's own slot and the others in the slots left free, so
    that reordering the decoder state moves only those others."""
    order = np.empty_like(slots)
    for r, row in enumerate(slots.tolist()):
        place = [-1] * len(row)
        rest = []
        for j, slot in enumerate(row):
            if place[slot] < 0:
                place[slot] = j
            else:
                rest.append(j)
        free = [p for p in range(len(row)) if place[p] < 0]
        for p, j in zip(free, rest, strict=True):
            place[p] = j
        order[r] = place
    return order


def _beam_candidates(prob, logits, act, g, generating, cum, k, K, c_val, c_slot, c_tok):
    """Fills the K best extensions (value, slot, token) of every generating sentence, best first."""
    logp = _log_softmax_(logits)
    V = logp.shape[1]
    lp3 = logp.reshape(act.size, k, V)
    if prob.eos is not None:
        no_eos = np.flatnonzero(generating & (g < prob.min_gen[act]))
        if no_eos.size:
            lp3[no_eos, :, prob.eos] = -np.inf
    gi = np.flatnonzero(generating)
    sub = lp3 if gi.size == act.size else lp3[gi]
    rows = sub.reshape(-1, V)
    kk = min(K, V)
    # The K best of a sentence lie among the K best of each of its rows (cum is per row).
    idx = _topk_rows(rows, kk)
    val = np.take_along_axis(rows, idx, 1).astype(np.float64)
    cand = (cum[gi][:, :, None] + val.reshape(gi.size, k, kk)).reshape(gi.size, k * kk)
    m = min(K, k * kk)
    order = np.argsort(-cand, axis=1, kind="stable")[:, :m]
    c_val[gi, :m] = np.take_along_axis(cand, order, 1)
    c_slot[gi, :m] = order // kk
    c_tok[gi, :m] = np.take_along_axis(idx.reshape(gi.size, k * kk), order, 1)


def _finish_beam(prob, b, seq, attn_hist, parent, t, token, logprob) -> Hypothesis:
    p = prob.prefixes[b].size
    toks = seq[parent, p : t + 1].tolist()
    length = len(toks) + 1  # tokens scored, EOS included
    if token != prob.eos:
        toks.append(token)
    attn = _hyp_attention(prob, attn_hist, parent, b, p - 1, len(toks))
    score = float(logprob / _lp(length, prob.alpha))
    return Hypothesis(score, logprob, toks, attn)


def _add_finished(hyps: list[Hypothesis], hyp: Hypothesis, limit: int) -> None:
    """Inserts keeping the list sorted best first (ties: earlier first), at most limit long."""
    pos = len(hyps)
    while pos > 0 and hyps[pos - 1].score < hyp.score:
        pos -= 1
    if pos < limit:
        hyps.insert(pos, hyp)
        del hyps[limit:]


def _cannot_improve(prob, finished, act, live, c_val, g_new, num_hypotheses) -> np.ndarray:
    """(n_act,) bool: the sentence has its n-best and no live beam can enter it any more."""
    out = np.zeros(act.size, dtype=bool)
    full = np.array([len(finished[b]) >= num_hypotheses for b in act])
    if not full.any():
        return out
    best_live = np.where(live, c_val, -np.inf).max(axis=1)
    # Reachable final lengths are g_new + 1 .. max_gen; lp is monotonic in L.
    # (bound is also right if rounding made a sum slightly positive: lp's extremes are at ends)
    far = _lp(prob.max_gen[act], prob.alpha)
    near = _lp(g_new + 1, prob.alpha)
    with np.errstate(invalid="ignore"):
        bound = np.maximum(best_live / far, best_live / near)
    worst = np.array([finished[b][-1].score if len(finished[b]) else np.inf for b in act])
    out[full] = bound[full] <= worst[full]
    return out


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
        with np.errstate(over="ignore"):
            x = (x - x.max(axis=1, keepdims=True)) / temperature
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
