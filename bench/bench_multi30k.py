"""The yardstick: Multi30k English->German BLEU at fixed wall-clock training budgets, pytransformer
beside a PyTorch eager peer with the same architecture, data, tokenizer and schedule.

    PYTHONPATH=$PWD python bench/bench_multi30k.py /path/to/multi30k [--budgets 15,30,60]
        [--torch-budgets 15,30] [--preset small] [--dropout P] [--systems ours,torch]
        [--threads 2] [--curve-every MIN] [--average-last N[,N...]] [--average-every MIN]
        [--work DIR] [--write] [--report-only]

DATA_DIR holds train.{en,de}, val.{en,de} and test_2016_flickr.{en,de} (raw text, a sentence a
line). Steps:

1. ``preprocess`` (joint SentencePiece vocabulary, --vocab-size, default 8,000) into WORK/data,
   reused when it is already there.
2. Each system in turn (never both at once: they would share the cores) trains from the same
   initial weights on the same batches (``ShardBatcher``, the same seed), with the preset's
   warm-up / inverse-sqrt schedule, Adam (0.9, 0.98, 1e-9), clipping at norm 1, label smoothing
   0.1. Ours is ``pytransformer.train.Trainer``; the peer is tests/torch_reference.py's
   post-norm model (tied embeddings) with ``torch.optim.Adam``. Only training counts against a
   budget: the clock stops while the snapshots below are evaluated.
3. Every --curve-every minutes of training: validation BLEU (greedy) for the curve; at each
   budget: BLEU and chrF on test_2016_flickr (sacrebleu, detokenised, beam 4, length penalty
   0.6). Both systems' weights are decoded by pytransformer's beam search, so the comparison is
   of training alone. With --average-last N, a snapshot of the weights is kept every
   --average-every minutes of training and each budget is also scored with the mean of the
   last N (checkpoint averaging, as ``pytransformer average`` does for checkpoint directories);
   several N (``--average-last 5,20``) score several windows from the same run.

Writes the models at each budget to WORK/models/SYSTEM-Nmin, WORK/multi30k.json, the picture
WORK/multi30k_bleu.png (validation BLEU against training time) and, with --write, the table
into bench/RESULTS.md (section "multi30k"). A full run (budgets 15, 30, 60 and both systems)
takes about 2 x 60 minutes of training plus the evaluations (about 2 x 10 minutes on two
cores). ``--budgets 1 --preset tiny`` is a smoke run. WORK/multi30k.json is rewritten after
every evaluation, so a stopped run keeps its points; ``--report-only`` redoes the table and the
picture from it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from _common import command_line, markdown_table, update_results  # noqa: E402

import pytransformer as pt  # noqa: E402
from pytransformer.io import atomic_write_text, split_lines  # noqa: E402
from pytransformer.models import Transformer, TransformerConfig  # noqa: E402
from pytransformer.preprocess import PreprocessOptions, preprocess  # noqa: E402
from pytransformer.text.tokenizer import load_tokenizer  # noqa: E402
from pytransformer.train.allocator import reuse_freed_memory  # noqa: E402
from pytransformer.train.data import make_batch  # noqa: E402
from pytransformer.train.optim import Adam  # noqa: E402
from pytransformer.train.presets import get_preset  # noqa: E402
from pytransformer.train.schedule import Noam  # noqa: E402
from pytransformer.train.shards import DataError, ShardBatcher, open_data  # noqa: E402
from pytransformer.train.trainer import Trainer  # noqa: E402

IDS = dict(pad_id=0, bos_id=1, eos_id=2)
LABEL_SMOOTHING, CLIP, SEED = 0.1, 1.0, 0


def read(path: pathlib.Path) -> list[str]:
    return split_lines(path.read_text(encoding="utf-8"))


def prepare_data(data_dir: pathlib.Path, work: pathlib.Path, vocab_size: int):
    out = work / "data"
    try:
        data = open_data(out)
        if data.meta["options"]["vocab_size"] == vocab_size:
            return data
    except (DataError, KeyError):
        pass
    report = preprocess(
        data_dir / "train.en", data_dir / "train.de", out, valid_src=data_dir / "val.en",
        valid_tgt=data_dir / "val.de", options=PreprocessOptions(vocab_size=vocab_size),
        log=lambda m: print(m, flush=True),
    )
    print(report.summary(), flush=True)
    return open_data(out)


class Evaluator:
    """Decodes sources with a pytransformer model (greedy for validation, beam 4 for test)."""

    def __init__(self, data, data_dir: pathlib.Path):
        self.tok = load_tokenizer(data.path("tgt_tokenizer.json"))
        src_tok = load_tokenizer(data.path("src_tokenizer.json"))
        self.valid_src = [src_tok.encode(s) for s in read(data_dir / "val.en")]
        self.valid_ref = read(data_dir / "val.de")
        self.test_src = [src_tok.encode(s) for s in read(data_dir / "test_2016_flickr.en")]
        self.test_ref = read(data_dir / "test_2016_flickr.de")

    def score(self, model: Transformer, test: bool) -> dict[str, float]:
        import sacrebleu

        src, ref = (self.test_src, self.test_ref) if test else (self.valid_src, self.valid_ref)
        model.eval()
        out = model.translate(src, beam_size=4 if test else 1, length_penalty=0.6,
                              max_decoding_length=2 * max(map(len, src)) + 10,
                              max_batch_size=64)  # fmt: skip
        hyps = [self.tok.decode(r.hypotheses[0]) for r in out]
        return {"bleu": sacrebleu.corpus_bleu(hyps, [ref]).score,
                "chrf": sacrebleu.corpus_chrf(hyps, [ref]).score}  # fmt: skip


def build(data, recipe: dict[str, Any]) -> tuple[Transformer, ShardBatcher, Noam, list]:
    p = get_preset(recipe["preset"])
    shape = {**p.model, **({"dropout": recipe["dropout"]} if recipe.get("dropout") is not None
                           else {})}  # fmt: skip
    lengths = data.manifest["splits"]
    longest = max(max(e["max_length"]["src"], e["max_length"]["tgt"] + 1)
                  for e in lengths.values())  # fmt: skip
    cfg = TransformerConfig(
        src_vocab_size=data.meta["src_vocab_size"], tgt_vocab_size=data.meta["tgt_vocab_size"],
        tie_embeddings="all", max_len=max(256, longest), **IDS, **shape,
    )
    model = Transformer(cfg, seed=SEED)
    batcher = ShardBatcher(data.split("train"), max(p.max_tokens, longest), seed=SEED,
                           corpus_id=data.id, **IDS)  # fmt: skip
    schedule = Noam(cfg.d_model, p.warmup, factor=p.lr * (cfg.d_model * p.warmup) ** 0.5)
    vp = data.split("valid").pairs()
    valid = [make_batch(vp[i : i + 64], **IDS) for i in range(0, len(vp), 64)]
    return model, batcher, schedule, valid


class Ours:
    name = "pytransformer"

    def __init__(self, data, recipe: dict[str, Any]):
        self.model, batcher, schedule, _ = build(data, recipe)
        opt = Adam(self.model.parameters(), lr=schedule, max_grad_norm=CLIP)
        self.trainer = Trainer(self.model, opt, batcher, label_smoothing=LABEL_SMOOTHING,
                               seed=SEED, progress=False)  # fmt: skip

    def train_until(self, seconds: float) -> None:
        self.trainer.fit(max_time=seconds)

    @property
    def steps(self) -> int:
        return self.trainer.step

    def snapshot(self) -> Transformer:
        return self.model


class Torch:
    name = "pytorch"

    def __init__(self, data, recipe: dict[str, Any]):
        import torch
        from torch_reference import build_torch_model

        self.torch = torch
        self.ours, self.batcher, self.schedule, _ = build(data, recipe)
        self.model = build_torch_model(self.ours.config, self.ours.state_dict(), "transformer")
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
        self.step_count, self.elapsed = 0, 0.0

    def train_until(self, seconds: float) -> None:
        torch = self.torch
        while self.elapsed < seconds:
            t0 = time.perf_counter()
            b = self.batcher.next_batch()
            self.step_count += 1
            for group in self.opt.param_groups:
                group["lr"] = self.schedule(self.step_count)
            self.model.train()
            self.opt.zero_grad(set_to_none=True)
            loss = self.model.loss(b.src, b.src_lengths, b.tgt_in, b.tgt_out,
                                   label_smoothing=LABEL_SMOOTHING)  # fmt: skip
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            self.opt.step()
            self.elapsed += time.perf_counter() - t0

    @property
    def steps(self) -> int:
        return self.step_count

    def snapshot(self) -> Transformer:
        """Our model holding the torch weights (the names are ours, see torch_reference)."""
        from torch_reference import _our_name

        self.ours.load_state_dict({_our_name(n): p.detach().numpy().copy()
                                   for n, p in self.model.named_parameters()})  # fmt: skip
        return self.ours


def mean_state(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The float64 mean of several snapshots, rounded once to each parameter's dtype (as
    pytransformer.train.average does for checkpoint directories)."""
    return {k: np.mean([s[k] for s in states], axis=0, dtype=np.float64).astype(a.dtype)
            for k, a in states[0].items()}  # fmt: skip


