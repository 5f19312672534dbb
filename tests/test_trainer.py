"""The training loop: learning, determinism across threads, bit-identical resume, checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from model_cases import small_config

from pytransformer import io as ptio
from pytransformer.models import Transformer, TransformerLM
from pytransformer.train.data import TokenBatcher, make_batch, make_lm_batch, synthetic_pairs
from pytransformer.train.optim import Adam
from pytransformer.train.schedule import Cosine, Noam
from pytransformer.train.trainer import Trainer, latest_checkpoint

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(autouse=True)
def one_thread(threads):
    """The models here are tiny: a second thread only adds synchronisation (and on a loaded
    machine, long waits). Tests about thread counts set their own."""
    threads(1)


def tiny_config(vocab=12, d=16, layers=1, dropout=0.1, **kw):
    return small_config(vocab, d, layers, dropout=dropout, max_len=64, **kw)


def train_pairs(n=120):
    return synthetic_pairs("reverse", n, 12, 2, 7, seed=5)


def make_trainer(
    tmp=None,
    *,
    model_seed=0,
    data_seed=0,
    seed=0,
    accumulate=1,
    dropout=0.1,
    n=120,
    max_tokens=96,
    **kw,
):
    model = Transformer(tiny_config(dropout=dropout), seed=model_seed)
    data = TokenBatcher(
        train_pairs(n),
        max_tokens,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        seed=data_seed,
    )
    opt = Adam(model.parameters(), lr=Noam(16, warmup=4, factor=0.5), max_grad_norm=1.0)
    trainer = Trainer(
        model, opt, data, seed=seed, accumulate=accumulate, progress=False, checkpoint_dir=tmp, **kw
    )
    return trainer


def params_of(trainer):
    return {k: v.copy() for k, v in trainer.model.parameters().items()}


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def token_accuracy(model, pairs) -> float:
    """Teacher-forced argmax accuracy over the non-pad target tokens (EOS included)."""
    model.eval()
    correct = total = 0
    for i in range(0, len(pairs), 64):
        b = make_batch(pairs[i : i + 64], PAD, BOS, EOS)
        pred = model.forward(b.src, b.src_lengths, b.tgt_in).argmax(-1)
        mask = b.tgt_out != PAD
        correct += int((pred == b.tgt_out)[mask].sum())
        total += int(mask.sum())
    model.train()
    return correct / total


# ---------------------------------------------------------------------------------------------
# determinism and resume


def test_loss_decreases():
    tr = make_trainer(dropout=0.0)
    first = tr.train_step()["loss"]
    losses = [tr.train_step()["loss"] for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.8 * first


@pytest.mark.parametrize("accumulate", [1, 2])
def test_same_seed_same_weights_at_1_and_2_threads(threads, accumulate):
    runs = {}
    for n_threads, seed in ((1, 0), (2, 0), (2, 1)):
        threads(n_threads)
        tr = make_trainer(seed=seed, accumulate=accumulate)
        tr.fit(4)
        runs[n_threads, seed] = params_of(tr)
    assert_bit_identical(runs[1, 0], runs[2, 0])
    # the comparison can fail: another dropout seed gives other weights
    assert any(not np.array_equal(runs[2, 0][k], runs[2, 1][k]) for k in runs[2, 0])


def test_resume_is_bit_identical(tmp_path):
    """An uninterrupted run vs one that "crashes" after update 5 and resumes from the checkpoint
    of update 3 in fresh objects built with other seeds (all state must come from the file)."""
    ref = make_trainer(tmp_path / "ref", accumulate=2, checkpoint_every=3, log_every=1)
    ref.fit(8)
    assert ref.train_data.epoch >= 1  # the resumed part crosses an epoch boundary
    crashed = make_trainer(tmp_path / "run", accumulate=2, checkpoint_every=3, log_every=1)
    for _ in range(5):  # no checkpoint after update 3: the process dies here
        crashed._account(crashed.train_step(), None)
        if crashed.step % 3 == 0:
            crashed.save_checkpoint()
    fresh = make_trainer(
        tmp_path / "run", model_seed=9, data_seed=9, accumulate=2, checkpoint_every=3, log_every=1
    )
    used = fresh.load_checkpoint(tmp_path / "run")
    assert used.endswith("step-00000003") and fresh.step == 3
    fresh.fit(8)
    assert_bit_identical(params_of(ref), params_of(fresh))
    assert_bit_identical(ref.optimizer.m, fresh.optimizer.m)
    assert_bit_identical(ref.optimizer.v, fresh.optimizer.v)
    assert ref.optimizer.step_count == fresh.optimizer.step_count == 8
    assert ref.train_data.state_dict() == fresh.train_data.state_dict()
    assert ref.tokens_seen == fresh.tokens_seen

    def train_records(path):
        rows = [json.loads(line) for line in open(path)]
        return [(r["step"], r["train_loss"], r["lr"]) for r in rows if "train_loss" in r]

    # the log of the resumed run lost the crashed run's updates 4-5 and has each update once
    assert train_records(tmp_path / "ref" / "log.jsonl") == train_records(
        tmp_path / "run" / "log.jsonl"
    )


def test_checkpoint_contents_and_pruning(tmp_path):
    tr = make_trainer(tmp_path, checkpoint_every=2, keep_checkpoints=2, log_every=2)
    tr.fit(7)
    names = sorted(os.listdir(tmp_path))
    assert names == ["log.jsonl", "step-00000006", "step-00000007"]  # pruned, no temp dirs left
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt == str(tmp_path / "step-00000007")
    assert sorted(os.listdir(ckpt)) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer.json",
    ]
    loaded = Transformer.load(ckpt)
    assert_bit_identical(loaded.parameters(), tr.model.parameters())
    opt, meta = ptio.load_safetensors(
        os.path.join(ckpt, "optimizer.safetensors"), require_checksum=True
    )
    assert meta["step"] == "7"
    assert set(opt) == {f"{w}/{k}" for w in "mv" for k in tr.model.parameters()}
    assert_bit_identical({k[2:]: v for k, v in opt.items() if k[0] == "m"}, tr.optimizer.m)
    state = json.loads(open(os.path.join(ckpt, "trainer.json")).read())
    assert state["step"] == 7 and state["tokens_seen"] == tr.tokens_seen
    assert state["data"] == tr.train_data.state_dict()
    assert state["schedule"] == {"name": "noam", "d_model": 16, "warmup": 4, "factor": 0.5}


def test_saves_remove_what_killed_saves_left_behind(tmp_path):
    """A save or a pruning killed part-way leaves a hidden .step-* directory named after its
    process; the next save removes those of processes that are gone, and only those."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    names = [f".step-00000001.tmp-{dead_pid}", f".step-00000002.del-{dead_pid}",
             f".step-00000003.tmp-{live_pid}"]  # fmt: skip
    for name in names:
        os.makedirs(tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    tr = make_trainer(tmp_path, checkpoint_every=1, keep_checkpoints=1)
    tr.fit(3)
    assert sorted(os.listdir(tmp_path)) == [names[2], "log.jsonl", "step-00000003"]


def test_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, checkpoint_every=2)
    tr.fit(2)
    os.makedirs(tmp_path / ".step-00000009.tmp-1")  # debris of a process killed mid-checkpoint
    real = ptio.save_safetensors

    def failing(path, tensors, metadata=None):
        if str(path).endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ptio, "save_safetensors", failing)
    tr.train_step()
    tr.train_step()
    with pytest.raises(OSError, match="No space"):
        tr.save_checkpoint()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step-00000002")
    assert not any(n.startswith(".step-00000004") for n in os.listdir(tmp_path))
    fresh = make_trainer(tmp_path)
    assert fresh.load_checkpoint(tmp_path).endswith("step-00000002") and fresh.step == 2


