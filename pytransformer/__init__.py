"""pytransformer: the Transformer of "Attention Is All You Need", trained and decoded on the CPU.

The package is layered along the data path (docs/ARCHITECTURE.md): `ops` (typed faces of the
C++ kernels) -> `nn` (layers with explicit forward/backward) -> `decode` (model-agnostic searches)
-> `models` -> `train` and `text` -> the application (`translator`, `cli`, `demo`, `plot`).
"""

from __future__ import annotations

from . import ops
from ._native import _C, cpu_info, get_num_threads, set_num_threads
from .io import CheckpointError
from .models import (
    Transformer,
    TransformerConfig,
    TransformerEncoderModel,
    TransformerLM,
    VisionTransformer,
    ViTConfig,
)
from .train import (
    Adam,
    AdamW,
    Batch,
    ImageBatch,
    ImageBatcher,
    TokenBatcher,
    Trainer,
    make_batch,
    make_lm_batch,
)

__version__ = "0.1.0"

__all__ = [
    "cpu_info", "set_num_threads", "get_num_threads", "ops", "__version__", "_C",
    "TransformerConfig", "Transformer", "TransformerLM", "TransformerEncoderModel",
    "ViTConfig", "VisionTransformer",
    "Batch", "TokenBatcher", "make_batch", "make_lm_batch", "CheckpointError",
    "ImageBatch", "ImageBatcher",
    "Adam", "AdamW", "Trainer",
]
