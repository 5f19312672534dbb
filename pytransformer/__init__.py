"""pytransformer: the Transformer of "Attention Is All You Need", trained and decoded on the CPU."""

from __future__ import annotations

import os

from . import ops
from ._native import _C
from .data import Batch, TokenBatcher, make_batch, make_lm_batch
from .io import CheckpointError
from .model import Transformer, TransformerConfig, TransformerEncoderModel, TransformerLM
from .optim import Adam, AdamW
from .trainer import Trainer

__version__ = "0.1.0"


def cpu_info() -> dict:
    """What the native kernels run with.

    Returns a dict with ``isa`` (the selected kernel set: ``"avx2"`` or ``"generic"``;
    ``PYTRANSFORMER_ISA=generic`` forces the portable one), ``cpu_has_avx2_fma``, ``num_threads``,
    ``openmp`` (False means the extension was built single-threaded) and ``cores`` (usable cores).
    """
    return {
        "isa": _C.selected_isa(),
        "cpu_has_avx2_fma": _C.cpu_has_avx2_fma(),
        "num_threads": _C.get_num_threads(),
        "openmp": _C.have_openmp(),
        "cores": _usable_cores(),
    }


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Sets how many threads every kernel uses (process-wide). Results do not depend on it."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """The thread count kernels use; defaults to the cores this process may run on."""
    return _C.get_num_threads()


__all__ = [
    "cpu_info", "set_num_threads", "get_num_threads", "ops", "__version__",
    "TransformerConfig", "Transformer", "TransformerLM", "TransformerEncoderModel",
    "Batch", "TokenBatcher", "make_batch", "make_lm_batch", "CheckpointError",
    "Adam", "AdamW", "Trainer",
]
