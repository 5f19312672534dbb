"""int8 decoding: generated tokens/s of our int8 inference against our float32 and CTranslate2
``compute_type="int8"`` on the same (random) weights, plus resident memory of a loaded model.

Rows: configs "small" and "base" (bench_decode.py's), 1 and 2 threads, greedy and beam 4, and two
batchings: the 32 sources at once ("32") and one source at a time ("1", the same 32 sources in
turn). Every call is forced to 64 output tokens (min = max decoding length), so each row times the
same 32 x 64 tokens for every system. Systems: ours float32, ours int8 (the float32 model loaded
with compute_type="int8"), CTranslate2 int8 (bench/ct2_peer.py's export of the same float32
weights, quantized by CTranslate2 when it loads with compute_type="int8") and, with --ct2-float32,
CTranslate2 float32. Medians of runs that alternate the systems, after a short warm-up decode.
`same` columns: fraction of output tokens equal to ours float32 (random weights have near-ties,
so this is a sanity check; tests/test_quantize.py checks agreement on a trained model).

Memory: resident set growth of a fresh process loading the base model, float32 from its float32
file, int8 from the file `pytransformer quantize` writes, and CTranslate2 int8; measured in
subprocesses (VmRSS after load minus VmRSS after the imports).

    [OMP_WAIT_POLICY=PASSIVE] PYTHONPATH=$PWD python bench/bench_int8.py
        [--configs small,base] [--threads 1,2] [--beams 1,4] [--batches 32,1] [--repeats N]
        [--ct2-float32] [--no-memory | --memory-only] [--no-write] [--quick]

--quick: a tiny model, 4 sources, 8 tokens, one repeat, no RESULTS.md update (a smoke test).
Writes the `int8` section of bench/RESULTS.md otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_decode  # noqa: E402
from _common import command_line, markdown_table, update_results  # noqa: E402

import pytransformer  # noqa: E402
from pytransformer import Transformer, TransformerConfig  # noqa: E402

CONFIGS = dict(bench_decode.CONFIGS)
CONFIGS["tiny"] = dict(d_model=64, num_heads=4, d_ff=128, num_encoder_layers=1,
                       num_decoder_layers=1, src_vocab_size=200, tgt_vocab_size=200)
REPEATS = {"tiny": 1, "small": 3, "base": 1}


def make_sources(vocab: int, n: int) -> list[list[int]]:
    return bench_decode.make_sources(vocab)[:n]


class Ct2:
    """CTranslate2 on `threads` threads with a compute type, translating forced-length batches."""

    def __init__(self, model_dir: str, threads: int, compute_type: str) -> None:
        import ct2_peer
        import ctranslate2

        self.peer = ct2_peer.Peer.__new__(ct2_peer.Peer)
        self.peer.translator = ctranslate2.Translator(
            model_dir, device="cpu", compute_type=compute_type, inter_threads=1,
            intra_threads=threads,
        )

    def translate(self, sources, beam: int, length: int, batch: int) -> list[list[int]]:
        out = []
        for i in range(0, len(sources), batch):
            out += self.peer.translate(sources[i : i + batch], beam, length)
        return out


def _ours(model, sources, beam, length, batch):
    def call():
        out = []
        for i in range(0, len(sources), batch):
            out += [r.hypotheses[0] for r in model.translate(
                sources[i : i + batch], beam_size=beam, min_decoding_length=length,
                max_decoding_length=length, max_batch_size=batch)]
        return out
    return call


def _systems(models, peers, sources, beam, length, batch):
    fns = {name: _ours(m, sources, beam, length, batch) for name, m in models.items()}
    for name, peer in peers.items():
        fns[name] = lambda peer=peer: peer.translate(sources, beam, length, batch)
    return fns


def _same(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(int(x == y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=False))
    return same / max(1, sum(len(p) for p in a))


def _time_rows(name, args, model_dir, ct2_dir, n_sources, length, repeats):
    cfg = Transformer.load(model_dir).config
    models = {"f32": Transformer.load(model_dir),
              "int8": Transformer.load(model_dir, compute_type="int8")}
    sources = make_sources(cfg.src_vocab_size, n_sources)
    rows = []
    for threads in map(int, args.threads.split(",")):
        pytransformer.set_num_threads(threads)
        peers = {}
        if ct2_dir:
            peers["ct2 int8"] = Ct2(ct2_dir, threads, "int8")
            if args.ct2_float32:
                peers["ct2 f32"] = Ct2(ct2_dir, threads, "float32")
        for beam in map(int, args.beams.split(",")):
            for batch in map(int, args.batches.split(",")):
                t0 = time.perf_counter()
                for warm in _systems(models, peers, sources[:2], beam, 4, batch).values():
                    warm()
                outputs: dict = {}
                fns = _systems(models, peers, sources, beam, length, batch)
                med = bench_decode._alternating_medians(bench_decode._keeping(fns, outputs),
                                                        repeats)
                toks = len(sources) * length
                rate = {k: toks / v for k, v in med.items()}
                row = [name, threads, beam, batch, f"{rate['f32']:.0f}", f"{rate['int8']:.0f}",
                       f"{rate['int8'] / rate['f32']:.2f}x",
                       f"{_same(outputs['f32'], outputs['int8']):.3f}"]
                for peer in ("ct2 int8", "ct2 f32"):
                    if peer in rate:
                        row += [f"{rate[peer]:.0f}", f"{rate['int8'] / rate[peer]:.2f}x",
                                f"{_same(outputs['f32'], outputs[peer]):.3f}"]
                    elif peer == "ct2 int8":
                        row += ["-", "-", "-"]
                rows.append(row)
                print(" | ".join(map(str, row)), f"({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    return rows


_RSS_CHILD = textwrap.dedent(
    """
    import gc, json, sys
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    kind, path = sys.argv[1], sys.argv[2]
    import numpy, pytransformer
    if kind == "ct2":
        import ctranslate2
    gc.collect()
    before = rss()
    if kind == "ct2":
        keep = ctranslate2.Translator(path, device="cpu", compute_type="int8")
    else:
        keep = pytransformer.Transformer.load(path, compute_type=kind)
    gc.collect()
    print(json.dumps({"bytes": rss() - before}))
    """
)


def _rss_growth(kind: str, path: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, kind, path], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["bytes"])


def _memory_rows(name, model_dir, int8_dir, ct2_dir):
    f32 = _rss_growth("float32", model_dir)
    rows = [[name, "ours float32", f"{f32 / 2**20:.1f}", "1.00"]]
    i8 = _rss_growth("int8", int8_dir)
    rows.append([name, "ours int8 (quantized file)", f"{i8 / 2**20:.1f}", f"{i8 / f32:.2f}"])
    if ct2_dir:
        c = _rss_growth("ct2", ct2_dir)
        rows.append([name, "CTranslate2 int8", f"{c / 2**20:.1f}", f"{c / f32:.2f}"])
    files = [os.path.getsize(os.path.join(d, "model.safetensors")) for d in (model_dir, int8_dir)]
    rows.append([name, "weights file int8 / float32", f"{files[1] / 2**20:.1f}",
                 f"{files[1] / files[0]:.2f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,base")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--beams", default="1,4")
    ap.add_argument("--batches", default="32,1", help="sources per translate call")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per system")
    ap.add_argument("--ct2-float32", action="store_true", help="also time CTranslate2 float32")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the resident-memory rows")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (implies --no-write)")
    args = ap.parse_args()
    if args.quick:
        args.configs, args.no_write = "tiny", True
        args.batches = ",".join(str(min(int(b), 4)) for b in args.batches.split(","))
    n_sources, length = (4, 8) if args.quick else (bench_decode.N_SOURCES, bench_decode.LENGTH)
    ct2 = bench_decode._ct2_available()
    speed, memory = [], []
    load_start = os.getloadavg()[0]
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TransformerConfig(**CONFIGS[name], dropout=0.0, max_len=256)
            model = Transformer(cfg, seed=0).eval()
            model_dir, int8_dir = os.path.join(tmp, "f32"), os.path.join(tmp, "int8")
            model.save(model_dir)
            Transformer.load(model_dir, compute_type="int8").save(int8_dir)
            ct2_dir = None
            if ct2:
                import ct2_peer

                ct2_dir = os.path.join(tmp, "ct2")
                os.makedirs(ct2_dir)
                ct2_peer.convert(model, ct2_dir)
            del model
            if not args.memory_only:
                speed += _time_rows(name, args, model_dir, ct2_dir, n_sources, length,
                                    args.repeats or REPEATS[name])
            if not args.no_memory and (name != "small" or "base" not in args.configs):
                memory += _memory_rows(name, model_dir, int8_dir, ct2_dir)
    header = ["config", "threads", "beam", "batch", "ours f32 tok/s", "ours int8 tok/s",
              "int8/f32", "same (int8)", "CT2 int8 tok/s", "ours int8/CT2 int8", "same (CT2 int8)"]
    if args.ct2_float32:
        header += ["CT2 f32 tok/s", "ours int8/CT2 f32", "same (CT2 f32)"]
    table = markdown_table(header, speed)
    mem_table = markdown_table(["config", "loaded", "resident MiB", "vs float32"], memory)
    print(table)
    if memory:
        print(mem_table)
    if not args.no_write:
        loads = f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"
        cmd = command_line("bench_int8.py", sys.argv[1:])
        update_results("int8", _report(table, mem_table if memory else "", cmd, loads))


def _report(table: str, mem_table: str, cmd: str, loads: str) -> str:
    return (
        "int8 inference (issue 15): generated tokens/s of `Transformer.translate`, float32 and "
        "int8 (`compute_type=\"int8\"`), and CTranslate2 `compute_type=\"int8\"` on the same "
        "random weights (bench/ct2_peer.py), "
        f"{bench_decode.N_SOURCES} sources, forced length {bench_decode.LENGTH}; `batch`: sources "
        "per call (1 = one sentence at a time); medians of runs alternating the systems. `same`: "
        "fraction of output tokens equal to ours float32.\n\n"
        f"Command: `{cmd}` (1-minute load average at start / end: {loads}, on 2 cores)\n\n"
        f"{table}\n\n{mem_table}\n"
    )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
