"""The program tests/test_mpi.py runs under ``mpiexec``: a tiny Transformer trained data-parallel,
a rank that fails on purpose (``--fail-rank``), or (``cli ...``) the pytransformer command.
``build_trainer`` is also what the test calls in its own process for the one-process reference.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

from pytransformer import Transformer, TransformerConfig
from pytransformer.train import distributed
from pytransformer.train.data import TokenBatcher, synthetic_pairs
from pytransformer.train.optim import Adam
from pytransformer.train.trainer import Trainer

PAD, BOS, EOS, VOCAB = 0, 1, 2, 13


def build_trainer(checkpoint_dir, accumulate, w=None, dropout=0.1, model_seed=3, **kw):
    """The same model, data and optimizer on every rank; under MPI the rank's share."""
    cfg = TransformerConfig(
        src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=16, num_heads=2, d_ff=24,
        num_encoder_layers=2, num_decoder_layers=2, max_len=16, dropout=dropout,
        pad_id=PAD, bos_id=BOS, eos_id=EOS,
    )
    model = Transformer(cfg, seed=model_seed)
    pairs = synthetic_pairs("reverse", 64, VOCAB, 2, 9, seed=5)
    data = TokenBatcher(pairs, 40, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=7)
    opt = Adam(model.parameters(), lr=3e-3, max_grad_norm=0.5)
    valid_pairs = synthetic_pairs("reverse", 12, VOCAB, 2, 9, seed=6)
    valid = TokenBatcher(valid_pairs, 30, pad_id=PAD, bos_id=BOS, eos_id=EOS, shuffle=False)
    reducer = None
    if w is not None and w.size > 1:
        data = distributed.RankShare(data, w.rank, w.size)
        reducer = distributed.MPIReducer(w, bucket_mb=kw.pop("bucket_mb", 25.0))
    return Trainer(
        model, opt, data, valid_data=valid, valid_every=2, seed=11, accumulate=accumulate,
        checkpoint_dir=checkpoint_dir,
        log_every=1, progress=False, reducer=reducer, **kw,
    )


def state_arrays(trainer: Trainer) -> dict[str, np.ndarray]:
    """Parameters and Adam moments, by name."""
    out = {f"p/{k}": v.copy() for k, v in trainer.model.parameters().items()}
    out.update({f"m/{k}": v.copy() for k, v in trainer.optimizer.m.items()})
    out.update({f"v/{k}": v.copy() for k, v in trainer.optimizer.v.items()})
    return out


class _Fail(Trainer):
    """Raises on one rank at one update (the other ranks wait for it in the reduction)."""

    fail_rank = fail_step = -1
    fail_how = "raise"

    def train_step(self):
        if self.reducer.rank == self.fail_rank and self.step + 1 == self.fail_step:
            if self.fail_how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fail_how == "hang":
                time.sleep(600)
            raise RuntimeError(f"injected failure at update {self.fail_step}")
        return super().train_step()


def run_cli(argv: list[str]) -> int:
    """``pytransformer`` itself; with MPI_WORKER_FAIL_RANK=r, rank r's translate raises."""
    fail = int(os.environ.get("MPI_WORKER_FAIL_RANK", "-1"))
    if distributed.world().rank == fail:
        from pytransformer.translator import Translator

        def broken(self, *args, **kwargs):
            raise RuntimeError("injected translate failure")

        Translator.translate = broken
    from pytransformer.cli import main as cli_main

    return cli_main(argv)


def main() -> int:
    if sys.argv[1:2] == ["cli"]:
        return run_cli(sys.argv[2:])
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail-step", type=int, default=-1)
    p.add_argument("--fail-how", choices=["raise", "kill", "hang"], default="raise")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--seed-per-rank", action="store_true", help="a different model on each rank")
    args = p.parse_args()
    w = distributed.world()
    with distributed.guard(w):
        tr = build_trainer(
            os.path.join(args.out, "ckpt"), args.accumulate, w,
            checkpoint_every=args.checkpoint_every, bucket_mb=args.bucket_mb,
            model_seed=3 + w.rank * args.seed_per_rank,
        )
        if args.fail_rank >= 0:
            tr.__class__ = _Fail
            _Fail.fail_rank, _Fail.fail_step = args.fail_rank, args.fail_step
            _Fail.fail_how = args.fail_how
        if args.resume:
            tr.load_checkpoint(os.path.join(args.out, "ckpt"))
        tr.fit(args.steps)
        if w.is_root:
            np.savez(os.path.join(args.out, "state.npz"), **state_arrays(tr))
            r = tr.reducer
            print(f"buckets {len(getattr(r, 'buckets', []))} "
                  f"hooked {getattr(r, 'hooked_modules', 0)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
