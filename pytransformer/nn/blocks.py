"""Residual blocks, encoder/decoder layers and stacks.

Post-norm (the paper):  y = LN(x + Dropout(f(x)))
Pre-norm:               y = x + Dropout(f(LN(x)))   and the stack ends with a final LayerNorm.
Dropout sits on each sub-layer's output and on the embeddings, as in the paper (no dropout inside
the FFN); attention dropout (on the attention probabilities) is separate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .attention import AttentionCapture, CrossAttention, SelfAttention
from .layers import Context, Dropout, FeedForward, LayerNorm, Linear
from .layout import Layout
from .params import ParamStore

Sublayer = Callable[[np.ndarray], np.ndarray]
# A sub-layer's backward: (d of its output, dx_out) -> d of its input, added into dx_out when that
# is given (the last product then accumulates into it) or else a fresh array.
SublayerBackward = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


class Residual:
    """Dropout, residual connection and LayerNorm around a sub-layer function f: the caller
    passes f (for example ``lambda h: attn.forward(h, layout)``), so what flows into the
    sub-layer is written where the block is used."""

    def __init__(self, norm: LayerNorm, dropout: float, norm_first: bool, ctx: Context) -> None:
        self.norm = norm
        self.dropout = Dropout(dropout, ctx)
        self.norm_first = norm_first

    def forward(self, x: np.ndarray, f: Sublayer) -> np.ndarray:
        if self.norm_first:
            a = self.dropout.forward(f(self.norm.forward(x)))
            a += x  # a is a fresh array owned here (sub-layer outputs are never kept)
            return a
        return self.norm.add_forward(self.dropout.forward(f(x)), x)

    def backward(self, dy: np.ndarray, f_backward: SublayerBackward) -> np.ndarray:
        """f_backward: the sub-layer's backward (see SublayerBackward)."""
        if self.norm_first:
            dx = self.norm.backward(f_backward(self.dropout.backward(dy), None))
            dx += dy
            return dx
        ds = self.norm.backward(dy)  # a fresh array, only needed for the residual's share
        dsub = self.dropout.backward(ds)
        if dsub is ds:  # no dropout: the sub-layer's input would alias its output
            dx = f_backward(dsub, None)
            dx += ds
            return dx
        # The residual's share rides on the sub-layer's last product (no separate pass).
        return f_backward(dsub, ds)


def _residual(store: ParamStore, name: str, cfg: Any, ctx: Context) -> Residual:
    norm = LayerNorm(store, name, cfg.d_model, cfg.layer_norm_eps, ctx)
    return Residual(norm, cfg.dropout, cfg.norm_first, ctx)


def _self_attention(
    store: ParamStore, name: str, cfg: Any, ctx: Context, window: int | None
) -> SelfAttention:
    return SelfAttention(
        store, name, cfg.d_model, cfg.num_heads, cfg.attention_dropout, ctx, window
    )


def _final_norm(store: ParamStore, name: str, cfg: Any, ctx: Context) -> LayerNorm | None:
    """The LayerNorm that ends a pre-norm stack (post-norm stacks end normalised already)."""
    if not cfg.norm_first:
        return None
    return LayerNorm(store, f"{name}.norm", cfg.d_model, cfg.layer_norm_eps, ctx)


class EncoderLayer:
    """Self-attention (keys masked by length) then FFN, each in a residual block."""

    def __init__(
        self, store: ParamStore, name: str, cfg: Any, ctx: Context, window: int | None = None
    ) -> None:
        self.self_attn = _self_attention(store, f"{name}.self_attn", cfg, ctx, window)
        self.attn_block = _residual(store, f"{name}.norm1", cfg, ctx)
        self.ffn = FeedForward(store, f"{name}.ffn", cfg.d_model, cfg.d_ff, cfg.activation, ctx)
        self.ffn_block = _residual(store, f"{name}.norm2", cfg, ctx)

    def forward(self, x: np.ndarray, layout: Layout) -> np.ndarray:
        """x (N, C) packed rows of `layout`."""
        x = self.attn_block.forward(x, lambda h: self.self_attn.forward(h, layout))
        return self.ffn_block.forward(x, self.ffn.forward)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dy = self.ffn_block.backward(dy, self.ffn.backward)
        return self.attn_block.backward(dy, self.self_attn.backward)


