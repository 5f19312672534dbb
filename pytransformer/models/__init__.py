"""The model classes: configuration, parameters and checkpoints, the three architectures and
the incremental-decoding state they share."""

from .base import Model
from .config import TransformerConfig
from .encoder import TransformerEncoderModel
from .lm import TransformerLM
from .state import DecoderState
from .transformer import Transformer

__all__ = [
    "Model",
    "TransformerConfig",
    "Transformer",
    "TransformerLM",
    "TransformerEncoderModel",
    "DecoderState",
]
