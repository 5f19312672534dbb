"""Attention forward and forward+backward: ours vs PyTorch's CPU scaled_dot_product_attention.

Usage: PYTHONPATH=$PWD python bench/bench_attention.py [--threads 1 2] [--clocks wall cpu]
       [--repeats 5] [--no-write]

Interleaved medians (bench/_common.py), threads matched with torch.set_num_threads. The `cpu`
clock (one thread only) times with time.thread_time, which on a shared, oversubscribed machine
leaves out the time the benchmark thread waits for a core; both libraries then run on the calling
thread. FLOPs count
the matrix products only: forward 4*B*H*D*(visible score entries), backward 2.5x forward
(S recomputed, dV, dP, dQ, dK); causal counts the L(L+1)/2 visible entries per head.
Each shape and thread count writes one row to the `attention` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, markdown_table, update_results  # noqa: E402

import pytransformer  # noqa: E402
from pytransformer import ops  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None

SHAPES = [(8, 8, 128, 64), (4, 8, 512, 64), (1, 8, 1024, 64), (1, 8, 4096, 64)]


def flops(B, H, L, D, causal):
    entries = L * (L + 1) // 2 if causal else L * L
    return 4.0 * B * H * D * entries


def interleaved_cpu_medians(fns: dict[str, Callable[[], object]], repeats: int,
                            min_time: float = 0.05) -> dict[str, float]:
    """interleaved_medians with the calling thread's CPU time as the clock."""
    for fn in fns.values():
        fn()
    inner = {}
    for name, fn in fns.items():
        t0, n = time.thread_time(), 0
        while time.thread_time() - t0 < min_time:
            fn()
            n += 1
        inner[name] = max(1, n)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.thread_time() - t0) / inner[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def ours_fns(q, k, v, dout, causal):
    def fwd():
        return ops.attention(q, k, v, causal=causal)

    def fwd_bwd():
        out, lse = ops.attention(q, k, v, causal=causal, return_lse=True)
        return ops.attention_backward(dout, q, k, v, out, lse, causal=causal)

    return fwd, fwd_bwd


def torch_fns(q, k, v, dout, causal):
    # Torch gets its preferred contiguous (B, H, L, D) layout.
    tq, tk, tv, tdo = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
                       for x in (q, k, v, dout))
    gq, gk, gv = (t.clone().requires_grad_(True) for t in (tq, tk, tv))

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    def fwd_bwd():
        for t in (gq, gk, gv):
            t.grad = None
        F.scaled_dot_product_attention(gq, gk, gv, is_causal=causal).backward(tdo)

    return fwd, fwd_bwd


def bench_case(B, H, L, D, causal, repeats, clock):
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, L, 3, H, D), dtype=np.float32)  # views of a fused projection
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    dout = rng.standard_normal((B, L, H, D), dtype=np.float32)
    o_fwd, o_fb = ours_fns(q, k, v, dout, causal)
    medians = interleaved_medians if clock == "wall" else interleaved_cpu_medians
    res = {}
    if torch is not None:
        t_fwd, t_fb = torch_fns(q, k, v, dout, causal)
        ref = t_fwd().numpy().transpose(0, 2, 1, 3)
        res["maxdiff"] = float(np.abs(o_fwd() - ref).max())
        res["fwd"] = medians({"ours": o_fwd, "torch": t_fwd}, repeats=repeats)
        res["fb"] = medians({"ours": o_fb, "torch": t_fb}, repeats=repeats)
    else:
        res["fwd"] = medians({"ours": o_fwd}, repeats=repeats)
        res["fb"] = medians({"ours": o_fb}, repeats=repeats)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clocks", nargs="+", choices=["wall", "cpu"], default=["wall"],
                    help="cpu: thread CPU time, measured for 1 thread only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="first N shapes only")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()

    rows = []
    runs = [(clock, nt) for clock in args.clocks for nt in args.threads
            if clock == "wall" or nt == 1]
    for clock, nt in runs:
        pytransformer.set_num_threads(nt)
        if torch is not None:
            torch.set_num_threads(nt)
        for B, H, L, D in SHAPES[: args.shapes]:
            times = {}
            for causal in (False, True):
                repeats = args.repeats if L < 4096 else max(3, args.repeats // 2)
                r = bench_case(B, H, L, D, causal, repeats, clock)
                times[causal] = r
                fl = flops(B, H, L, D, causal)
                gf = {what: {n: fl * (1 if what == "fwd" else 3.5) / s / 1e9
                             for n, s in r[what].items()} for what in ("fwd", "fb")}
                row = [clock, nt, f"{B}x{H}x{L}x{D}", "causal" if causal else "full"]
                for what in ("fwd", "fb"):
                    row.append(f"{gf[what]['ours']:.1f}")
                    if "torch" in r[what]:
                        row += [f"{gf[what]['torch']:.1f}",
                                f"{r[what]['torch'] / r[what]['ours']:.2f}x"]
                    else:
                        row += ["-", "-"]
                if causal:
                    speed = times[False]["fwd"]["ours"] / r["fwd"]["ours"]
                    row.append(f"{speed:.2f}x")
                else:
                    row.append("")
                row.append(f"{r.get('maxdiff', float('nan')):.1e}")
                rows.append(row)
                print(" | ".join(str(c) for c in row), flush=True)

    header = ["clock", "threads", "BxHxLxD", "mask", "fwd ours GF/s", "fwd torch GF/s",
              "fwd speedup", "fwd+bwd ours GF/s", "fwd+bwd torch GF/s", "fwd+bwd speedup",
              "causal vs full (ours fwd)", "max |ours-torch|"]
    torch_v = torch.__version__ if torch is not None else "not installed"
    body = (
        f"Command: `PYTHONPATH=$PWD python bench/bench_attention.py "
        f"--threads {' '.join(map(str, args.threads))} --clocks {' '.join(args.clocks)} "
        f"--repeats {args.repeats}`  \n"
        f"Ours: pytransformer.ops.attention / attention_backward on q, k, v viewed from a fused "
        f"(B, L, 3, H, D) buffer; peer: torch {torch_v} "
        f"F.scaled_dot_product_attention on contiguous (B, H, L, D). "
        f"GF/s = matrix-product FLOPs / median time (fwd 4·B·H·D per visible score, fwd+bwd "
        f"3.5x that). Speedup = torch time / ours. Python {platform.python_version()}.\n\n"
        + markdown_table(header, rows)
    )
    if not args.no_write:
        update_results("attention", body)


if __name__ == "__main__":
    main()
