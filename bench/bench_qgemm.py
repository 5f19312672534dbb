"""The int8 GEMM alone, per kernel set: `ops.qlinear` (quantize the rows, the int32 product,
dequantize) at decoding and encoding shapes, the avx2 and avx512vnni levels (and generic with
--generic) in one process, alternating, on one thread by default.

    PYTHONPATH=$PWD python bench/bench_qgemm.py [--threads 1] [--repeats 7] [--generic]
        [--no-write] [--quick]

Rows: M x N x K of the small (d 256, d_ff 1024, V 8000) and base (d 512, d_ff 2048, V 32000)
configurations' Linear layers at M = 1 (one sentence greedy), 32 (32 sentences) and 1,024
(an encoder batch). Reported: GMAC/s (multiply-adds per second) of each level, medians of
`--repeats` alternating samples, and the ratio avx512vnni / avx2. Levels the CPU lacks are left
out. Writes the `qgemm` section of bench/RESULTS.md unless --no-write or --quick.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import command_line, interleaved_medians, markdown_table, update_results  # noqa: E402

import pytransformer  # noqa: E402
from pytransformer import _C  # noqa: E402
from pytransformer.ops import QuantizedWeight, qlinear  # noqa: E402

SHAPES = [  # (M, N, K, what)
    (1, 8000, 256, "small output projection, 1 sentence"),
    (32, 8000, 256, "small output projection, 32 sentences"),
    (32, 768, 256, "small self-attention qkv, 32"),
    (32, 1024, 256, "small FFN in, 32"),
    (32, 256, 1024, "small FFN out, 32"),
    (32, 256, 256, "small attention out, 32"),
    (1024, 1024, 256, "small FFN in, encoder batch"),
    (1, 32000, 512, "base output projection, 1 sentence"),
    (32, 32000, 512, "base output projection, 32 sentences"),
    (32, 2048, 512, "base FFN in, 32"),
    (32, 512, 2048, "base FFN out, 32"),
    (1024, 2048, 512, "base FFN in, encoder batch"),
]
QUICK = [(3, 40, 20, "tiny"), (17, 33, 70, "tiny")]


def levels(generic: bool) -> list[str]:
    out = ["generic"] if generic or not _C.cpu_has_avx2_fma() else []
    if _C.cpu_has_avx2_fma():
        out.append("avx2")
    if _C.cpu_has_avx512_vnni():
        out.append("avx512vnni")
    return out


def measure(shape, names: list[str], repeats: int, min_time: float) -> dict[str, float]:
    """GMAC/s of qlinear under each level, samples alternating between the levels."""
    M, N, K, _ = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = QuantizedWeight.from_float(rng.standard_normal((N, K)).astype(np.float32))

    def under(name):
        def call():
            _C._force_isa(name)
            qlinear(x, w)
        return call

    before = _C.selected_isa()
    try:
        secs = interleaved_medians({n: under(n) for n in names}, repeats, min_time)
    finally:
        _C._force_isa(before)
    return {n: M * N * K / s / 1e9 for n, s in secs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--generic", action="store_true", help="also time the portable kernel")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="two tiny shapes, 3 repeats, no write")
    args = ap.parse_args()
    pytransformer.set_num_threads(args.threads)
    names = levels(args.generic)
    shapes, repeats = (QUICK, 3) if args.quick else (SHAPES, args.repeats)
    rows = []
    for shape in shapes:
        rate = measure(shape, names, repeats, 0.01 if args.quick else 0.05)
        ratio = (f"{rate['avx512vnni'] / rate['avx2']:.2f}x"
                 if {"avx2", "avx512vnni"} <= rate.keys() else "-")
        rows.append([f"{shape[0]} x {shape[1]} x {shape[2]}", shape[3],
                     *(f"{rate[n]:.1f}" for n in names), ratio])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = ["M x N x K", "layer", *(f"{n} GMAC/s" for n in names), "avx512vnni / avx2"]
    table = markdown_table(header, rows)
    print(table)
    if args.quick or args.no_write:
        return
    argv = [a for a in sys.argv[1:] if a != "--no-write"]
    body = (
        f"The int8 GEMM alone (`ops.qlinear`: row quantization, int32 product, dequantization) "
        f"per kernel level, {args.threads} thread(s), medians of {repeats} samples alternating "
        f"the levels in one process. Machine: {platform.processor() or platform.machine()}.\n\n"
        f"Command: `{command_line('bench_qgemm.py', argv)}`\n\n{table}"
    )
    update_results("qgemm", body)


if __name__ == "__main__":
    main()
