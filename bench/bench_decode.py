"""Decoding throughput: generated tokens/s of Transformer.translate vs a PyTorch eager KV-cache
decoder on identical (random) weights.

32 sources of lengths uniform in 16..48, forced output length 64 (min = max decoding length, so
every system generates 32 x 64 tokens), greedy and beam 4, configs "small" and "base", 1 and 2
threads; medians of runs that alternate ours and torch. One call is long (seconds to a minute),
so each system is warmed up on a short decode rather than a full one, and "base" takes one timed
run per system unless --repeats says otherwise. Writes the `decode` section of bench/RESULTS.md.

    [OMP_WAIT_POLICY=PASSIVE] PYTHONPATH=$PWD python bench/bench_decode.py
        [--configs small,base] [--threads 1,2] [--repeats N] [--no-write]

On the shared machine, OMP_WAIT_POLICY=PASSIVE (it applies to torch's OpenMP as well) keeps a
descheduled team thread from stalling every 2-thread call.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import markdown_table, update_results  # noqa: E402

import pytransformer  # noqa: E402
from pytransformer import Transformer, TransformerConfig  # noqa: E402

CONFIGS = {
    "small": dict(d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                  num_decoder_layers=3, src_vocab_size=8000, tgt_vocab_size=8000),
    "base": dict(d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6,
                 num_decoder_layers=6, src_vocab_size=32000, tgt_vocab_size=32000),
}
N_SOURCES, LENGTH = 32, 64
REPEATS = {"small": 3, "base": 1}


def make_sources(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(16, 49))).tolist()
            for _ in range(N_SOURCES)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,base")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--beams", default="1,4")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per system")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()
    try:
        import torch
        from torch_reference import build_torch_model
    except ImportError:
        torch = None
    ct2 = _ct2_available()
    rows = []
    load_start = os.getloadavg()[0]
    for name in args.configs.split(","):
        cfg = TransformerConfig(**CONFIGS[name], dropout=0.0, max_len=256)
        model = Transformer(cfg, seed=0).eval()
        tm = build_torch_model(cfg, model.state_dict()).eval() if torch else None
        ct2_dir = tempfile.TemporaryDirectory() if ct2 else None
        if ct2_dir:
            import ct2_peer

            ct2_peer.convert(model, ct2_dir.name)
        sources = make_sources(cfg.src_vocab_size)
        for threads in map(int, args.threads.split(",")):
            pytransformer.set_num_threads(threads)
            if torch:
                torch.set_num_threads(threads)
            peer = ct2_peer.Peer(ct2_dir.name, threads) if ct2_dir else None
            for beam in map(int, args.beams.split(",")):
                fns = _systems(model, tm, sources, beam, peer=peer)
                outputs: dict = {}
                t0 = time.perf_counter()
                for warm in _systems(model, tm, sources[:2], beam, length=4, peer=peer).values():
                    warm()
                med = _alternating_medians(_keeping(fns, outputs),
                                           args.repeats or REPEATS[name])
                toks = N_SOURCES * LENGTH
                ours = toks / med["ours"]
                row = [name, threads, beam, f"{ours:.0f}"]
                for other in ("torch", "ct2"):
                    rate = toks / med[other] if other in med else None
                    agree = _agreement(outputs, other) if other in outputs else None
                    row += [f"{rate:.0f}" if rate else "-", f"{ours / rate:.2f}x" if rate else "-",
                            f"{agree:.3f}" if agree is not None else "-"]
                rows.append(row)
                print(" | ".join(map(str, row)), f"({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    header = ["config", "threads", "beam", "ours tok/s", "torch tok/s", "ours/torch",
              "same tokens (torch)", "CTranslate2 tok/s", "ours/CTranslate2",
              "same tokens (CTranslate2)"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_write:
        policy = os.environ.get("OMP_WAIT_POLICY")
        cmd = ((f"OMP_WAIT_POLICY={policy} " if policy else "")
               + "PYTHONPATH=$PWD python bench/bench_decode.py " + " ".join(sys.argv[1:]))
        loads = f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"
        update_results("decode", _report(table, cmd.strip(), loads))


def _ct2_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def _systems(model, tm, sources, beam, length=LENGTH, peer=None):
    """The calls to time: ours, torch's and CTranslate2's when they are importable."""
    fns = {"ours": lambda: model.translate(sources, beam_size=beam, min_decoding_length=length,
                                           max_decoding_length=length)}
    if tm is not None:
        import torch_decode

        if beam == 1:
            fns["torch"] = lambda: torch_decode.greedy(tm, sources, max_len=length, min_len=length)
        else:
            fns["torch"] = lambda: torch_decode.beam_search(
                tm, sources, beam_size=beam, max_len=length, min_len=length)
    if peer is not None:
        fns["ct2"] = lambda: peer.translate(sources, beam, length)
    return fns


def _alternating_medians(fns, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns so machine noise hits all alike
    (bench/_common.interleaved_medians without its full-size warm-up call)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def _keeping(fns, outputs):
    """The same calls, each remembering its last result (to compare the systems' tokens without
    extra runs)."""
    def keep(name, fn):
        def call():
            outputs[name] = fn()
        return call
    return {name: keep(name, fn) for name, fn in fns.items()}


def _agreement(outputs, other: str) -> float:
    """Fraction of output tokens equal between ours and `other` (random weights: near-ties in
    the logits may flip a token and everything after it, so this is a sanity check, not a test)."""
    ours = [r.hypotheses[0] for r in outputs["ours"]]
    peer = outputs[other]
    same = sum(int(a == b) for x, y in zip(ours, peer, strict=True)
               for a, b in zip(x, y, strict=False))
    return same / sum(len(x) for x in ours)


def _report(table: str, cmd: str, loads: str) -> str:
    return (
        f"Generated tokens/s of `Transformer.translate` ({N_SOURCES} sources of lengths 16-48, "
        f"forced length {LENGTH} via min = max decoding length, so {N_SOURCES * LENGTH} tokens "
        "per call, encoder included) vs a PyTorch eager KV-cache decoder "
        "(bench/torch_decode.py over tests/torch_reference.py) on the same random weights; "
        "and, where `pip install ctranslate2` is present, CTranslate2 (float32, the same weights "
        "converted by bench/ct2_peer.py, intra_threads = threads); "
        "medians of runs alternating the systems (after a short warm-up decode), "
        f"{REPEATS['small']} per system for small, {REPEATS['base']} for base unless the command "
        "says --repeats. `same tokens`: fraction of output tokens identical to ours.\n\n"
        f"Command: `{cmd}` (1-minute load average at start / end: {loads}, on 2 cores)\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