def test_bad_checkpoints_are_rejected(tmp_path):
    tr = make_trainer(tmp_path / "a")
    tr.fit(2)
    ckpt = latest_checkpoint(tmp_path / "a")
    with pytest.raises(ptio.CheckpointError, match="seed"):
        make_trainer(seed=3).load_checkpoint(ckpt)
    with pytest.raises(ptio.CheckpointError, match="no checkpoint"):
        make_trainer().load_checkpoint(tmp_path / "nothing")
    other = Transformer(tiny_config(d=32), seed=0)
    opt = Adam(other.parameters())
    with pytest.raises(ptio.CheckpointError, match="d_model"):
        Trainer(other, opt, make_trainer().train_data, progress=False).load_checkpoint(ckpt)
    with pytest.raises(ptio.CheckpointError, match="different data"):
        make_trainer(n=100).load_checkpoint(ckpt)
    raw = bytearray(open(os.path.join(ckpt, "optimizer.safetensors"), "rb").read())
    raw[-1] ^= 1
    open(os.path.join(ckpt, "optimizer.safetensors"), "wb").write(raw)
    fresh = make_trainer()
    before = params_of(fresh)
    with pytest.raises(ptio.CheckpointError, match="checksum"):
        fresh.load_checkpoint(ckpt)
    assert_bit_identical(before, params_of(fresh))  # nothing was half-loaded
    assert fresh.step == 0


