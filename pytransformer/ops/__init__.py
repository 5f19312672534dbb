"""Typed Python face of the native kernels. Every function validates its arguments and raises
TypeError / ValueError / IndexError naming the offending argument; all take and return float32
numpy arrays and release the GIL while they compute."""

from . import _attention, _gemm, _norm, _quant, _train
from ._attention import *  # noqa: F403
from ._gemm import *  # noqa: F403
from ._norm import *  # noqa: F403
from ._quant import *  # noqa: F403
from ._train import *  # noqa: F403

__all__ = [*_gemm.__all__, *_attention.__all__, *_norm.__all__, *_quant.__all__, *_train.__all__]
