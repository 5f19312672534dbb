"""GEMM throughput: pytransformer.ops.matmul vs numpy (OpenBLAS), interleaved, 1 and 2 threads.

Usage: [OMP_WAIT_POLICY=PASSIVE] PYTHONPATH=$PWD python bench/bench_gemm.py [--quick]

Layout "NT packed" (M <= 32 only): the (N, K) weight packed once with ops.PackedWeight, as the
decoders use it; numpy multiplies by the same weight transposed. Layout "TN" (the weight-gradient
shapes of the demo's training, dW = dy^T x with K = 2,900 tokens): a stored (K, M) with
trans_a=True; numpy computes `a.T @ b`.

Each thread count runs in its own subprocess with OPENBLAS_NUM_THREADS set, so numpy and our
kernels get the same number of threads. In a worker, ours and numpy's calls alternate (one batch of
calls each, repeated) and every figure is the median over the repeats; the "best" ratio (fastest
repeat of each) is shown too because the machine is shared and slowdowns from other processes only
ever add time. On a machine shared with other busy processes, OpenMP's default spin-waiting
makes multi-threaded calls stall whenever a team thread is descheduled; OMP_WAIT_POLICY=PASSIVE
(recorded in the table's command) then measures the kernels rather than the scheduler.
The FMA peak comes from a probe: one thread timing a loop of 12 independent FMA chains
(_C._fma_probe; 16-lane FMAs at the avx512 levels, 8-lane ones below), best of a few runs, times
the thread count. On a CPU with AVX-512 a last column compares the float GEMM's AVX-512 kernel
(the default there) with its AVX2 one on the same calls.
Writes the table into section `gemm` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import command_line, interleaved_samples, markdown_table, update_results  # noqa: E402

SHAPES = [
    (1, 512, 512),
    (8, 512, 512),
    (32, 2048, 512),
    (32, 8000, 256),
    (512, 512, 512),
    (2048, 512, 512),
    (2048, 2048, 512),
    (2048, 512, 2048),
]
# Weight gradients: a small C and a long K (tokens), which ours splits along K between threads.
GRAD_SHAPES = [(128, 128, 2900), (128, 512, 2900), (512, 128, 2900)]


def cases() -> list[tuple[int, int, int, str]]:
    rows = []
    for M, N, K in SHAPES:
        for layout in ("NN", "NT", "NT packed") if M <= 32 else ("NN", "NT"):
            rows.append((M, N, K, layout))
    return rows + [(M, N, K, "TN") for M, N, K in GRAD_SHAPES]


def fma_peak_per_thread() -> float:
    """GFLOP/s of one thread running independent FMAs (the selected ISA), best of 5."""
    from pytransformer import _C

    iters = 5_000_000
    best = min(_C._fma_probe(iters) for _ in range(5))
    return iters * 192 / best / 1e9


def timed(fns: dict, repeats: int, min_time: float) -> dict[str, tuple[float, float]]:
    """(median, best) seconds per call of each fn, with the fns' batches interleaved."""
    samples = interleaved_samples(fns, repeats, min_time)
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def at_level(level: str, fn):
    """fn with the kernels' ISA level switched to `level` for the call (both sides of a
    comparison pay the same switch)."""
    from pytransformer import _C

    def call():
        before = _C.selected_isa()
        _C._force_isa(level)
        try:
            fn()
        finally:
            _C._force_isa(before)

    return call


def worker(threads: int, repeats: int, min_time: float) -> list[dict]:
    import pytransformer as pt

    pt.set_num_threads(threads)
    level = pt.cpu_info()["isa"]
    # On an AVX-512 CPU the float GEMM's 16-lane kernel is also timed against its AVX2 one.
    wide = level in ("avx512", "avx512vnni")
    rng = np.random.default_rng(0)
    rows = []
    for M, N, K, layout in cases():
        ta, nt = layout == "TN", layout in ("NT", "NT packed")
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if nt else (K, N)).astype(np.float32)
        a_np, b_np = (a.T if ta else a), (b.T if nt else b)
        if layout == "NT packed":  # the weight packed once, as decoding uses it
            b, nt = pt.ops.PackedWeight(b), False
        out = np.empty((M, N), np.float32)

        def ours(a=a, b=b, ta=ta, nt=nt, out=out):
            pt.ops.matmul(a, b, trans_a=ta, trans_b=nt, out=out)

        fns = {
            "ours": at_level(level, ours) if wide else ours,
            "numpy": lambda a_np=a_np, b_np=b_np, out=out: np.matmul(a_np, b_np, out=out),
        }
        if wide:
            fns["avx2"] = at_level("avx2", ours)
        t = timed(fns, repeats, min_time)
        rows.append(dict(M=M, N=N, K=K, layout=layout, **t))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args()
    repeats, min_time = (3, 0.02) if args.quick else (9, 0.05)
    if args.worker:
        peak = fma_peak_per_thread()
        print(json.dumps({"peak": peak, "rows": worker(args.worker, repeats, min_time)}))
        return

    import pytransformer as pt

    wide = pt.cpu_info()["isa"] in ("avx512", "avx512vnni")

    table, notes = [], []
    for threads in (1, 2):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        # OpenBLAS's idle workers spin for a long time after each call and, with calls
        # interleaved, take the second core from whichever library runs next (ours measured
        # 90 instead of 176 GFLOP/s at 2 threads). A short timeout lets both run at full speed.
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
        cmd = [sys.executable, __file__, "--worker", str(threads)]
        cmd += ["--quick"] if args.quick else []
        res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True).stdout)
        peak = res["peak"] * threads
        notes.append(f"{threads} thread(s): probe peak {peak:.1f} GFLOP/s")
        for r in res["rows"]:
            flop = 2.0 * r["M"] * r["N"] * r["K"]
            ours_med, ours_best = r["ours"]
            np_med, np_best = r["numpy"]
            row = [
                threads,
                f"{r['M']}x{r['N']}x{r['K']}",
                r["layout"],
                f"{flop / ours_med / 1e9:.1f}",
                f"{flop / np_med / 1e9:.1f}",
                f"{np_med / ours_med:.2f}",
                f"{np_best / ours_best:.2f}",
                f"{100 * flop / ours_med / 1e9 / peak:.0f}%",
            ]
            if wide:
                row.append(f"{r['avx2'][0] / ours_med:.2f}")
            table.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    header = [
        "threads",
        "M x N x K",
        "layout",
        "ours GFLOP/s",
        "numpy GFLOP/s",
        "ours/numpy (median)",
        "ours/numpy (best)",
        "ours % of FMA peak",
    ] + (["ours / ours at avx2 (median)"] if wide else [])
    info = pt.cpu_info()
    body = "\n".join(
        [
            f"Command: `{command_line('bench_gemm.py', ['--quick'] if args.quick else [])}`",
            "",
            f"Machine: {platform.processor() or platform.machine()}, ISA {info['isa']}, "
            f"{info['cores']} cores; numpy {np.__version__}. " + "; ".join(notes) + ".",
            "NN: b stored (K, N); NT: b stored (N, K) with trans_b=True (numpy: `a @ b.T`); "
            "NT packed (M <= 32): the same b packed once by ops.PackedWeight, as decoding uses "
            "it. GFLOP/s = 2MNK / median time; ratios > 1 mean ours is faster."
            + (" The last column times the same calls with the float GEMM's AVX2 kernel "
               "(PYTRANSFORMER_ISA=avx2), interleaved with the others." if wide else ""),
            "",
            markdown_table(header, table),
        ]
    )
    if not args.no_write:
        update_results("gemm", body)
    print(body)


if __name__ == "__main__":
    main()
