"""Loads the compiled extension (with a helpful message when it is missing) and sets up how its
kernels run: the OpenMP wait policy, the thread count, which kernel set is selected."""

import os

from .checks import check_int

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

__all__ = ["_C", "cpu_info", "set_num_threads", "get_num_threads"]


def cpu_info() -> dict:
    """What the native kernels run with.

    Returns a dict with ``isa`` (the selected kernel set: ``"avx512vnni"`` (the AVX2 kernels, and
    VNNI dot products in the int8 GEMM), ``"avx2"`` or ``"generic"``; ``PYTRANSFORMER_ISA=avx2``
    or ``=generic`` caps it), ``cpu_has_avx2_fma``, ``cpu_has_avx512_vnni``, ``num_threads``,
    ``openmp`` (False means the extension was built single-threaded) and ``cores`` (usable cores).
    """
    return {
        "isa": _C.selected_isa(),
        "cpu_has_avx2_fma": _C.cpu_has_avx2_fma(),
        "cpu_has_avx512_vnni": _C.cpu_has_avx512_vnni(),
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
    _C.set_num_threads(check_int("n", n))


def get_num_threads() -> int:
    """The thread count kernels use; defaults to the cores this process may run on."""
    return _C.get_num_threads()