class DecoderLayer:
    """Causal self-attention, cross-attention to the encoder memory (absent in a decoder-only LM),
    then FFN, each in a residual block. `forward` runs whole target sequences (training, teacher
    forcing); `step` runs one position of incremental decoding against caches."""

    def __init__(
        self,
        store: ParamStore,
        name: str,
        cfg: Any,
        ctx: Context,
        cross: bool = True,
        window: int | None = None,
    ) -> None:
        self.self_attn = _self_attention(store, f"{name}.self_attn", cfg, ctx, window)
        self.attn_block = _residual(store, f"{name}.norm1", cfg, ctx)
        self.cross_attn: CrossAttention | None = None
        self.cross_block: Residual | None = None
        if cross:
            self.cross_attn = CrossAttention(
                store, f"{name}.cross_attn", cfg.d_model, cfg.num_heads, cfg.attention_dropout, ctx
            )
            self.cross_block = _residual(store, f"{name}.norm2", cfg, ctx)
        self.ffn = FeedForward(store, f"{name}.ffn", cfg.d_model, cfg.d_ff, cfg.activation, ctx)
        self.ffn_block = _residual(store, f"{name}.norm3", cfg, ctx)

    def forward(
        self,
        x: np.ndarray,
        layout: Layout,
        memory: np.ndarray | None,
        memory_layout: Layout | None,
    ) -> np.ndarray:
        """x (N, C) packed rows of `layout`; memory (N_s, C) packed rows of `memory_layout`."""
        x = self.attn_block.forward(x, lambda h: self.self_attn.forward(h, layout, causal=True))
        if self.cross_attn is not None:
            x = self.cross_block.forward(
                x, lambda h: self.cross_attn.forward(h, layout, memory, memory_layout)
            )
        return self.ffn_block.forward(x, self.ffn.forward)

    def step(
        self,
        x: np.ndarray,
        pos: int,
        kv_cache: np.ndarray,
        cross_kv: np.ndarray | None,
        memory_layout: Layout | None,
        capture: AttentionCapture | None = None,
    ) -> np.ndarray:
        """x (B, C): position `pos` of B rows. kv_cache (B, max_steps, 2, H, D) receives this
        position's self-attention keys/values; cross_kv is the memory's projected keys/values
        (`CrossAttention.project_memory`); capture receives the cross-attention weights."""
        x = self.attn_block.forward(x, lambda h: self.self_attn.step(h, kv_cache, pos))
        if self.cross_attn is not None:
            x = self.cross_block.forward(
                x, lambda h: self.cross_attn.step(h, cross_kv, memory_layout, capture)
            )
        return self.ffn_block.forward(x, self.ffn.forward)

    def backward(self, dy: np.ndarray, dmemory: np.ndarray | None) -> np.ndarray:
        dy = self.ffn_block.backward(dy, self.ffn.backward)
        if self.cross_attn is not None:
            dy = self.cross_block.backward(
                dy, lambda d, out: self.cross_attn.backward(d, dmemory, out)
            )
        return self.attn_block.backward(dy, self.self_attn.backward)


class Encoder:
    """A stack of encoder layers (plus the final LayerNorm of pre-norm)."""

    def __init__(
        self, store: ParamStore, name: str, cfg: Any, ctx: Context, window: int | None = None
    ) -> None:
        """window: restricted self-attention (see SelfAttention); None attends everywhere."""
        self.layers = [
            EncoderLayer(store, f"{name}.layers.{i}", cfg, ctx, window)
            for i in range(cfg.num_encoder_layers)
        ]
        self.norm = _final_norm(store, name, cfg, ctx)

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
        self,
        store: ParamStore,
        name: str,
        cfg: Any,
        ctx: Context,
        cross: bool = True,
        window: int | None = None,
    ) -> None:
        """cross: layers attend to an encoder memory; window: as for Encoder (self-attention)."""
        self.layers = [
            DecoderLayer(store, f"{name}.layers.{i}", cfg, ctx, cross, window)
            for i in range(cfg.num_decoder_layers)
        ]
        self.norm = _final_norm(store, name, cfg, ctx)

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
        capture: AttentionCapture | None = None,
    ) -> np.ndarray:
        """Incremental decoding of one position: x (B, C) embedded tokens at position pos, against
        each layer's caches. capture: receives the cross-attention of layer capture.layer."""
        for i, layer in enumerate(self.layers):
            chosen = capture if capture is not None and capture.layer == i else None
            cross_kv = cross_kvs[i] if cross_kvs is not None else None
            x = layer.step(x, pos, kv_caches[i], cross_kv, memory_layout, chosen)
        return self.norm.forward(x) if self.norm is not None else x

    def step_linears(self) -> list[Linear]:
        """The Linear layers `step` runs every position (not the cross-attention K/V projection,
        which runs once per source)."""
        out = []
        for layer in self.layers:
            out += [layer.self_attn.qkv, layer.self_attn.out]
            if layer.cross_attn is not None:
                out += [layer.cross_attn.q, layer.cross_attn.out]
            out += [layer.ffn.fc1, layer.ffn.fc2]
        return out

    def backward(self, dy: np.ndarray, dmemory: np.ndarray | None = None) -> np.ndarray:
        if self.norm is not None:
            dy = self.norm.backward(dy)
        for layer in reversed(self.layers):
            dy = layer.backward(dy, dmemory)
        return dy