def test_gradient_accumulation_matches_one_big_batch():
    """accumulate=3 must give the gradient of the mean loss over all tokens of the 3 batches."""
    captured = []

    class Capture(Adam):
        def step(self, grads):
            captured.append({k: g.copy() for k, g in grads.items()})
            return super().step(grads)

    tr = make_trainer(dropout=0.0, accumulate=3, max_tokens=40)
    tr.optimizer = Capture(tr.model.parameters(), lr=1e-3)
    twin = make_trainer(dropout=0.0, max_tokens=40).train_data  # same seed: the same batches
    batches = [twin.next_batch() for _ in range(3)]
    assert len({b.n_tokens for b in batches}) > 1  # unequal batches: the weighting matters
    pairs = [train_pairs()[i] for b in batches for i in b.indices]
    model = Transformer(tiny_config(dropout=0.0), seed=0)  # the trainer's initial weights
    tr.train_step()
    model.zero_grad()
    model.loss_and_grad(make_batch(pairs, PAD, BOS, EOS), label_smoothing=0.1)
    for k, g in model.gradients().items():
        np.testing.assert_allclose(captured[0][k], g, rtol=1e-4, atol=1e-6, err_msg=k)


def test_log_and_validation(tmp_path, capsys, monkeypatch):
    valid_pairs = synthetic_pairs("reverse", 20, 12, 2, 7, seed=6)
    valid = TokenBatcher(
        valid_pairs,
        200,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        shuffle=False,
    )
    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: plain lines on stderr
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    tr = make_trainer(log_path=tmp_path / "log.jsonl", valid_data=valid, valid_every=3, log_every=2)
    tr.progress = True
    out = tr.fit(6)
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in rows if "train_loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "valid_loss" in r] == [3, 6]
    for r in rows:
        if "train_loss" in r:
            assert r["tokens_per_s"] > 0 and r["lr"] == Noam(16, 4, 0.5)(r["step"])
        elif "valid_loss" in r:
            assert r["valid_ppl"] == pytest.approx(np.exp(r["valid_loss"]))
    assert rows[-1] == {"step": 6, "stop": "max_steps", "elapsed_s": out["elapsed_s"]}
    assert out["valid_loss"] == rows[-2]["valid_loss"]
    # the validation loss is the token-weighted mean of evaluate_loss over the batches
    tr2 = make_trainer(valid_data=valid)
    res = tr2.evaluate()
    total = [tr2.model.evaluate_loss(b) for b in valid]
    assert res["valid_loss"] == pytest.approx(sum(s for s, _ in total) / sum(n for _, n in total))
    assert (
        res["valid_tokens"] == sum(n for _, n in total) == 20 + sum(len(t) for _, t in valid_pairs)
    )
    err = capsys.readouterr().err
    assert "step 2  loss" in err and "step 6  loss" in err


