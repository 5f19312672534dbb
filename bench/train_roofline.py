"""The FP32 roofline of a training step: matrix-product FLOPs per target token of bench_train.py's
batches, and the tokens/s a given FMA peak allows.

    PYTHONPATH=$PWD python bench/train_roofline.py [--data DATA] [--peak 97.7,204.1] [--size small]

Counts the products of the encoder-decoder (projections, feed-forward, attention scores and
values, the output projection) for forward plus backward (3x forward), over the padded batch
(what a dense implementation computes) and over the non-pad tokens only (the least any
implementation computes). Layer norm, softmax, the loss and Adam are left out, so the bound is
optimistic. ``tok/s at P``: target tokens per second at which the step would run at P
GFLOP/s; a measured tokens/s times the GFLOP per 1,000 tokens / 1,000 gives the GFLOP/s a
system reaches. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _common import markdown_table  # noqa: E402
from bench_train import N_BATCHES, SIZES, make_arrays, real_batches  # noqa: E402


def step_flops(cfg: dict, src_tokens: int, tgt_tokens: int, src_len: float,
               tgt_len: float) -> float:
    """Forward + backward FLOPs of the products for src/tgt_tokens positions whose attention
    spans src_len / tgt_len keys."""
    d, f, v = cfg["d_model"], cfg["d_ff"], cfg["tgt_vocab_size"]
    enc = src_tokens * (2 * (4 * d * d + 2 * d * f) + 4 * src_len * d)
    dec = tgt_tokens * (2 * (6 * d * d + 2 * d * f) + 4 * (tgt_len + src_len) * d)
    cross_kv = src_tokens * 4 * d * d  # the cross-attention keys and values of each layer
    return 3.0 * (cfg["num_encoder_layers"] * enc
                  + cfg["num_decoder_layers"] * (dec + cross_kv)
                  + tgt_tokens * 2 * d * v)  # fmt: skip


def per_thousand(cfg: dict, batches: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """(padded, non-pad) GFLOP per 1,000 non-pad target tokens over the batches."""
    padded = nonpad = tokens = 0.0
    for b in batches:
        (n, s), t = b["src"].shape, b["tgt_in"].shape[1]
        ns, nt = int(b["src_lengths"].sum()), int(b["tgt_lengths"].sum())
        padded += step_flops(cfg, n * s, n * t, s, t)
        nonpad += step_flops(cfg, ns, nt, ns / n, nt / n)
        tokens += nt
    return padded / tokens / 1e6, nonpad / tokens / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a preprocessed corpus: adds its real batches")
    ap.add_argument("--peak", default="97.7,204.1",
                    help="FMA peaks, GFLOP/s, comma-separated (default: 1 and 2 threads here)")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    args = ap.parse_args()
    cfg = dict(SIZES[args.size])
    cases = [("synthetic", [make_arrays(cfg["src_vocab_size"], k) for k in range(N_BATCHES)])]
    if args.data:
        batches, fields = real_batches(args.data)
        cfg.update(src_vocab_size=fields["src_vocab_size"], tgt_vocab_size=fields["tgt_vocab_size"])
        cases.append(("real", batches))
    try:
        peaks = [float(p) for p in args.peak.split(",")]
    except ValueError:
        peaks = [0.0]
    if min(peaks) <= 0:
        ap.error("--peak: expected positive GFLOP/s, comma-separated")
    rows = []
    for name, batches in cases:
        padded, nonpad = per_thousand(cfg, batches)
        rows.append([f"{args.size}/{name}", f"{padded:.1f}", f"{nonpad:.1f}"]
                    + [f"{peak / flops * 1000:.0f}" for peak in peaks
                       for flops in (padded, nonpad)])  # fmt: skip
    header = ["batches", "GFLOP / 1000 tokens, padded", "GFLOP / 1000 tokens, non-pad"]
    header += [f"tok/s at {peak:g} GFLOP/s, {kind}" for peak in peaks
               for kind in ("padded", "non-pad")]  # fmt: skip
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
