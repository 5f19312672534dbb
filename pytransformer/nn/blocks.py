"""Residual blocks, encoder/decoder layers and stacks.

Post-norm (the paper):  y = LN(x + Dropout(f(x)))
Pre-norm:               y = x + Dropout(f(LN(x)))   and the stack ends with a final LayerNorm.
Dropout sits on each sub-layer's output and on the embeddings, as in the paper (no dropout inside
the FFN); attention dropout (on the attention probabilities) is separate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .attention import CrossAttention, SelfAttention
from .layers import Context, Dropout, FeedForward, LayerNorm, Linear
from .layout import Layout
from .params import ParamStore


class Residual:
    """Wraps a sub-layer (anything with forward/backward) with dropout, residual and LayerNorm."""

    def __init__(
        self, sublayer: Any, norm: LayerNorm, dropout: float, norm_first: bool, ctx: Context
    ) -> None:
        self.sublayer = sublayer
        self.norm = norm
        self.dropout = Dropout(dropout, ctx)
        self.norm_first = norm_first

    def forward(self, x: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        if self.norm_first:
            a = self.dropout.forward(self.sublayer.forward(self.norm.forward(x), *args, **kwargs))
            a += x  # a is a fresh array owned here (sub-layer outputs are never kept)
            return a
        a = self.dropout.forward(self.sublayer.forward(x, *args, **kwargs))
        return self.norm.add_forward(a, x)

    def backward(self, dy: np.ndarray, *args: Any) -> np.ndarray:
        if self.norm_first:
            dh = self.sublayer.backward(self.dropout.backward(dy), *args)
            dx = self.norm.backward(dh)
            dx += dy
            return dx
        ds = self.norm.backward(dy)
        dx = self.sublayer.backward(self.dropout.backward(ds), *args)
        dx += ds
        return dx


class EncoderLayer:
    """Self-attention (keys masked by length) then FFN, each in a residual block."""

    def __init__(self, store: ParamStore, name: str, cfg: Any, ctx: Context) -> None:
        C = cfg.d_model
        attn = SelfAttention(
            store, f"{name}.self_attn", C, cfg.num_heads, cfg.attention_dropout, ctx
        )
        self.attn_block = Residual(
            attn,
            LayerNorm(store, f"{name}.norm1", C, cfg.layer_norm_eps, ctx),
            cfg.dropout,
            cfg.norm_first,
            ctx,
        )
        ffn = FeedForward(store, f"{name}.ffn", C, cfg.d_ff, cfg.activation, ctx)
        self.ffn_block = Residual(
            ffn,
            LayerNorm(store, f"{name}.norm2", C, cfg.layer_norm_eps, ctx),
            cfg.dropout,
            cfg.norm_first,
            ctx,
        )

    def forward(self, x: np.ndarray, layout: Layout) -> np.ndarray:
        """x (N, C) packed rows of `layout`."""
        return self.ffn_block.forward(self.attn_block.forward(x, layout))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self.attn_block.backward(self.ffn_block.backward(dy))


class DecoderLayer:
    """Causal self-attention, cross-attention to the encoder memory (absent in a decoder-only LM),
    then FFN, each in a residual block."""

    def __init__(
        self, store: ParamStore, name: str, cfg: Any, ctx: Context, cross: bool = True
    ) -> None:
        C, eps = cfg.d_model, cfg.layer_norm_eps
        attn = SelfAttention(
            store, f"{name}.self_attn", C, cfg.num_heads, cfg.attention_dropout, ctx
        )
        self.attn_block = Residual(
            attn, LayerNorm(store, f"{name}.norm1", C, eps, ctx), cfg.dropout, cfg.norm_first, ctx
        )
        self.cross_block = None
        if cross:
            xattn = CrossAttention(
                store, f"{name}.cross_attn", C, cfg.num_heads, cfg.attention_dropout, ctx
            )
            self.cross_block = Residual(
                xattn,
                LayerNorm(store, f"{name}.norm2", C, eps, ctx),
                cfg.dropout,
                cfg.norm_first,
                ctx,
            )
        ffn = FeedForward(store, f"{name}.ffn", C, cfg.d_ff, cfg.activation, ctx)
        self.ffn_block = Residual(
            ffn, LayerNorm(store, f"{name}.norm3", C, eps, ctx), cfg.dropout, cfg.norm_first, ctx
        )

    @property
    def cross_attn(self) -> CrossAttention:
        return self.cross_block.sublayer

    def forward(
        self,
        x: np.ndarray,
        layout: Layout,
        memory: np.ndarray | None,
        memory_layout: Layout | None,
        kv_cache: np.ndarray | None = None,
        pos: int = 0,
        cross_kv: np.ndarray | None = None,
        probs_out: list | None = None,
        probs_heads: bool = False,
    ) -> np.ndarray:
        """x (N, C) packed rows of `layout`; memory (N_s, C) packed rows of `memory_layout`."""
        x = self.attn_block.forward(x, layout, causal=True, kv_cache=kv_cache, pos=pos)
        if self.cross_block is not None:
            x = self.cross_block.forward(
                x,
                layout,
                memory,
                memory_layout,
                kv=cross_kv,
                probs_out=probs_out,
                probs_heads=probs_heads,
            )
        return self.ffn_block.forward(x)

    def backward(self, dy: np.ndarray, dmemory: np.ndarray | None) -> np.ndarray:
        dy = self.ffn_block.backward(dy)
        if self.cross_block is not None:
            dy = self.cross_block.backward(dy, dmemory)
        return self.attn_block.backward(dy)


class Encoder:
    """A stack of encoder layers (plus the final LayerNorm of pre-norm)."""

    def __init__(self, store: ParamStore, name: str, cfg: Any, ctx: Context) -> None:
        self.layers = [
            EncoderLayer(store, f"{name}.layers.{i}", cfg, ctx)
            for i in range(cfg.num_encoder_layers)
        ]
        self.norm = (
            LayerNorm(store, f"{name}.norm", cfg.d_model, cfg.layer_norm_eps, ctx)
            if cfg.norm_first
            else None
        )

    def forward(self, x: np.ndarray, layout: Layout) -> np.ndarray:
        """x (N, C) packed rows of `layout` -> the memory (N, C)."""
        for layer in self.layers:
            x = layer.forward(x, layout)
        return self.norm.forward(x) if self.norm is not None else x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self.norm is not None:
            dy = self.norm.backward(dy)
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


class Decoder:
    """A stack of decoder layers (plus the final LayerNorm of pre-norm)."""

    def __init__(
        self, store: ParamStore, name: str, cfg: Any, ctx: Context, cross: bool = True
    ) -> None:
        self.layers = [
            DecoderLayer(store, f"{name}.layers.{i}", cfg, ctx, cross)
            for i in range(cfg.num_decoder_layers)
        ]
        self.norm = (
            LayerNorm(store, f"{name}.norm", cfg.d_model, cfg.layer_norm_eps, ctx)
            if cfg.norm_first
            else None
        )

    def forward(
        self,
        x: np.ndarray,
        layout: Layout,
        memory: np.ndarray | None = None,
        memory_layout: Layout | None = None,
    ) -> np.ndarray:
        """x (N_t, C) packed rows of `layout`; memory (N_s, C) packed rows of `memory_layout`."""
        for layer in self.layers:
            x = layer.forward(x, layout, memory, memory_layout)
        return self.norm.forward(x) if self.norm is not None else x

    def step(
        self,
        x: np.ndarray,
        pos: int,
        kv_caches: list[np.ndarray],
        cross_kvs: list[np.ndarray] | None,
        memory_layout: Layout | None,
        probs_out: list | None = None,
        probs_layer: int = -1,
        probs_heads: bool = False,
    ) -> np.ndarray:
        """Incremental decoding: x (B*L, C), rows of a dense (B, L) layout at positions
        [pos, pos+L), against the caches. probs_out: when a list, the cross-attention of layer
        probs_layer is appended, (B, L, S) averaged over heads or (B, H, L, S) with probs_heads."""
        chosen = probs_layer % len(self.layers)
        layout = Layout(kv_caches[0].shape[0], x.shape[0] // kv_caches[0].shape[0])
        for i, layer in enumerate(self.layers):
            x = layer.forward(
                x,
                layout,
                None,
                memory_layout,
                kv_cache=kv_caches[i],
                pos=pos,
                cross_kv=cross_kvs[i] if cross_kvs is not None else None,
                probs_out=probs_out if i == chosen else None,
                probs_heads=probs_heads,
            )
        return self.norm.forward(x) if self.norm is not None else x

    def step_linears(self) -> list[Linear]:
        """The Linear layers `step` runs every position (not the cross-attention K/V projection,
        which runs once per source)."""
        out = []
        for layer in self.layers:
            attn = layer.attn_block.sublayer
            out += [attn.qkv, attn.out]
            if layer.cross_block is not None:
                out += [layer.cross_attn.q, layer.cross_attn.out]
            ffn = layer.ffn_block.sublayer
            out += [ffn.fc1, ffn.fc2]
        return out

    def backward(self, dy: np.ndarray, dmemory: np.ndarray | None = None) -> np.ndarray:
        if self.norm is not None:
            dy = self.norm.backward(dy)
        for layer in reversed(self.layers):
            dy = layer.backward(dy, dmemory)
        return dy
