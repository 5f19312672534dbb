"""Restricted (windowed) causal self-attention against full causal attention, as n grows.

Usage: PYTHONPATH=$PWD python bench/bench_window.py [--threads 1 2] [--repeats 3]
       [--sizes 512 1024 ...] [--quick] [--no-write]

For each n, one (1, n, 3, H, D) fused projection; the three masks (full causal, window r = 64,
window r = 256, all causal) are timed in turn by interleaved medians (bench/_common.py), forward
alone and forward + backward. A windowed query sees at most r + 1 keys, so its time should grow
as n (x2 per doubling), full causal as n^2 (x4). The table gives each row's growth over the
previous n and the section ends with the exponent fitted to each mask's fwd+bwd times
(log t against log n, least squares): 1 is linear, 2 quadratic. --quick runs tiny sizes only
(a smoke test; its timings mean nothing). Writes the `window` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, markdown_table, update_results  # noqa: E402

import pytransformer  # noqa: E402
from pytransformer import ops  # noqa: E402

SIZES = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_SIZES = [64, 128, 256]
WINDOWS = [None, 64, 256]  # None: full causal attention
H, D = 4, 64


def mask_name(window: int | None) -> str:
    return "full causal" if window is None else f"causal, r = {window}"


def case_fns(n: int, window: int | None) -> tuple:
    rng = np.random.default_rng(n)
    qkv = rng.standard_normal((1, n, 3, H, D), dtype=np.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    dout = rng.standard_normal((1, n, H, D), dtype=np.float32)

    def fwd():
        return ops.attention(q, k, v, causal=True, window=window)

    def fwd_bwd():
        out, lse = ops.attention(q, k, v, causal=True, window=window, return_lse=True)
        return ops.attention_backward(dout, q, k, v, out, lse, causal=True, window=window)

    return fwd, fwd_bwd


def time_size(n: int, repeats: int) -> dict[int | None, dict[str, float]]:
    """Median seconds of fwd and fwd+bwd for each window at sequence length n."""
    fns = {w: case_fns(n, w) for w in WINDOWS}
    fwd = interleaved_medians({w: f[0] for w, f in fns.items()}, repeats=repeats)
    fb = interleaved_medians({w: f[1] for w, f in fns.items()}, repeats=repeats)
    return {w: {"fwd": fwd[w], "fb": fb[w]} for w in WINDOWS}


def fitted_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Slope of log t against log n (least squares)."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def run_threads(nt: int, sizes: list[int], repeats: int) -> tuple[list[list], dict]:
    pytransformer.set_num_threads(nt)
    rows, fb_times = [], {w: [] for w in WINDOWS}
    for n in sizes:
        times = time_size(n, repeats)
        for w in WINDOWS:
            t = times[w]
            prev = fb_times[w][-1] if fb_times[w] else None
            growth = f"{t['fb'] / prev:.2f}x" if prev else ""
            fb_times[w].append(t["fb"])
            rows.append([nt, n, mask_name(w), f"{t['fwd'] * 1e3:.2f}", f"{t['fb'] * 1e3:.2f}",
                         growth, f"{t['fb'] / n * 1e6:.2f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    exponents = {w: fitted_exponent(sizes, fb_times[w]) for w in WINDOWS}
    return rows, exponents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    ap.add_argument("--quick", action="store_true", help="tiny sizes only (smoke test)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()
    sizes = QUICK_SIZES if args.quick else sorted(args.sizes)
    repeats = 1 if args.quick else args.repeats

    rows, fits = [], []
    for nt in args.threads:
        r, exponents = run_threads(nt, sizes, repeats)
        rows += r
        fits.append(f"{nt} thread{'s' if nt > 1 else ''}: " + ", ".join(
            f"{mask_name(w)} n^{e:.2f}" for w, e in exponents.items()))
        print(fits[-1], flush=True)

    header = ["threads", "n", "mask", "fwd ms", "fwd+bwd ms", "fwd+bwd vs previous n",
              "fwd+bwd µs per query"]
    body = (
        f"Command: `PYTHONPATH=$PWD python bench/bench_window.py "
        f"--threads {' '.join(map(str, args.threads))} --repeats {repeats} "
        f"--sizes {' '.join(map(str, sizes))}`  \n"
        f"pytransformer.ops.attention / attention_backward, causal, B = 1, H = {H}, D = {D}, "
        f"q, k, v viewed from a fused (1, n, 3, H, D) buffer; windowed rows see the last r + 1 "
        f"positions. Interleaved medians; 'vs previous n' is the time ratio to the row above "
        f"(n doubled: 2x is linear, 4x quadratic). Python {platform.python_version()}.\n\n"
        + markdown_table(header, rows)
        + "\n\nFitted growth of fwd+bwd time (t ~ n^e over the sizes above): "
        + "; ".join(fits) + "."
    )
    if not args.no_write:
        update_results("window", body)


if __name__ == "__main__":
    main()
