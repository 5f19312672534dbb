"""Training-step throughput: pytransformer vs PyTorch eager on the identical model and weights.

One step = forward, label-smoothed (0.1) cross-entropy, backward, Adam update (dropout 0.1, as
the paper trains). Batches: 32 sentence pairs, source and target lengths uniform in [16, 48],
token ids uniform over the vocabulary; four fixed batches cycled, the same for both systems.
tokens/s counts non-pad target tokens (len(y) + 1 per sentence) per second.

With ``--data DATA`` (a directory written by ``pytransformer preprocess``, e.g. of Multi30k) a
row ``small/real`` is added: the small model with DATA's vocabularies on the first four batches
``ShardBatcher`` draws from DATA's training split (4,096 tokens of padded cost each: a few
hundred short sentences), the batches the trainer sees on a real corpus.

Both workers first set glibc's allocator as ``pytransformer train`` does
(``train.allocator.reuse_freed_memory``: a step reuses the memory the previous one freed instead
of mapping and faulting it in afresh); the setting is process-wide and applies to torch's CPU
allocator as much as to numpy's.

Each system runs in its own worker process (so its peak RSS is its own); the parent alternates
timed rounds between the two workers (interleaved, so machine noise hits both alike) and reports
medians. Usage::

    PYTHONPATH=$PWD python bench/bench_train.py [--sizes small,base] [--threads 1,2]
        [--rounds 5] [--data DATA] [--no-write]

On a machine shared with other busy processes, OpenMP's default spin-waiting stalls
multi-threaded steps whenever a team thread is descheduled (ours and torch's alike);
OMP_WAIT_POLICY=PASSIVE in the environment (passed to both workers and recorded in the command)
then measures the libraries rather than the scheduler. Besides the median ratio, the "best" ratio
compares the fastest round of each: noise from other processes only ever adds time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = {
    "small": dict(d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3, num_decoder_layers=3,
                  src_vocab_size=8000, tgt_vocab_size=8000),
    "base": dict(d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6,
                 src_vocab_size=32000, tgt_vocab_size=32000),
}  # fmt: skip
COMMON = dict(dropout=0.1, max_len=64, pad_id=0, bos_id=1, eos_id=2)
BATCH, MIN_LEN, MAX_LEN, N_BATCHES, LABEL_SMOOTHING, LR = 32, 16, 48, 4, 0.1, 1e-4


FIELDS = ("src", "src_lengths", "tgt_in", "tgt_out", "tgt_lengths")


def make_arrays(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """One padded batch (the layout of pytransformer.train.data.make_batch), from numpy alone."""
    rng = np.random.default_rng(seed)
    src_len = rng.integers(MIN_LEN, MAX_LEN + 1, BATCH)
    tgt_len = rng.integers(MIN_LEN, MAX_LEN + 1, BATCH)
    src = np.zeros((BATCH, src_len.max()), np.int64)
    tgt_in = np.zeros((BATCH, tgt_len.max() + 1), np.int64)
    tgt_out = np.zeros_like(tgt_in)
    for i in range(BATCH):
        src[i, : src_len[i]] = rng.integers(3, vocab, src_len[i])
        y = rng.integers(3, vocab, tgt_len[i])
        tgt_in[i, : tgt_len[i] + 1] = np.concatenate(([1], y))
        tgt_out[i, : tgt_len[i] + 1] = np.concatenate((y, [2]))
    return {"src": src, "src_lengths": src_len.astype(np.int64), "tgt_in": tgt_in,
            "tgt_out": tgt_out, "tgt_lengths": (tgt_len + 1).astype(np.int64)}  # fmt: skip


def real_batches(data_dir: str) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """The first N_BATCHES batches of DATA's training split, and the config fields they need."""
    from pytransformer.train.shards import ShardBatcher, open_data

    data = open_data(data_dir)
    batcher = ShardBatcher(data.split("train"), 4096, seed=0, corpus_id=data.id,
                           pad_id=COMMON["pad_id"], bos_id=COMMON["bos_id"],
                           eos_id=COMMON["eos_id"])  # fmt: skip
    batches = [batcher.next_batch() for _ in range(N_BATCHES)]
    arrays = [{f: np.asarray(getattr(b, f), np.int64) for f in FIELDS} for b in batches]
    longest = max(max(a["src"].shape[1], a["tgt_in"].shape[1]) for a in arrays)
    fields = {"src_vocab_size": int(data.meta["src_vocab_size"]),
              "tgt_vocab_size": int(data.meta["tgt_vocab_size"]), "max_len": max(64, longest)}
    return arrays, fields


def save_batches(batches: list[dict[str, np.ndarray]], path: str) -> str:
    np.savez(path, **{f"{k}_{f}": b[f] for k, b in enumerate(batches) for f in FIELDS})
    return path


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
    with np.load(path) as z:
        return [{f: z[f"{k}_{f}"] for f in FIELDS} for k in range(N_BATCHES)]


