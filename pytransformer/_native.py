"""Loads the compiled extension (with a helpful message when it is missing) and sets up how its
kernels run: the OpenMP wait policy, the thread count, which kernel set is selected."""

import os

from .checks import check_int

# libgomp's default lets idle team threads spin for a long time (300,000 rounds, milliseconds).
# When other processes share the cores (several workers per machine, CI runners), a spinning
# thread holds a core that a thread with work needs: two 2-thread processes on 2 cores ran the
# quick demo's training 4x slower each with 10,000 rounds than with none. Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) costs a wake-up per parallel region instead, which on a virtual
# machine is tens of microseconds, as long as a decoding step's whole product: the quick demo
# trained 1.4-1.8x faster alone with 1,000 rounds (a few microseconds, enough to bridge the gap
# between one kernel call and the next) than with PASSIVE, and 1.27x slower beside a second such
# process. Set before the extension (and so libgomp) loads; an explicit user setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

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

    Returns a dict with ``isa`` (the selected kernel set: ``"avx512vnni"`` (``"avx512"``, and
    VNNI dot products in the int8 GEMM), ``"avx512"`` (the AVX2 kernels, and a 16-lane
    micro-kernel in the float GEMM, which gives the same bits), ``"avx2"`` or ``"generic"``;
    ``PYTRANSFORMER_ISA=avx512``, ``=avx2`` or ``=generic`` caps it), ``cpu_has_avx2_fma``,
    ``cpu_has_avx512`` (F, VL, BW and DQ), ``cpu_has_avx512_vnni``, ``num_threads``,
    ``openmp`` (False means the extension was built single-threaded) and ``cores`` (usable cores).
    """
    return {
        "isa": _C.selected_isa(),
        "cpu_has_avx2_fma": _C.cpu_has_avx2_fma(),
        "cpu_has_avx512": _C.cpu_has_avx512(),
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
