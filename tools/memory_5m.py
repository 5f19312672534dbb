"""Peak memory of the binarized pipeline on a large generated corpus (issue: under 1 GB).

Generates N sentence pairs (default 5,000,000) of made-up words, runs ``pytransformer
preprocess`` and a few updates of ``pytransformer train --data`` as child processes, and reports
each child's peak resident set size (from wait4's rusage). Exits 1 when one exceeds --limit-mb.

    python tools/memory_5m.py --work /tmp/mem5m                # the full check
    python tools/memory_5m.py --work /tmp/mem5m --pairs 200000 # a quick smoke run

The corpus is cached in --work (delete it to regenerate). Nothing here measures speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def generate(path_src: str, path_tgt: str, n: int, seed: int = 0) -> None:
    """Pairs of 3..30 words over a 5,000-word made-up vocabulary (the target: the source's words
    reversed and suffixed), written in blocks so memory stays small."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(5000)]
    with open(path_src + ".tmp", "w") as fs, open(path_tgt + ".tmp", "w") as ft:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            lengths = rng.integers(3, 31, m)
            ids = rng.integers(0, len(words), int(lengths.sum()))
            bounds = np.cumsum(lengths)[:-1]
            src, tgt = [], []
            for sent in np.split(ids, bounds):
                ws = [words[i] for i in sent]
                src.append(" ".join(ws))
                tgt.append(" ".join(w + "en" for w in reversed(ws)))
            fs.write("\n".join(src) + "\n")
            ft.write("\n".join(tgt) + "\n")
    os.replace(path_src + ".tmp", path_src)
    os.replace(path_tgt + ".tmp", path_tgt)


def run_measured(cmd: list[str]) -> tuple[int, float, float]:
    """(exit status, peak RSS in MB, seconds) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024.0, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="directory for the corpus, data and run")
    ap.add_argument("--pairs", type=int, default=5_000_000)
    ap.add_argument("--limit-mb", type=float, default=1024.0)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    src, tgt = (os.path.join(args.work, f"corpus-{args.pairs}.{s}") for s in ("src", "tgt"))
    if not (os.path.exists(src) and os.path.exists(tgt)):
        print(f"generating {args.pairs} pairs in {args.work}", flush=True)
        generate(src, tgt, args.pairs)
    data, run = os.path.join(args.work, "data"), os.path.join(args.work, "run")
    py = [sys.executable, "-m", "pytransformer"]
    steps = [
        ("preprocess", py + ["preprocess", "--src", src, "--tgt", tgt, "--out", data]),
        ("train", py + ["train", "--data", data, "--out", run, "--preset", "tiny",
                        "--max-steps", str(args.steps), "--no-valid-bleu",
                        "--checkpoint-every", "0", "--threads", "2"]),
    ]
    worst = 0.0
    for name, cmd in steps:
        rc, peak, seconds = run_measured(cmd)
        print(f"{name}: exit {rc}, peak RSS {peak:.0f} MB ({seconds:.0f} s)", flush=True)
        if rc != 0:
            return rc
        worst = max(worst, peak)
    ok = worst < args.limit_mb
    print(f"{'OK' if ok else 'FAIL'}: peak RSS {worst:.0f} MB, limit {args.limit_mb:.0f} MB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
