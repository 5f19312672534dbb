"""Soak: 8 Python threads translating with one shared model for minutes; results and memory.

One model (eval mode) and a fixed set of source batches, each with its own search settings
(greedy, beam 2, beam 4; scores and n-best lists). The serial result of every batch is computed
first; then `--threads` threads translate the batches for `--seconds`, each thread starting at
another batch and walking them in its own order, and every result must equal the serial one
(hypotheses and scores, exactly). The resident set size is sampled each second: after
`--warmup` seconds it may grow by at most `--rss-bound-mb` (freed memory is reused, so a correct
loop plateaus; a leak of one small array per call would exceed it within the soak).

Prints one JSON report; exits 1 when a result differs or the RSS grows past the bound.
Usage: PYTHONPATH=$PWD python -P tools/soak_threads.py [--threads 8] [--seconds 240]
tests/test_soak.py runs a short form in a fresh process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

import numpy as np

import pytransformer
from pytransformer import Transformer, TransformerConfig

SEARCHES = [
    dict(beam_size=1),
    dict(beam_size=2, return_scores=True),
    dict(beam_size=4, num_hypotheses=2, return_scores=True),
]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_work(n_batches: int) -> tuple[Transformer, list[tuple[list[list[int]], dict]]]:
    config = TransformerConfig(src_vocab_size=40, tgt_vocab_size=40, d_model=48, num_heads=4,
                               d_ff=96, num_encoder_layers=2, num_decoder_layers=2,
                               dropout=0.1, max_len=32)  # fmt: skip
    model = Transformer(config, seed=7).eval()
    rng = np.random.default_rng(0)
    work = []
    for i in range(n_batches):
        sources = [list(rng.integers(3, 40, rng.integers(1, 12))) for _ in range(1 + i % 5)]
        work.append((sources, dict(SEARCHES[i % len(SEARCHES)], max_decoding_length=16)))
    return model, work


def summary(results) -> list:
    """What must match: every hypothesis and score (floats compared exactly)."""
    return [(r.hypotheses, getattr(r, "scores", None)) for r in results]


def soak(
    n_threads: int, seconds: float, warmup: float, n_batches: int = 24, leak_bytes: int = 0
) -> dict:
    pytransformer.set_num_threads(1)  # 8 Python threads on a few cores: no kernel teams on top
    model, work = make_work(n_batches)
    serial = [summary(model.translate(src, **kw)) for src, kw in work]
    calls = [0] * n_threads
    mismatches: list[str] = []
    stop = threading.Event()
    leak = []  # leak_bytes > 0 leaks that much per call: checks that the RSS check can fail

    def worker(t: int) -> None:
        order = np.random.default_rng(100 + t).permutation(n_batches)
        i = t
        while not stop.is_set():
            b = int(order[i % n_batches])
            src, kw = work[b]
            if summary(model.translate(src, **kw)) != serial[b]:
                mismatches.append(f"thread {t}, batch {b}")
            calls[t] += 1
            if leak_bytes:
                leak.append(np.ones(leak_bytes, np.uint8))
            i += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    samples, warm_at = [], None  # warm_at: the index of the first sample after the warm-up
    while time.perf_counter() - t0 < seconds and not mismatches:
        time.sleep(1.0)
        gc.collect()
        samples.append(round(rss_mb(), 1))
        if warm_at is None and time.perf_counter() - t0 >= warmup:
            warm_at = len(samples) - 1
    stop.set()
    for th in threads:
        th.join()
    gc.collect()
    end = round(rss_mb(), 1)
    after_warmup = samples[warm_at:] if warm_at is not None else [end]
    return {
        "threads": n_threads,
        "seconds": round(time.perf_counter() - t0, 1),
        "calls": sum(calls),
        "calls_per_thread": calls,
        "mismatches": mismatches[:10],
        "distinct_serial_results": len({repr(r) for r in serial}),
        "rss_after_warmup_mb": after_warmup[0],
        "rss_end_mb": end,
        "rss_max_after_warmup_mb": max(after_warmup + [end]),
        "rss_samples_mb": samples[:: max(1, len(samples) // 20)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--warmup", type=float, default=None, help="default: a tenth, >= 2 s")
    parser.add_argument("--rss-bound-mb", type=float, default=8.0)
    parser.add_argument("--leak-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warmup = max(2.0, args.seconds / 10) if args.warmup is None else args.warmup
    report = soak(args.threads, args.seconds, warmup, leak_bytes=args.leak_bytes)
    growth = report["rss_end_mb"] - report["rss_after_warmup_mb"]
    report["rss_growth_mb"] = round(growth, 1)
    report["rss_bound_mb"] = args.rss_bound_mb
    print(json.dumps(report))
    if report["mismatches"]:
        print("soak_threads: FAILED: results differ from the serial ones", file=sys.stderr)
        return 1
    if growth > args.rss_bound_mb:
        print(f"soak_threads: FAILED: RSS grew {growth:.1f} MB after warm-up", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
