"""Soak: training killed with SIGKILL at random moments, each time resumed from its checkpoints.

A child process trains a small Transformer (dropout on, two micro-batches per update, a
checkpoint every other update) with the Trainer, resuming from the newest checkpoint when there
is one. The parent kills it with SIGKILL `--kills` times at moments drawn from a fixed seed,
then lets a last child finish. After every kill it audits the checkpoint directory: each
complete ``step-*`` directory must load with valid checksums and name its own step, and the
newest must never be older than before (no checkpoint lost). At the end the final model,
optimizer moments, data order and training log must equal an uninterrupted run's, bit for bit.

Prints one JSON report; exits 1 (with the reason) when a check fails.
Usage: PYTHONPATH=$PWD python tools/soak_kill_resume.py [--kills 20] [--steps 400] [--seed 0]
tests/test_soak.py runs a short form (3 kills).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

import pytransformer
from pytransformer import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pytransformer.__file__)))
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class SoakFailure(AssertionError):
    pass


# ------------------------------------------------------------------------------------ the child


def build_trainer(checkpoint_dir: str):
    """The same trainer in every life: everything it does follows from these seeds."""
    from pytransformer import Transformer, TransformerConfig
    from pytransformer.train import Adam, Noam, TokenBatcher, Trainer, synthetic_pairs

    config = TransformerConfig(src_vocab_size=24, tgt_vocab_size=24, d_model=32, num_heads=4,
                               d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                               dropout=0.1, max_len=32)  # fmt: skip
    model = Transformer(config, seed=0)
    pairs = synthetic_pairs("reverse", 400, 24, 2, 10, seed=1)
    data = TokenBatcher(pairs, 192, pad_id=0, bos_id=1, eos_id=2, seed=2)
    optimizer = Adam(model.parameters(), lr=Noam(32, warmup=20), max_grad_norm=1.0)
    return Trainer(model, optimizer, data, seed=3, accumulate=2, checkpoint_dir=checkpoint_dir,
                   checkpoint_every=2, keep_checkpoints=3, log_every=1, progress=False)  # fmt: skip


def child(checkpoint_dir: str, steps: int) -> None:
    from pytransformer.train import latest_checkpoint

    pytransformer.set_num_threads(1)
    print("ready", flush=True)  # imports done: a kill from here on lands in real work
    trainer = build_trainer(checkpoint_dir)
    if latest_checkpoint(checkpoint_dir) is not None:
        trainer.load_checkpoint(checkpoint_dir)
    trainer.fit(steps)
    print("done", flush=True)


# ----------------------------------------------------------------------------------- the parent


def _spawn(checkpoint_dir: str, steps: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-P", os.path.abspath(__file__), "--child", checkpoint_dir, str(steps)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> None:
    """Waits for a child that should end by itself; SoakFailure when it did not train to the end."""
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or "done" not in out:
        raise SoakFailure(f"child exited with {proc.returncode}: {err[-2000:]}")


def life(checkpoint_dir: str, steps: int, kill_after: float | None) -> tuple[bool, float]:
    """One child: killed `kill_after` seconds after it is ready, or left to finish (None).
    Returns (killed, seconds from ready to the kill or the end)."""
    proc = _spawn(checkpoint_dir, steps)
    try:
        if proc.stdout.readline().strip() != "ready":
            _finish(proc)
        t0 = time.perf_counter()
        if kill_after is None:
            _finish(proc)
            return False, time.perf_counter() - t0
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return True, time.perf_counter() - t0
        _finish(proc)  # it ended before the kill
        return False, time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def audit(checkpoint_dir: str, newest_before: int) -> tuple[int, int]:
    """Checks every complete checkpoint; returns (newest step, leftover temporary entries)."""
    steps, leftovers = [], 0
    for name in sorted(os.listdir(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else []:
        m = _STEP_DIR.match(name)
        if not m:
            leftovers += name.startswith(".step-")
            continue
        path = os.path.join(checkpoint_dir, name)
        try:
            io.load_safetensors(os.path.join(path, "model.safetensors"), require_checksum=True)
            io.load_safetensors(os.path.join(path, "optimizer.safetensors"), require_checksum=True)
            with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError) as exc:
            raise SoakFailure(f"{path}: a complete-looking checkpoint fails: {exc}") from exc
        if state["step"] != int(m.group(1)):
            raise SoakFailure(f"{path}: trainer.json says step {state['step']}")
        steps.append(state["step"])
    newest = max(steps, default=0)
    if newest < newest_before:
        raise SoakFailure(f"checkpoint lost: the newest was step {newest_before}, now {newest}")
    return newest, leftovers


def _final_state(checkpoint_dir: str, steps: int) -> dict:
    path = os.path.join(checkpoint_dir, f"step-{steps:08d}")
    model, _ = io.load_safetensors(os.path.join(path, "model.safetensors"), require_checksum=True)
    opt, meta = io.load_safetensors(os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
        trainer = json.load(f)
    with open(os.path.join(checkpoint_dir, "log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    train_log = [(r["step"], r["train_loss"], r["lr"]) for r in log if "train_loss" in r]
    return {"model": model, "optimizer": opt, "meta": meta, "trainer": trainer, "log": train_log}


def compare(got: dict, want: dict) -> None:
    for part in ("model", "optimizer"):
        if got[part].keys() != want[part].keys():
            raise SoakFailure(f"{part}: other tensor names")
        for name, value in want[part].items():
            if got[part][name].tobytes() != value.tobytes():
                raise SoakFailure(f"{part}: {name} differs from the uninterrupted run")
    for part in ("meta", "log"):
        if got[part] != want[part]:
            raise SoakFailure(f"{part}: differs from the uninterrupted run")
    for key in ("step", "tokens_seen", "data"):
        if got["trainer"][key] != want["trainer"][key]:
            raise SoakFailure(f"trainer.json {key}: differs from the uninterrupted run")


def soak(kills: int, steps: int, seed: int, workdir: str) -> dict:
    """The whole soak in `workdir`; returns the report, raises SoakFailure on a failed check."""
    reference = os.path.join(workdir, "reference")
    _, ref_seconds = life(reference, steps, None)
    run = os.path.join(workdir, "run")
    rng = np.random.default_rng(seed)
    # Kill moments spread so the 20 lives cover about half the run: every life gets some way
    # (into steps, saves and loads alike) and a last life is left to finish it.
    delays = rng.uniform(0.05, 1.0, kills) * ref_seconds / kills
    newest, killed_at, finished_early = 0, [], False
    for delay in delays:
        killed, _ = life(run, steps, float(delay))
        newest, _ = audit(run, newest)
        if not killed:  # the machine was faster than the uninterrupted run suggested
            finished_early = True
            break
        killed_at.append(newest)
    _, last_seconds = life(run, steps, None)
    newest, leftovers = audit(run, newest)
    compare(_final_state(run, steps), _final_state(reference, steps))
    return {
        "kills": len(killed_at),
        "finished_before_the_last_kill": finished_early,
        "steps": steps,
        "newest_checkpoint_after_each_kill": killed_at,
        "kill_delays_s": [round(float(d), 3) for d in delays[: len(killed_at)]],
        "uninterrupted_run_s": round(ref_seconds, 2),
        "last_life_s": round(last_seconds, 2),
        "leftover_temporary_dirs": leftovers,
        "identical": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400, help="updates (even)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    workdir = tempfile.mkdtemp(prefix="pytransformer-soak-")
    t0 = time.perf_counter()
    try:
        report = soak(args.kills, args.steps, args.seed, workdir)
    except SoakFailure as exc:
        print(f"soak_kill_resume: FAILED: {exc} (files kept in {workdir})", file=sys.stderr)
        return 1
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
