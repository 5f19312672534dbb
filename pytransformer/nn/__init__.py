"""Modules with explicit forward/backward: parameters, layers, attention, blocks, stacks."""

from .attention import AttentionCapture, CrossAttention, SelfAttention
from .blocks import Decoder, DecoderLayer, Encoder, EncoderLayer, Residual
from .layers import (
    Context,
    Dropout,
    Embedding,
    FeedForward,
    LayerNorm,
    Linear,
    sinusoidal_positions,
)
from .layout import Layout
from .params import Param, ParamStore

__all__ = [
    "Param",
    "Layout",
    "ParamStore",
    "Context",
    "Dropout",
    "Linear",
    "Embedding",
    "LayerNorm",
    "FeedForward",
    "sinusoidal_positions",
    "SelfAttention",
    "AttentionCapture",
    "CrossAttention",
    "Residual",
    "EncoderLayer",
    "DecoderLayer",
    "Encoder",
    "Decoder",
]