def config_fields(size: str, extra: dict) -> dict:
    """The model's fields: SIZES[size] and COMMON, with a row's overrides."""
    return {**SIZES[size], **COMMON, **extra}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------
# workers


def ours_stepper(fields: dict, threads: int, weights: str, batches_path: str):
    import pytransformer as pt
    from pytransformer.io import load_safetensors
    from pytransformer.train.data import Batch
    from pytransformer.train.optim import Adam

    pt.set_num_threads(threads)
    cfg = pt.TransformerConfig(**fields)
    base = current_rss_mb()
    model = pt.Transformer(cfg, seed=0)
    model.load_state_dict(load_safetensors(weights)[0])
    opt = Adam(model.parameters(), lr=LR, betas=(0.9, 0.98), eps=1e-9, track_grad_norm=False)
    batches = [Batch(**a, n_tokens=int(a["tgt_lengths"].sum()))
               for a in load_batches(batches_path)]  # fmt: skip
    model.train()

    def step(i: int) -> tuple[float, int]:
        b = batches[i % N_BATCHES]
        model.zero_grad()
        loss_sum, n = model.loss_and_grad(b, label_smoothing=LABEL_SMOOTHING, dropout_seed=i)
        opt.step(model.gradients())
        return loss_sum / n, n

    return step, base


def torch_stepper(fields: dict, threads: int, weights: str, batches_path: str):
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from torch_reference import build_torch_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # our io module alone (numpy only), so the torch process does not load pytransformer
    spec = importlib.util.spec_from_file_location("_pt_io", ROOT / "pytransformer" / "io.py")
    ptio = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ptio)
    cfg = types.SimpleNamespace(**fields, attention_dropout=0.0, activation="relu",
                                norm_first=False, tie_embeddings="decoder", output_bias=True,
                                layer_norm_eps=1e-5, encoder_attention_window=None,
                                decoder_attention_window=None)  # fmt: skip
    base = current_rss_mb()
    state = ptio.load_safetensors(weights)[0]
    model = build_torch_model(cfg, state, kind="transformer")
    del state
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.98), eps=1e-9)
    batches = [{key: torch.from_numpy(v) for key, v in a.items()}
               for a in load_batches(batches_path)]  # fmt: skip

    def step(i: int) -> tuple[float, int]:
        b = batches[i % N_BATCHES]
        opt.zero_grad(set_to_none=True)
        loss = model.loss(b["src"], b["src_lengths"], b["tgt_in"], b["tgt_out"],
                          label_smoothing=LABEL_SMOOTHING)  # fmt: skip
        loss.backward()
        opt.step()
        return float(loss.detach()), int(b["tgt_lengths"].sum())

    return step, base


def worker(system: str, fields: dict, threads: int, weights: str, batches_path: str) -> None:
    """Line protocol on stdin/stdout: prints a JSON "ready" line, then answers "run N" with the
    seconds per step of N steps, and "quit" with the peak RSS."""
    import_base = current_rss_mb()
    from pytransformer.train.allocator import reuse_freed_memory

    reuse_freed_memory()  # as `pytransformer train` runs; glibc-wide, so torch's too
    make = ours_stepper if system == "ours" else torch_stepper
    step, base = make(fields, threads, weights, batches_path)
    first_loss, _ = step(0)  # warm-up: allocations, thread pools, caches
    i = 1
    print(json.dumps({"ready": True, "first_loss": first_loss, "rss_after_import_mb": base,
                      "rss_start_mb": import_base}), flush=True)  # fmt: skip
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            n, tokens = int(cmd[1]), 0
            t0 = time.perf_counter()
            for _ in range(n):
                tokens += step(i)[1]
                i += 1
            dt = time.perf_counter() - t0
            print(json.dumps({"seconds_per_step": dt / n, "tokens_per_s": tokens / dt}), flush=True)
        elif cmd[0] == "quit":
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
            return


# ---------------------------------------------------------------------------------------------
# parent


