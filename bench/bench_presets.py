"""Training speed of each preset on a real corpus's batches: parameters, seconds per update and
target tokens/s, the figures the README's preset table quotes.

    [OMP_WAIT_POLICY=PASSIVE] PYTHONPATH=$PWD python bench/bench_presets.py DATA
        [--presets tiny,small,base,big] [--threads 2] [--steps 5] [--write]

DATA is a directory written by ``pytransformer preprocess`` (e.g. of Multi30k, as
bench_multi30k.py leaves it in WORK/data). Each preset's model (tied embeddings over DATA's
joint vocabulary) trains on the first batches ``ShardBatcher`` draws (the preset's max_tokens,
seed 0) through ``Trainer.train_step`` (Adam, clipping, label smoothing 0.1, dropout as the
preset): one warm-up update, then the median of --steps timed ones. --write puts the table in
bench/RESULTS.md (section "presets").
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _common import command_line, markdown_table, update_results  # noqa: E402
from bench_multi30k import build  # noqa: E402

import pytransformer as pt  # noqa: E402
from pytransformer.train.allocator import reuse_freed_memory  # noqa: E402
from pytransformer.train.optim import Adam  # noqa: E402
from pytransformer.train.presets import get_preset  # noqa: E402
from pytransformer.train.shards import open_data  # noqa: E402
from pytransformer.train.trainer import Trainer  # noqa: E402


def measure(data, preset: str, steps: int) -> dict[str, float]:
    model, batcher, schedule, _ = build(data, {"preset": preset})
    opt = Adam(model.parameters(), lr=schedule, max_grad_norm=1.0)
    trainer = Trainer(model, opt, batcher, label_smoothing=0.1, seed=0, progress=False)
    trainer.train_step()  # warm-up: allocations, thread pools
    infos = [trainer.train_step() for _ in range(steps)]
    seconds = statistics.median(i["seconds"] for i in infos)
    tokens = sum(i["tokens"] for i in infos) / sum(i["seconds"] for i in infos)
    return {"parameters": model.num_parameters(), "seconds": seconds, "tokens_per_s": tokens,
            "max_tokens": get_preset(preset).max_tokens}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=pathlib.Path)
    ap.add_argument("--presets", default="tiny,small,base,big")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    args = ap.parse_args()
    pt.set_num_threads(args.threads)
    reuse_freed_memory()
    data = open_data(args.data)
    rows = []
    for name in args.presets.split(","):
        r = measure(data, name, args.steps)
        rows.append([f"`{name}`", f"{r['parameters'] / 1e6:.2f} M", r["max_tokens"],
                     f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}"])  # fmt: skip
        print(" | ".join(map(str, rows[-1])), flush=True)
    table = markdown_table(["preset", "parameters", "max tokens", "s/update", "target tokens/s"],
                           rows)  # fmt: skip
    print(table)
    if args.write:
        cmd = command_line("bench_presets.py", ["DATA", *sys.argv[2:]])
        note = (f"Command: `{cmd}` (DATA: {args.data.name}, target vocabulary "
                f"{data.meta['tgt_vocab_size']}; {args.threads} threads; median of "
                f"{args.steps} updates after one warm-up).\n\n")  # fmt: skip
        update_results("presets", note + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
