"""PyTorch eager greedy and beam-search decoders over the KV-cache decoder of
tests/torch_reference.py (`TorchTransformer.init_state / decode_step / reorder_state`), on the
same weights as a pytransformer model: the peer of bench_decode.py.

The search follows pytransformer.decode.search's rules (EOS only after min_len tokens, max_len
tokens end a hypothesis, per sentence the beam_size best extensions, EOS ones finished and kept
apart, GNMT length penalty) written the way a PyTorch user would: log_softmax, topk over
beam x vocab, index_select of the caches. Finished sentences leave the batch in both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _encode(tm, sources: list[list[int]], pad: int):
    lengths = torch.tensor([len(s) for s in sources])
    src = torch.full((len(sources), int(lengths.max())), pad, dtype=torch.long)
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.as_tensor(s)
    return tm.encode(src, lengths), lengths


@torch.no_grad()
def greedy(tm, sources: list[list[int]], *, max_len: int, min_len: int = 0) -> list[list[int]]:
    """Greedy decoding of each source; token lists without BOS/EOS."""
    cfg = tm.cfg
    memory, lengths = _encode(tm, sources, cfg.pad_id)
    state = tm.init_state(memory, lengths, max_len)
    n = len(sources)
    act = torch.arange(n)
    out = torch.zeros(n, max_len, dtype=torch.long)
    tokens = torch.full((n,), cfg.bos_id, dtype=torch.long)
    results: list[list[int] | None] = [None] * n
    for t in range(max_len):
        logits = tm.decode_step(state, tokens)
        if t < min_len:
            logits[:, cfg.eos_id] = -float("inf")
        tokens = logits.argmax(dim=1)
        out[act, t] = tokens
        done = (tokens == cfg.eos_id) | (t + 1 == max_len)
        if done.any():
            for r in torch.nonzero(done).flatten().tolist():
                i = int(act[r])
                g = t + 1 - int(tokens[r] == cfg.eos_id)
                results[i] = out[i, :g].tolist()
            keep = torch.nonzero(~done).flatten()
            if keep.numel() == 0:
                break
            tm.reorder_state(state, keep)
            act, tokens = act[keep], tokens[keep]
    return results  # type: ignore[return-value]


@torch.no_grad()
def beam_search(
    tm,
    sources: list[list[int]],
    *,
    beam_size: int,
    max_len: int,
    min_len: int = 0,
    length_penalty: float = 0.6,
) -> list[list[int]]:
    """Batched beam search; returns the best hypothesis of each source."""
    cfg = tm.cfg
    K, eos = beam_size, cfg.eos_id
    memory, lengths = _encode(tm, sources, cfg.pad_id)
    state = tm.init_state(memory, lengths, max_len)
    n = len(sources)
    act = torch.arange(n)  # active sentences
    k = 1  # rows per active sentence
    cum = torch.zeros(n, 1)  # float32 scores, as fairseq keeps them
    hist = torch.zeros(n, 0, dtype=torch.long)
    tokens = torch.full((n,), cfg.bos_id, dtype=torch.long)
    best: list[tuple[float, list[int]]] = [(-float("inf"), [])] * n
    for t in range(max_len):
        logp = F.log_softmax(tm.decode_step(state, tokens), dim=1)
        if t < min_len:
            logp[:, eos] = -float("inf")
        V = logp.shape[1]
        cand = (cum.view(-1, 1) + logp).view(act.numel(), k * V)
        val, idx = cand.topk(K, dim=1)
        slot, tok = idx // V, idx % V
        lp = ((5.0 + t + 1) / 6.0) ** length_penalty
        fin = (tok == eos) | (t + 1 == max_len)
        fin &= val > -float("inf")
        for i, j in torch.nonzero(fin).tolist():
            b = int(act[i])
            score = float(val[i, j]) / lp
            if score > best[b][0]:
                h = hist[i * k + int(slot[i, j])].tolist()
                best[b] = (score, h if int(tok[i, j]) == eos else h + [int(tok[i, j])])
        live = ~fin & (val > -float("inf"))
        # A sentence continues while one of its live beams could still beat its best: its score
        # is at most cum / lp(max_len) (alpha >= 0).
        bound = torch.where(live, val, -float("inf")).max(dim=1).values
        bound = bound / (((5.0 + max_len) / 6.0) ** length_penalty)
        best_now = torch.tensor([best[int(b)][0] for b in act])
        cont = live.any(dim=1) & (bound > best_now)
        if not bool(cont.any()):
            break
        ci = torch.nonzero(cont).flatten()
        # keep the live candidates first (in score order); dead slots copy the best live one
        order = torch.argsort((~live[ci]).to(torch.int8), dim=1, stable=True)
        s_live = live[ci].gather(1, order)
        s_slot = slot[ci].gather(1, order)
        s_tok = tok[ci].gather(1, order)
        s_val = val[ci].gather(1, order)
        s_slot = torch.where(s_live, s_slot, s_slot[:, :1])
        s_tok = torch.where(s_live, s_tok, s_tok[:, :1])
        s_val = torch.where(s_live, s_val, torch.full_like(s_val, -float("inf")))
        parents = (ci[:, None] * k + s_slot).flatten()
        tm.reorder_state(state, parents)
        hist = torch.cat([hist[parents], s_tok.reshape(-1, 1)], dim=1)
        tokens = s_tok.flatten()
        cum, act, k = s_val, act[ci], K
    return [h for _, h in best]


def to_numpy_lists(x) -> list[list[int]]:
    return [list(map(int, np.asarray(r))) for r in x]