class Worker:
    def __init__(self, system: str, case: dict, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, __file__, "--worker", system, "--sizes", case["size"],
               "--threads", str(threads), "--weights", case["weights"],
               "--batches", case["batches"], "--fields", json.dumps(case["fields"])]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, n: int) -> dict:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return self._read()

    def quit(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait()
        return out


def measure(case: dict, threads: int, rounds: int, steps: int) -> dict:
    workers = {name: Worker(name, case, threads) for name in ("ours", "torch")}
    samples: dict[str, list[float]] = {name: [] for name in workers}
    try:
        for r in range(rounds):
            order = list(workers) if r % 2 == 0 else list(workers)[::-1]
            for name in order:
                samples[name].append(workers[name].run(steps)["tokens_per_s"])
    finally:
        finals = {name: w.quit() for name, w in workers.items()}
    return {
        name: {
            "tokens_per_s": statistics.median(samples[name]),
            "samples": samples[name],
            "peak_rss_mb": finals[name]["peak_rss_mb"],
            "rss_after_import_mb": workers[name].ready["rss_after_import_mb"],
            "first_loss": workers[name].ready["first_loss"],
        }
        for name in workers
    }


def write_weights(fields: dict, path: str) -> str:
    """Our initialisation (seed 0) saved once; both workers load it."""
    import pytransformer as pt
    from pytransformer.io import save_safetensors

    save_safetensors(path, pt.Transformer(pt.TransformerConfig(**fields), seed=0).parameters())
    return path


def make_cases(sizes: list[str], data_dir: str | None, directory: str) -> list[dict]:
    """The rows to measure: each size on the synthetic batches, then small/real with --data."""
    cases = []
    for size in sizes:
        fields = config_fields(size, {})
        batches = [make_arrays(fields["tgt_vocab_size"], k) for k in range(N_BATCHES)]
        cases.append({"label": size, "size": size, "fields": {}, "batches": batches})
    if data_dir is not None:
        batches, extra = real_batches(data_dir)
        cases.append({"label": "small/real", "size": "small", "fields": extra,
                      "batches": batches})  # fmt: skip
    for k, case in enumerate(cases):
        fields = config_fields(case["size"], case["fields"])
        case["weights"] = write_weights(fields, os.path.join(directory, f"{k}.safetensors"))
        case["batches"] = save_batches(case["batches"], os.path.join(directory, f"{k}.npz"))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="small,base")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", help="a preprocessed corpus: adds the small/real row")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    ap.add_argument("--fields", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fields = config_fields(args.sizes, json.loads(args.fields))
        worker(args.worker, fields, int(args.threads), args.weights, args.batches)
        return

    sys.path.insert(0, str(ROOT / "bench"))
    from _common import command_line, markdown_table, update_results

    import pytransformer as pt

    rows, raw = [], {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for case in make_cases(args.sizes.split(","), args.data, tmp):
            for threads in (int(t) for t in args.threads.split(",")):
                steps = {"small": 2, "small/real": N_BATCHES}.get(case["label"], 1)
                res = measure(case, threads, args.rounds, steps)
                raw[f"{case['label']}/{threads}"] = res
                o, t = res["ours"], res["torch"]
                rows.append([
                    case["label"], threads, f"{o['tokens_per_s']:.0f}", f"{t['tokens_per_s']:.0f}",
                    f"**{o['tokens_per_s'] / t['tokens_per_s']:.2f}x**",
                    f"{max(o['samples']) / max(t['samples']):.2f}x",
                    f"{o['peak_rss_mb']:.0f}", f"{t['peak_rss_mb']:.0f}",
                    f"{o['peak_rss_mb'] - o['rss_after_import_mb']:.0f}",
                    f"{t['peak_rss_mb'] - t['rss_after_import_mb']:.0f}",
                ])  # fmt: skip
                print(case["label"], threads, json.dumps(res), flush=True)
    table = markdown_table(
        ["model", "threads", "ours tok/s", "torch tok/s", "ours/torch", "ours/torch (best)",
         "ours peak RSS MB",
         "torch peak RSS MB", "ours RSS above imports MB", "torch RSS above imports MB"],
        rows,
    )  # fmt: skip
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = command_line("bench_train.py", ["--sizes", args.sizes, "--threads", args.threads,
                                          "--rounds", str(args.rounds),
                                          *(["--data", "DATA"] if args.data else [])])  # fmt: skip
    body = "\n".join([
        f"Command: `{cmd}` ({stamp}, "
        f"isa {pt.cpu_info()['isa']}, torch eager {__import__('torch').__version__}; "
        f"1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, on 2 cores).",
        "",
        "One training step: forward, label-smoothed cross-entropy, backward, Adam (dropout 0.1). "
        "32 pairs, source/target lengths uniform 16-48 (about 1000 target tokens a step); "
        "tokens/s = non-pad target tokens per second, median of "
        f"{args.rounds} interleaved rounds; each system in its own process. "
        "Peak RSS = the process's ru_maxrss (torch's includes ~220 MB of library after import); "
        "'above imports' = peak minus RSS after importing the library."
        + (" small/real: the small model on the first four batches of DATA's training split "
           "(DATA: a `pytransformer preprocess` directory; 4,096 tokens of padded cost each)."
           if args.data else ""),
        "",
        table,
    ])  # fmt: skip
    print(body)
    if not args.no_write:
        update_results("train", body)


if __name__ == "__main__":
    main()