def test_trainer_validation(tmp_path):
    tr = make_trainer()
    with pytest.raises(TypeError, match="optimizer"):
        Trainer(tr.model, object(), tr.train_data)
    with pytest.raises(ValueError, match="copies"):
        Trainer(tr.model, Adam(tr.model.state_dict()), tr.train_data)
    other_pad = TokenBatcher(train_pairs(), 96, pad_id=3, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="pad_id"):
        Trainer(tr.model, tr.optimizer, other_pad)
    with pytest.raises(TypeError, match="train_data"):
        Trainer(tr.model, tr.optimizer, [1, 2])
    with pytest.raises(ValueError, match="accumulate"):
        Trainer(tr.model, tr.optimizer, tr.train_data, accumulate=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        Trainer(tr.model, tr.optimizer, tr.train_data, label_smoothing=1.0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        tr.save_checkpoint()
    with pytest.raises(ValueError, match="valid_data"):
        tr.evaluate()
    with pytest.raises(ValueError, match="valid_data"):
        Trainer(tr.model, tr.optimizer, tr.train_data, valid_data=[])


# ---------------------------------------------------------------------------------------------
# learning


@pytest.mark.parametrize("task, steps", [("copy", 300), ("reverse", 600)])
def test_learns_copy_and_reverse(task, steps):
    """Teacher-forced argmax accuracy >= 99% on held-out pairs after a few seconds of training."""
    cfg = small_config(14, 32, dropout=0.0, max_len=32, tie_embeddings="all")
    model = Transformer(cfg, seed=0)
    data = TokenBatcher(
        synthetic_pairs(task, 3000, 14, 2, 8, seed=1), 1024, pad_id=PAD, bos_id=BOS, eos_id=EOS
    )
    opt = Adam(model.parameters(), lr=Cosine(1e-2, steps, warmup=30), max_grad_norm=1.0)
    Trainer(model, opt, data, label_smoothing=0.0, progress=False).fit(steps)
    held_out = synthetic_pairs(task, 300, 14, 2, 8, seed=2)
    assert token_accuracy(model, held_out) >= 0.99


def test_language_model_overfits_a_small_text():
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife."
    )
    k = 7  # every 7 characters of this text are followed by one and the same character
    grams = {}
    for i in range(len(text) - k):
        grams.setdefault(text[i : i + k], set()).add(text[i + k])
    assert all(len(nxt) == 1 for nxt in grams.values())
    chars = sorted(set(text))
    ids = np.array([chars.index(c) + 3 for c in text], np.int64)
    seqs = [ids[i : i + 32] for i in range(0, len(ids) - 31, 4)]
    V = len(chars) + 3
    cfg = small_config(V, 32, num_encoder_layers=0, num_decoder_layers=2, dropout=0.0, max_len=64)
    model = TransformerLM(cfg, seed=0)
    data = TokenBatcher(seqs, 4096, pad_id=PAD, bos_id=BOS, eos_id=EOS, lm=True)
    opt = Adam(model.parameters(), lr=Cosine(1e-2, 200, warmup=20))
    tr = Trainer(model, opt, data, label_smoothing=0.0, progress=False, valid_data=list(data))
    first = tr.evaluate()["valid_loss"]
    out = tr.fit(200)
    assert out["valid_loss"] < 0.1 * first
    # after k characters of context the next one is determined: the model must have memorised it
    model.eval()
    batch = make_lm_batch(seqs, PAD, BOS, EOS)
    pred = model.forward(batch.tgt_in).argmax(-1)
    mask = batch.tgt_out != PAD
    mask[:, :k] = False
    assert (pred == batch.tgt_out)[mask].mean() >= 0.99
