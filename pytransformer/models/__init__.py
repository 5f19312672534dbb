"""The model classes: configuration, parameters and checkpoints, the three token architectures
and the incremental-decoding state they share, and the Vision Transformer."""

from .base import Model
from .config import TransformerConfig
from .encoder import TransformerEncoderModel
from .lm import TransformerLM
from .state import DecoderState
from .transformer import Transformer
from .vit import VisionTransformer, ViTConfig

__all__ = [
    "Model",
    "TransformerConfig",
    "Transformer",
    "TransformerLM",
    "TransformerEncoderModel",
    "DecoderState",
    "ViTConfig",
    "VisionTransformer",
]
