"""A PyTorch implementation of pytransformer's architecture, written independently of it, that
loads our state_dict — the oracle of the parity tests and the PyTorch side of the benchmarks.

Usage::

    from torch_reference import build_torch_model
    tm = build_torch_model(config, model.state_dict())        # kind inferred from the keys
    logits = tm(src, src_lengths, tgt_in)                      # Transformer: (B, T, V)
    loss = tm.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=0.1)
    grads = {n: p.grad for n, p in tm.named_parameters()}      # same names as model.gradients()

`config` is a pytransformer.TransformerConfig (or its dict); `state_dict` maps our parameter
names to arrays. Inputs may be numpy arrays or torch tensors. Kinds: "transformer"
(`TorchTransformer`: forward(src, src_lengths, tgt_in), loss(...), encode, init_state,
decode_step, reorder_state — a KV-cache decoder for decoding benchmarks), "lm" (`TorchLM`:
forward(ids), loss(tgt_in, tgt_out, label_smoothing), init_state(B, max_steps), decode_step) and
"encoder" (`TorchEncoderModel`: forward(src, src_lengths) -> per-token logits, encode).

The architecture, stated once: token embedding x sqrt(C) + sinusoidal positions (sin on even
dims, cos on odd), dropout; post-norm layers y = LN(x + Dropout(f(x))) or pre-norm
y = x + Dropout(f(LN(x))) with a final LN per stack; self-attention from one fused (3C, C) QKV
projection, cross-attention from a (C, C) Q and a fused (2C, C) KV projection, scaled dot product
with source keys masked by length and causal decoder self-attention (each stack's self-attention
optionally restricted to |i - j| <= its window); FFN fc2(act(fc1(x))) with no
inner dropout; output projection (tied per config.tie_embeddings) with an optional bias;
label-smoothed cross-entropy ignoring pad_id (torch's definition).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _cfg(config: Any) -> Any:
    if isinstance(config, dict):
        from pytransformer import TransformerConfig

        return TransformerConfig.from_dict(config)
    return config


def _t(x: Any, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def _positions(max_len: int, d_model: int) -> torch.Tensor:
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)[:, : d_model // 2]
    return pe.float()


def _key_mask(lengths: torch.Tensor | None, S: int) -> torch.Tensor | None:
    """(B, 1, 1, S) True where a key may be attended (SDPA's convention)."""
    if lengths is None:
        return None
    return (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]


def _self_mask(lengths: torch.Tensor | None, L: int, causal: bool, window: int) -> torch.Tensor:
    """(B or 1, 1, L, L) True where query i may attend key j: |i - j| <= window, j <= i when
    causal, j below the length. A row left with no key (a padding query past its band) attends
    everything instead: its output is padding, but SDPA would make it NaN, and a NaN value
    poisons even the rows that mask it (0 * NaN)."""
    offset = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # key minus query position
    keep = (offset.abs() <= window)[None, None]
    if causal:
        keep = keep & (offset <= 0)
    key_mask = _key_mask(lengths, L)
    if key_mask is not None:
        keep = keep & key_mask
    return keep | ~keep.any(-1, keepdim=True)


class _Weight(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


class _Output(nn.Module):
    def __init__(self, C: int, V: int, own_weight: bool, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(V, C)) if own_weight else None
        self.bias = nn.Parameter(torch.empty(V)) if bias else None


class SelfAttention(nn.Module):
    def __init__(self, C: int, H: int, p_attn: float, window: int | None = None) -> None:
        super().__init__()
        self.H, self.p_attn, self.window = H, p_attn, window
        self.qkv = nn.Linear(C, 3 * C)
        self.out = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None, causal: bool) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        p = self.p_attn if self.training else 0.0
        if self.window is None:
            mask = _key_mask(lengths, L)
        else:
            mask, causal = _self_mask(lengths, L, causal, self.window), False
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
        )
        return self.out(ctx.transpose(1, 2).reshape(B, L, C))

    def step(self, x: torch.Tensor, cache: torch.Tensor, pos: int) -> torch.Tensor:
        """x (B, 1, C); cache (2, B, H, max_steps, D) gets this position's k/v."""
        B, _, C = x.shape
        q, k, v = self.qkv(x).view(B, 1, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        cache[0, :, :, pos : pos + 1] = k
        cache[1, :, :, pos : pos + 1] = v
        start = 0 if self.window is None else max(0, pos - self.window)
        ctx = F.scaled_dot_product_attention(
            q, cache[0, :, :, start : pos + 1], cache[1, :, :, start : pos + 1]
        )
        return self.out(ctx.transpose(1, 2).reshape(B, 1, C))


class CrossAttention(nn.Module):
    def __init__(self, C: int, H: int, p_attn: float) -> None:
        super().__init__()
        self.H, self.p_attn = H, p_attn
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * C)
        self.out = nn.Linear(C, C)

    def project(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, C = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        lengths: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        k, v = kv if kv is not None else self.project(memory)
        q = self.q(x).view(B, T, self.H, C // self.H).transpose(1, 2)
        p = self.p_attn if self.training else 0.0
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=_key_mask(lengths, k.shape[2]), dropout_p=p
        )
        return self.out(ctx.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, C: int, F_: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(C, F_)
        self.fc2 = nn.Linear(F_, C)
        self.act = F.relu if activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Residual wrapper shared by all layers (post-norm or pre-norm)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.drop = nn.Dropout(cfg.dropout)

    def residual(self, x: torch.Tensor, norm: nn.LayerNorm, f: Any) -> torch.Tensor:
        if self.norm_first:
            return x + self.drop(f(norm(x)))
        return norm(x + self.drop(f(x)))


class EncoderLayer(_Block):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        C = cfg.d_model
        self.self_attn = SelfAttention(
            C, cfg.num_heads, cfg.attention_dropout, cfg.encoder_attention_window
        )
        self.ffn = FeedForward(C, cfg.d_ff, cfg.activation)
        self.norm1 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.residual(x, self.norm1, lambda h: self.self_attn(h, lengths, False))
        return self.residual(x, self.norm2, self.ffn)


class DecoderLayer(_Block):
    def __init__(self, cfg: Any, cross: bool) -> None:
        super().__init__(cfg)
        C = cfg.d_model
        self.self_attn = SelfAttention(
            C, cfg.num_heads, cfg.attention_dropout, cfg.decoder_attention_window
        )
        self.cross_attn = CrossAttention(C, cfg.num_heads, cfg.attention_dropout) if cross else None
        self.ffn = FeedForward(C, cfg.d_ff, cfg.activation)
        self.norm1 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(C, eps=cfg.layer_norm_eps) if cross else None
        self.norm3 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        lengths: torch.Tensor | None,
        cache: torch.Tensor | None = None,
        pos: int = 0,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if cache is None:
            x = self.residual(x, self.norm1, lambda h: self.self_attn(h, None, True))
        else:
            x = self.residual(x, self.norm1, lambda h: self.self_attn.step(h, cache, pos))
        if self.cross_attn is not None:
            x = self.residual(
                x, self.norm2, lambda h: self.cross_attn(h, memory, lengths, cross_kv)
            )
        return self.residual(x, self.norm3, self.ffn)


class _Stack(nn.Module):
    def __init__(self, layers: list[nn.Module], cfg: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x


class _Base(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("pe", _positions(cfg.max_len, cfg.d_model), persistent=False)

    def embed(self, weight: torch.Tensor, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = (
            F.embedding(ids, weight) * math.sqrt(self.cfg.d_model)
            + self.pe[start : start + ids.shape[1]]
        )
        return self.drop(x)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.out_weight(), self.output.bias)

    def xent(
        self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
    ) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            _t(targets).reshape(-1),
            ignore_index=self.cfg.pad_id,
            label_smoothing=label_smoothing,
        )


class TorchTransformer(_Base):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        C = cfg.d_model
        tie = cfg.tie_embeddings
        if tie == "all":
            self.embed_ = _Weight(cfg.src_vocab_size, C)
        else:
            self.src_embed = _Weight(cfg.src_vocab_size, C)
            self.tgt_embed = _Weight(cfg.tgt_vocab_size, C)
        self.output = _Output(C, cfg.tgt_vocab_size, tie == "none", cfg.output_bias)
        self.encoder = _Stack([EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)], cfg)
        self.decoder = _Stack([DecoderLayer(cfg, True) for _ in range(cfg.num_decoder_layers)], cfg)

    def src_weight(self) -> torch.Tensor:
        return self.embed_.weight if self.cfg.tie_embeddings == "all" else self.src_embed.weight

    def tgt_weight(self) -> torch.Tensor:
        return self.embed_.weight if self.cfg.tie_embeddings == "all" else self.tgt_embed.weight

    def out_weight(self) -> torch.Tensor:
        return self.output.weight if self.cfg.tie_embeddings == "none" else self.tgt_weight()

    def encode(self, src: Any, src_lengths: Any) -> torch.Tensor:
        src, lengths = _t(src), _t(src_lengths)
        x = self.embed(self.src_weight(), src)
        for layer in self.encoder.layers:
            x = layer(x, lengths)
        return self.encoder.finish(x)

    def forward(self, src: Any, src_lengths: Any, tgt_in: Any) -> torch.Tensor:
        lengths = _t(src_lengths)
        memory = self.encode(src, lengths)
        x = self.embed(self.tgt_weight(), _t(tgt_in))
        for layer in self.decoder.layers:
            x = layer(x, memory, lengths)
        return self.project(self.decoder.finish(x))

    def loss(
        self, src: Any, src_lengths: Any, tgt_in: Any, tgt_out: Any, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        return self.xent(self(src, src_lengths, tgt_in), tgt_out, label_smoothing)

    # -- KV-cache decoding (for decoding benchmarks and cross-checks) ---------------------------
    @torch.no_grad()
    def init_state(self, memory: torch.Tensor, src_lengths: Any, max_steps: int) -> dict[str, Any]:
        B, _, C = memory.shape
        H = self.cfg.num_heads
        return {
            "step": 0,
            "lengths": _t(src_lengths),
            "cross": [layer.cross_attn.project(memory) for layer in self.decoder.layers],
            "caches": [torch.empty(2, B, H, max_steps, C // H) for _ in self.decoder.layers],
        }

    @torch.no_grad()
    def decode_step(self, state: dict[str, Any], tokens: Any) -> torch.Tensor:
        pos = state["step"]
        x = self.embed(self.tgt_weight(), _t(tokens)[:, None], start=pos)
        for layer, cache, kv in zip(
            self.decoder.layers, state["caches"], state["cross"], strict=True
        ):
            x = layer(x, None, state["lengths"], cache=cache, pos=pos, cross_kv=kv)
        state["step"] = pos + 1
        return self.project(self.decoder.finish(x))[:, 0]

    @staticmethod
    def reorder_state(state: dict[str, Any], indices: Any) -> None:
        idx, t = _t(indices), state["step"]
        state["caches"] = [_reorder_cache(c, idx, t) for c in state["caches"]]
        state["cross"] = [(k[idx], v[idx]) for k, v in state["cross"]]
        state["lengths"] = state["lengths"][idx]


def _reorder_cache(cache: torch.Tensor, idx: torch.Tensor, t: int) -> torch.Tensor:
    new = torch.empty((cache.shape[0], idx.numel()) + tuple(cache.shape[2:]))
    new[:, :, :, :t] = cache[:, idx, :, :t]
    return new


class TorchLM(_Base):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.tgt_embed = _Weight(cfg.tgt_vocab_size, cfg.d_model)
        self.output = _Output(
            cfg.d_model, cfg.tgt_vocab_size, cfg.tie_embeddings == "none", cfg.output_bias
        )
        self.decoder = _Stack(
            [DecoderLayer(cfg, False) for _ in range(cfg.num_decoder_layers)], cfg
        )

    def out_weight(self) -> torch.Tensor:
        return self.output.weight if self.cfg.tie_embeddings == "none" else self.tgt_embed.weight

    def forward(self, ids: Any) -> torch.Tensor:
        x = self.embed(self.tgt_embed.weight, _t(ids))
        for layer in self.decoder.layers:
            x = layer(x, None, None)
        return self.project(self.decoder.finish(x))

    def loss(self, tgt_in: Any, tgt_out: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        return self.xent(self(tgt_in), tgt_out, label_smoothing)

    @torch.no_grad()
    def init_state(self, batch_size: int, max_steps: int) -> dict[str, Any]:
        H, C = self.cfg.num_heads, self.cfg.d_model
        return {
            "step": 0,
            "caches": [
                torch.empty(2, batch_size, H, max_steps, C // H) for _ in self.decoder.layers
            ],
        }

    @torch.no_grad()
    def decode_step(self, state: dict[str, Any], tokens: Any) -> torch.Tensor:
        pos = state["step"]
        x = self.embed(self.tgt_embed.weight, _t(tokens)[:, None], start=pos)
        for layer, cache in zip(self.decoder.layers, state["caches"], strict=True):
            x = layer(x, None, None, cache=cache, pos=pos)
        state["step"] = pos + 1
        return self.project(self.decoder.finish(x))[:, 0]

    @staticmethod
    def reorder_state(state: dict[str, Any], indices: Any) -> None:
        idx = _t(indices)
        state["caches"] = [_reorder_cache(c, idx, state["step"]) for c in state["caches"]]


class TorchEncoderModel(_Base):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.src_embed = _Weight(cfg.src_vocab_size, cfg.d_model)
        self.output = _Output(
            cfg.d_model, cfg.tgt_vocab_size, cfg.tie_embeddings != "all", cfg.output_bias
        )
        self.encoder = _Stack([EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)], cfg)

    def out_weight(self) -> torch.Tensor:
        return self.output.weight if self.cfg.tie_embeddings != "all" else self.src_embed.weight

    def encode(self, src: Any, src_lengths: Any) -> torch.Tensor:
        lengths = _t(src_lengths)
        x = self.embed(self.src_embed.weight, _t(src))
        for layer in self.encoder.layers:
            x = layer(x, lengths)
        return self.encoder.finish(x)

    def forward(self, src: Any, src_lengths: Any) -> torch.Tensor:
        return self.project(self.encode(src, src_lengths))

    def loss(
        self, src: Any, src_lengths: Any, labels: Any, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        return self.xent(self(src, src_lengths), labels, label_smoothing)


_KINDS = {"transformer": TorchTransformer, "lm": TorchLM, "encoder": TorchEncoderModel}


def _our_name(name: str) -> str:
    return "embed.weight" if name == "embed_.weight" else name


def infer_kind(state_dict: dict[str, Any]) -> str:
    if any(".cross_attn." in k for k in state_dict):
        return "transformer"
    return "lm" if any(k.startswith("decoder.") for k in state_dict) else "encoder"


def build_torch_model(
    config: Any, state_dict: dict[str, Any], kind: str | None = None
) -> nn.Module:
    """A torch model of `kind` ("transformer", "lm", "encoder"; inferred from the keys when None)
    holding copies of `state_dict`'s float32 weights (names exactly ours), in train mode.
    Raises KeyError listing missing/unexpected names."""
    cfg = _cfg(config)
    kind = kind or infer_kind(state_dict)
    model = _KINDS[kind](cfg)
    own = {_our_name(n): p for n, p in model.named_parameters()}
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"build_torch_model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(torch.as_tensor(np.asarray(state_dict[name], dtype=np.float32)))
    return model


def named_grads(model: nn.Module) -> dict[str, np.ndarray]:
    """Gradients by our parameter names (zeros for parameters that received none)."""
    return {
        _our_name(n): (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
        for n, p in model.named_parameters()
    }