def marks(every: float, end: float) -> set[float]:
    return {round(float(m), 6) for m in np.arange(every, end + 1e-9, every)}


def run_system(cls, data, evaluator: Evaluator, recipe: dict[str, Any], budgets: list[float],
               save_dir: pathlib.Path, result: dict[str, Any], on_mark: Any) -> None:
    """Trains one system to its last budget, filling result ({"curve", "budgets"}) and calling
    on_mark() after each evaluation, so an interrupted run keeps what it measured. Where
    recipe["average_last"] (a list) holds an N > 1, a snapshot is kept every
    recipe["average_every"] minutes and each budget is also scored with the mean of the last N,
    for each N (the paper's checkpoint averaging)."""
    system = cls(data, recipe)
    every, n_avg = recipe["curve_every"], max(recipe["average_last"])
    snap_marks = marks(recipe["average_every"], max(budgets)) if n_avg > 1 else set()
    curve_marks = marks(every, max(budgets))
    curve, table = result.setdefault("curve", []), result.setdefault("budgets", [])
    snaps: list[dict[str, np.ndarray]] = []
    for minutes in sorted({*budgets, *curve_marks, *snap_marks}):
        system.train_until(60.0 * minutes)
        model = system.snapshot()
        if minutes in snap_marks:
            snaps = [*snaps[1 - n_avg :], model.state_dict()]
        if minutes not in curve_marks and minutes not in budgets:
            continue
        valid = evaluator.score(model, test=False)
        curve.append({"minutes": float(minutes), "steps": system.steps,
                      "valid_bleu": valid["bleu"]})  # fmt: skip
        line = (f"{system.name}: {minutes:g} min, {system.steps} updates, "
                f"valid BLEU {valid['bleu']:.2f}")
        if minutes in budgets:
            model.save(save_dir / f"{system.name}-{minutes:g}min")  # bench_real_decode.py's
            test = evaluator.score(model, test=True)
            row = {"minutes": float(minutes), "steps": system.steps, **test}
            line += f", test BLEU {test['bleu']:.2f} chrF {test['chrf']:.2f}"
            for n in recipe["average_last"]:
                if n > 1 and len(snaps) >= n:
                    row[f"avg{n}"] = averaged(model, snaps[-n:], evaluator,
                                              save_dir / f"{system.name}-{minutes:g}min-avg{n}")
                    line += f", mean of last {n}: test BLEU {row[f'avg{n}']['bleu']:.2f}"
            table.append(row)
        print(line, flush=True)
        on_mark()


