"""Multi-head attention: self-attention with a fused QKV projection, cross-attention with a fused KV
projection. q, k and v reach `ops.attention` as strided views into the projection's output
(B, L, 3, H, D) — no transposes, no copies.

Dimension legend: B batch, Lq queries, Lk keys, H heads, D head dim, C = H*D.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from .layers import Context, Dropout, Linear
from .layout import Layout
from .params import ParamStore


class _Attention:
    """The scaled-dot-product core shared by both kinds: the flash kernel, or — only when attention
    dropout is active — an explicit path that materialises the probabilities (B*H, Lq, Lk)."""

    def __init__(
        self, num_heads: int, head_dim: int, attention_dropout: float, ctx: Context
    ) -> None:
        self.H = num_heads
        self.D = head_dim
        self.scale = head_dim**-0.5
        self.dropout = Dropout(attention_dropout, ctx)
        self.ctx = ctx
        self.saved: tuple | None = None

    def forward(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        key_lengths: np.ndarray | None,
        causal: bool,
        window: int | None = None,
    ) -> np.ndarray:
        """q (B,Lq,H,D), k/v (B,Lk,H,D) any strides -> out (B,Lq,H,D) C-contiguous. window:
        query i sees only the keys j with |i - j| <= window (None: no restriction)."""
        if self.dropout.active():
            return self._explicit_forward(q, k, v, key_lengths, causal, window)
        masks = dict(key_lengths=key_lengths, causal=causal, window=window)
        if not self.ctx.cache:
            return ops.attention(q, k, v, **masks)
        out, lse = ops.attention(q, k, v, return_lse=True, **masks)
        self.saved = ("flash", q, k, v, out, lse, masks)
        return out

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """dout (B,Lq,H,D) -> (dq, dk, dv), C-contiguous, shaped like q, k, v."""
        saved, self.saved = self.saved, None
        if saved[0] == "explicit":
            return self._explicit_backward(dout, *saved[1:])
        _, q, k, v, out, lse, masks = saved
        return ops.attention_backward(dout, q, k, v, out, lse, **masks)

    # -- explicit path (attention dropout) -------------------------------------------------------
    def _scores_mask(
        self,
        B: int,
        Lq: int,
        Lk: int,
        key_lengths: np.ndarray | None,
        causal: bool,
        window: int | None,
    ) -> np.ndarray | None:
        """(B, 1, Lq, Lk) True where a key may not be attended, or None when nothing is masked."""
        if key_lengths is None and not causal and window is None:
            return None
        mask = np.zeros((B, 1, Lq, Lk), bool)
        if key_lengths is not None:
            mask |= (np.arange(Lk)[None, :] >= key_lengths[:, None])[:, None, None, :]
        offset = np.arange(Lk)[None, :] - np.arange(Lq)[:, None]  # key minus query position
        if causal:
            mask |= offset > 0
        if window is not None:
            mask |= np.abs(offset) > window
        return mask

    def _explicit_forward(self, q, k, v, key_lengths, causal, window):
        B, Lq, H, D = q.shape
        Lk = k.shape[1]

        def heads(t: np.ndarray) -> np.ndarray:  # (B,L,H,D) -> (B*H, L, D)
            return np.ascontiguousarray(t.transpose(0, 2, 1, 3)).reshape(B * H, -1, D)

        qh, kh, vh = heads(q), heads(k), heads(v)
        s = ops.matmul(qh, kh, trans_b=True).reshape(B, H, Lq, Lk)
        s *= self.scale
        mask = self._scores_mask(B, Lq, Lk, key_lengths, causal, window)
        if mask is not None:
            np.putmask(s, np.broadcast_to(mask, s.shape), -np.inf)
        p = _softmax_rows(s).reshape(B * H, Lq, Lk)
        out = ops.matmul(self.dropout.forward(p), vh)
        if self.ctx.cache:
            self.saved = ("explicit", qh, kh, vh, p, (B, Lq, H, D))
        return np.ascontiguousarray(out.reshape(B, H, Lq, D).transpose(0, 2, 1, 3))

    def _explicit_backward(self, dout, qh, kh, vh, p, shape):
        B, Lq, H, D = shape
        doh = np.ascontiguousarray(dout.transpose(0, 2, 1, 3)).reshape(B * H, Lq, D)
        pd = ops.dropout(p, self.dropout.p, seed=self.dropout.seed)
        dvh = ops.matmul(pd, doh, trans_a=True)
        del pd
        dp = self.dropout.backward(ops.matmul(doh, vh, trans_b=True))
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
        ds *= self.scale
        dqh = ops.matmul(ds, kh)
        dkh = ops.matmul(ds, qh, trans_a=True)

        def unheads(t: np.ndarray) -> np.ndarray:  # (B*H, L, D) -> (B,L,H,D)
            return np.ascontiguousarray(t.reshape(B, H, -1, D).transpose(0, 2, 1, 3))

        return unheads(dqh), unheads(dkh), unheads(dvh)


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in place; rows with every entry -inf become zeros."""
    m = s.max(axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0.0
    s -= m
    np.exp(s, out=s)
    z = s.sum(axis=-1, keepdims=True)
    z[z == 0] = 1.0
    s /= z
    return s


def attention_probs(
    q: np.ndarray, k: np.ndarray, key_lengths: np.ndarray | None, average_heads: bool = True
) -> np.ndarray:
    """Softmax attention weights: q (B,Lq,H,D), k (B,Lk,H,D) -> (B, Lq, Lk) averaged over heads,
    or (B, H, Lq, Lk) per head."""
    s = np.einsum("bqhd,bkhd->bhqk", q, k, dtype=np.float32) * np.float32(q.shape[-1] ** -0.5)
    if key_lengths is not None:
        s[
            np.broadcast_to(
                (np.arange(k.shape[1])[None, :] >= key_lengths[:, None])[:, None, None, :], s.shape
            )
        ] = -np.inf
    p = _softmax_rows(s)
    return p.mean(axis=1) if average_heads else p


@dataclass
class AttentionCapture:
    """Asks a decoding step for the cross-attention weights of decoder layer `layer`: after the
    step, `probs` holds them, (B, L, S) averaged over heads or (B, H, L, S) with per_head."""

    layer: int
    per_head: bool = False
    probs: np.ndarray | None = None


class SelfAttention:
    """Self-attention over packed rows x (N, C) of a batch `layout` -> (N, C). Parameters qkv
    (3C, C) rows [q; k; v] and out (C, C). window: restricted self-attention, position i sees
    only the positions j with |i - j| <= window (None: all)."""

    def __init__(
        self,
        store: ParamStore,
        name: str,
        d_model: int,
        num_heads: int,
        attention_dropout: float,
        ctx: Context,
        window: int | None = None,
    ) -> None:
        self.qkv = Linear(store, f"{name}.qkv", d_model, 3 * d_model)
        self.out = Linear(store, f"{name}.out", d_model, d_model)
        self.core = _Attention(num_heads, d_model // num_heads, attention_dropout, ctx)
        self.window = window
        self.ctx = ctx
        self.saved: tuple | None = None

    def forward(self, x: np.ndarray, layout: Layout, causal: bool = False) -> np.ndarray:
        """Keys are masked by the layout's lengths (and causally when `causal`) and the window."""
        B, L, C = layout.B, layout.L, x.shape[-1]
        H, D = self.core.H, self.core.D
        qkv = layout.pad(self.qkv.forward(x)).reshape(B, L, 3, H, D)
        keys = None if causal else layout.lengths  # causal: padding only follows real keys
        ctx = self.core.forward(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], keys, causal, self.window
        )
        ctx = layout.pack(ctx.reshape(B, L, C))
        if self.ctx.cache:
            self.saved = (x, ctx, layout)
        return self.out.forward(ctx)

    def step(self, x: np.ndarray, kv_cache: np.ndarray, pos: int) -> np.ndarray:
        """Incremental causal decoding: x (B*L, C) holds B rows at positions [pos, pos+L); their
        keys/values are written into kv_cache (B, max_steps, 2, H, D) at those positions and the
        queries attend to positions [0, pos+L), or with a window to the last window + 1 of them
        (the kernel reads only those cache entries)."""
        B, C = kv_cache.shape[0], x.shape[-1]
        L = x.shape[0] // B
        qkv = self.qkv.forward(x).reshape(B, L, 3, self.core.H, self.core.D)
        kv_cache[:, pos : pos + L] = qkv[:, :, 1:]
        k, v = kv_cache[:, : pos + L, 0], kv_cache[:, : pos + L, 1]
        ctx = ops.attention(
            qkv[:, :, 0], k, v, causal=L > 1, query_offset=pos, window=self.window
        )
        return self.out.forward(ctx.reshape(B * L, C))

    def backward(self, dy: np.ndarray, dx_out: np.ndarray | None = None) -> np.ndarray:
        """dy (N, C) -> dx (N, C), added into dx_out when given."""
        x, ctx, layout = self.saved
        self.saved = None
        C = x.shape[-1]
        H, D = self.core.H, self.core.D
        dctx = self.out.backward(dy, ctx)
        del ctx
        dq, dk, dv = self.core.backward(layout.pad(dctx).reshape(layout.B, layout.L, H, D))
        del dctx
        dqkv = np.empty((layout.n, 3, H, D), np.float32)
        layout.pack_into(dqkv[:, 0], dq)
        layout.pack_into(dqkv[:, 1], dk)
        layout.pack_into(dqkv[:, 2], dv)
        del dq, dk, dv
        return self.qkv.backward(dqkv.reshape(layout.n, 3 * C), x, dx_out=dx_out)


class CrossAttention:
    """Cross-attention: packed queries x (N_t, C) of `layout` attend to the packed encoder memory
    (N_s, C) of `memory_layout`. Parameters q (C, C), kv (2C, C) rows [k; v], out (C, C)."""

    def __init__(
        self,
        store: ParamStore,
        name: str,
        d_model: int,
        num_heads: int,
        attention_dropout: float,
        ctx: Context,
    ) -> None:
        self.q = Linear(store, f"{name}.q", d_model, d_model)
        self.kv = Linear(store, f"{name}.kv", d_model, 2 * d_model)
        self.out = Linear(store, f"{name}.out", d_model, d_model)
        self.core = _Attention(num_heads, d_model // num_heads, attention_dropout, ctx)
        self.ctx = ctx
        self.saved: tuple | None = None

    def project_memory(self, memory: np.ndarray, memory_layout: Layout) -> np.ndarray:
        """Packed memory (N_s, C) -> keys/values (B, S, 2, H, D), zeros at padding."""
        kv = memory_layout.pad(self.kv.forward(memory))
        return kv.reshape(memory_layout.B, memory_layout.L, 2, self.core.H, self.core.D)

    def forward(
        self, x: np.ndarray, layout: Layout, memory: np.ndarray, memory_layout: Layout
    ) -> np.ndarray:
        """Training and teacher forcing: the keys/values are projected from memory here."""
        B, L, C = layout.B, layout.L, x.shape[-1]
        q = layout.pad(self.q.forward(x)).reshape(B, L, self.core.H, self.core.D)
        kv = self.project_memory(memory, memory_layout)
        ctx = self.core.forward(q, kv[:, :, 0], kv[:, :, 1], memory_layout.lengths, False)
        ctx = layout.pack(ctx.reshape(B, L, C))
        if self.ctx.cache:
            self.saved = (x, layout, memory, memory_layout, ctx)
        return self.out.forward(ctx)

    def step(
        self,
        x: np.ndarray,
        kv: np.ndarray,
        memory_layout: Layout,
        capture: AttentionCapture | None = None,
    ) -> np.ndarray:
        """Incremental decoding: x (B, C), one position of B rows, against kv, the
        `project_memory` of G = memory_layout.B sources. With G < B the g = B / G consecutive
        rows of a source (its beams) attend as g queries of its one memory row. capture: receives
        the attention weights."""
        B, C = x.shape
        G, H, D = memory_layout.B, self.core.H, self.core.D
        if B % G:
            raise ValueError(f"{B} rows cannot share {G} memory rows")
        q = self.q.forward(x).reshape(G, B // G, H, D)
        keys = memory_layout.lengths
        ctx = self.core.forward(q, kv[:, :, 0], kv[:, :, 1], keys, False)
        if capture is not None:
            p = attention_probs(q, kv[:, :, 0], keys, not capture.per_head)
            # (G, g, S) or (G, H, g, S) -> one query per row
            p = np.moveaxis(p, 2, 1) if capture.per_head else p
            capture.probs = p.reshape((B, H, 1, -1) if capture.per_head else (B, 1, -1))
        return self.out.forward(ctx.reshape(B, C))

    def backward(
        self, dy: np.ndarray, dmemory: np.ndarray, dx_out: np.ndarray | None = None
    ) -> np.ndarray:
        """Returns dx (added into dx_out when given); adds this layer's contribution into dmemory
        (N_s, C) in place."""
        x, layout, memory, memory_layout, ctx = self.saved
        self.saved = None
        C = x.shape[-1]
        H, D = self.core.H, self.core.D
        dctx = self.out.backward(dy, ctx)
        del ctx
        dq, dk, dv = self.core.backward(layout.pad(dctx).reshape(layout.B, layout.L, H, D))
        del dctx
        dkv = np.empty((memory_layout.n, 2, H, D), np.float32)
        memory_layout.pack_into(dkv[:, 0], dk)
        memory_layout.pack_into(dkv[:, 1], dv)
        del dk, dv
        self.kv.backward(dkv.reshape(memory_layout.n, 2 * C), memory, dx_out=dmemory)
        return self.q.backward(layout.pack(dq).reshape(layout.n, C), x, dx_out=dx_out)
