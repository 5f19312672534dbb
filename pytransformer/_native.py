"""Loads the compiled extension with a helpful message when it is missing."""

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only hit with a broken install
    raise ImportError(
        "pytransformer's native extension (pytransformer._C) is not built. Install the package "
        "with `pip install .` (or run tools/build_inplace.sh for a development build)."
    ) from exc

__all__ = ["_C"]