def averaged(model: Transformer, snaps: list, evaluator: Evaluator,
             out: pathlib.Path) -> dict[str, Any]:
    """Test scores of the mean of snaps (evaluated on a copy, so training goes on untouched)."""
    copy = Transformer(model.config)
    copy.load_state_dict(mean_state(snaps))
    copy.save(out)
    valid, test = evaluator.score(copy, test=False), evaluator.score(copy, test=True)
    return {"valid_bleu": valid["bleu"], **test}


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    from pytransformer.plot import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, res in results.items():
        ax.plot([c["minutes"] for c in res["curve"]], [c["valid_bleu"] for c in res["curve"]],
                "o-", label=name)  # fmt: skip
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("validation BLEU (greedy)")
    ax.set_title("Multi30k en-de: validation BLEU against training time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_budgets(ap: argparse.ArgumentParser, name: str, text: str) -> list[float]:
    try:
        budgets = sorted(float(b) for b in text.split(","))
    except ValueError:
        budgets = []
    if not budgets or budgets[0] <= 0:
        ap.error(f"{name}: positive minutes, comma-separated")
    return budgets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir", type=pathlib.Path)
    ap.add_argument("--budgets", default="15,30,60", help="training minutes, comma-separated")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dropout", type=float, default=None,
                    help="overrides the preset's dropout (both systems)")
    ap.add_argument("--average-last", default="1",
                    help="also score each budget with the mean of the last N snapshots "
                         "(several N comma-separated: each is scored)")
    ap.add_argument("--average-every", type=float, default=1.0,
                    help="minutes of training between the snapshots --average-last averages")
    ap.add_argument("--systems", default="ours,torch")
    ap.add_argument("--torch-budgets", default=None,
                    help="the peer's budgets when they differ (default: --budgets)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--curve-every", type=float, default=None,
                    help="minutes between validation points (default: the smallest budget / 3)")
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("bench-multi30k"))
    ap.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    ap.add_argument("--report-only", action="store_true",
                    help="redo the table and picture from WORK/multi30k.json (no training)")
    args = ap.parse_args()
    record_path = args.work / "multi30k.json"
    if args.report_only:
        report(json.loads(record_path.read_text()), args.work, args.write)
        return 0
    budgets = parse_budgets(ap, "--budgets", args.budgets)
    peer_budgets = parse_budgets(ap, "--torch-budgets", args.torch_budgets or args.budgets)
    for name in ("train.en", "train.de", "val.en", "val.de", "test_2016_flickr.en",
                 "test_2016_flickr.de"):  # fmt: skip
        if not (args.data_dir / name).is_file():
            ap.error(f"data_dir: {args.data_dir / name} is missing")
    systems = {"ours": Ours, "torch": Torch}
    chosen = [s.strip() for s in args.systems.split(",")]
    if not set(chosen) <= set(systems):
        ap.error(f"--systems: choose from {sorted(systems)}")
    pt.set_num_threads(args.threads)
    reuse_freed_memory()  # process-wide: both systems train with the same allocator settings
    if "torch" in chosen:
        import torch

        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.data_dir, args.work, args.vocab_size)
    evaluator = Evaluator(data, args.data_dir)
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        ap.error("--dropout: expected 0 <= P < 1")
    try:
        average_last = sorted({int(n) for n in args.average_last.split(",")})
    except ValueError:
        average_last = [0]
    if average_last[0] < 1 or args.average_every <= 0:
        ap.error("--average-last: expected N >= 1 (comma-separated) and --average-every > 0")
    recipe = {"preset": args.preset, "dropout": args.dropout, "average_last": average_last,
              "average_every": args.average_every,
              "curve_every": args.curve_every or budgets[0] / 3}  # fmt: skip
    record = {**recipe, "threads": args.threads, "vocab_size": args.vocab_size,
              "command": command_line("bench_multi30k.py", ["DATA_DIR", *sys.argv[2:]]),
              "results": {}}  # fmt: skip
    for key in chosen:
        cls = systems[key]
        own = peer_budgets if key == "torch" else budgets
        result = record["results"].setdefault(cls.name, {})
        run_system(cls, data, evaluator, recipe, own, args.work / "models", result,
                   lambda: atomic_write_text(record_path, json.dumps(record, indent=1)))
    report(record, args.work, args.write)
    return 0


