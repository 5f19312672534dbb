"""Loads the compiled extension with a helpful message when it is missing."""

import os

# libgomp's default lets idle team threads spin for a long time. When other processes share the
# cores (several workers per machine, CI runners), a spinning thread holds a core that a thread
# with work needs, and a 2-thread kernel can run 5-10x slower than a 1-thread one (measured on the
# development machine). Sleeping idle threads cost a few microseconds per parallel region instead.
# Set before the extension (and so libgomp) loads; an explicit user setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only hit with a broken install
    raise ImportError(
        "pytransformer's native extension (pytransformer._C) is not built. Install the package "
        "with `pip install .` (or run tools/build_inplace.sh for a development build)."
    ) from exc

__all__ = ["_C"]