def cell(row: dict[str, Any], key: Any, fmt: str) -> str:
    """row[key], or row[key[0]][key[1]] for an averaged score; "-" where it was not measured."""
    value = row.get(key) if isinstance(key, str) else row.get(key[0], {}).get(key[1])
    return "-" if value is None else fmt.format(value)


def report(record: dict[str, Any], work: pathlib.Path, write: bool) -> None:
    """The table (BLEU at equal training time, one row per budget) and the picture."""
    results = record["results"]
    plot(results, work / "multi30k_bleu.png")
    at = {name: {b["minutes"]: b for b in res["budgets"]} for name, res in results.items()}
    base = [("steps", "updates", "{}"), ("bleu", "BLEU", "{:.1f}"), ("chrf", "chrF", "{:.1f}")]
    cols = {name: list(base) for name in results}
    for name, table in at.items():
        for key in sorted({k for b in table.values() for k in b if k.startswith("avg")},
                          key=lambda k: int(k[3:])):
            n = key[3:]
            cols[name] += [((key, "bleu"), f"BLEU, mean of last {n}", "{:.1f}"),
                           ((key, "chrf"), f"chrF, mean of last {n}", "{:.1f}")]  # fmt: skip
    rows = []
    for minutes in sorted({m for table in at.values() for m in table}):
        row = [f"{minutes:g}"]
        for name in results:
            b = at[name].get(minutes, {})
            row += [cell(b, key, fmt) for key, _, fmt in cols[name]]
        rows.append(row)
    header = ["training minutes"] + [f"{name} {label}" for name in results
                                      for _, label, _ in cols[name]]  # fmt: skip
    table = markdown_table(header, rows)
    print(table)
    if write:
        dropout = "" if record.get("dropout") is None else f", dropout {record['dropout']}"
        update_results("multi30k", f"Command: `{record['command']}` (preset {record['preset']}"
                                   f"{dropout}, "
                                   f"{record['threads']} threads; BLEU and chrF on "
                                   f"test_2016_flickr, beam 4, sacrebleu)\n\n{table}")
    print(f"wrote {work / 'multi30k.json'} and {work / 'multi30k_bleu.png'}")


if __name__ == "__main__":
    sys.exit(main())
