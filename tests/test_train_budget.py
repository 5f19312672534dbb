"""Budgets and selection in the training loop: max_time / max_epochs / early stopping, the best
model by a validation metric, checkpoint averaging, presets, and resume after a kill with the
shard data source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from model_cases import small_config

from pytransformer import io as ptio
from pytransformer.cli import UserError, main, parse_duration
from pytransformer.models import Transformer
from pytransformer.train.average import average_checkpoints, last_checkpoints
from pytransformer.train.data import TokenBatcher, make_batch, synthetic_pairs
from pytransformer.train.optim import Adam
from pytransformer.train.presets import PRESETS, get_preset, parameter_count
from pytransformer.train.schedule import Noam
from pytransformer.train.shards import ShardBatcher, ShardWriter, open_data, write_manifest
from pytransformer.train.trainer import Trainer

PAD, BOS, EOS = 0, 1, 2
IDS = dict(pad_id=PAD, bos_id=BOS, eos_id=EOS)


@pytest.fixture(autouse=True)
def one_thread(threads):
    threads(1)


def pairs(n=90):
    return synthetic_pairs("reverse", n, 12, 2, 7, seed=5)


def trainer_on(data, tmp=None, *, model_seed=0, **kw):
    model = Transformer(small_config(12, 16, 1, dropout=0.1, max_len=64), seed=model_seed)
    opt = Adam(model.parameters(), lr=Noam(16, warmup=4, factor=0.5), max_grad_norm=1.0)
    return Trainer(model, opt, data, seed=0, progress=False, checkpoint_dir=tmp, **kw)


def valid_batches():
    return [make_batch(pairs(20), **IDS)]


class FakeClock:
    """A clock that advances ``tick`` seconds each time an update starts (patched train_step)."""

    def __init__(self, trainer, tick):
        self.now, self.tick = 0.0, tick
        step = trainer.train_step

        def timed_step():
            self.now += self.tick
            return step()

        trainer.train_step = timed_step

    def __call__(self):
        return self.now


def test_max_time_stops_within_one_update_of_the_budget(tmp_path):
    trainer = trainer_on(TokenBatcher(pairs(), 96, **IDS), tmp_path)
    trainer.clock = FakeClock(trainer, 1.0)
    out = trainer.fit(max_time=5.5)
    # updates start at t = 0, 1, ..., 5 (each below the budget) and the 6th ends at 6 >= 5.5
    assert out["stop"] == "max_time" and out["step"] == 6
    assert 5.5 <= out["elapsed_s"] < 5.5 + 1.0
    # the budget counts over a resume: the saved state has spent it already
    again = trainer_on(TokenBatcher(pairs(), 96, **IDS), tmp_path)
    again.load_checkpoint(tmp_path)
    assert again.elapsed == pytest.approx(6.0)
    again.clock = FakeClock(again, 1.0)
    assert again.fit(max_time=8.0)["step"] == 8
    Transformer.load(tmp_path / "step-00000008")


def test_max_time_through_the_cli_leaves_a_loadable_model(tmp_path, capsys):
    src = ["one two three", "two three four", "four five", "five six seven"] * 10
    (tmp_path / "s").write_text("\n".join(src) + "\n")
    (tmp_path / "t").write_text("\n".join(s[::-1] for s in src) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--src", str(tmp_path / "s"), "--tgt", str(tmp_path / "t"),
                 "--out", str(run), "--preset", "tiny", "--tokenizer", "char",
                 "--max-time", "1.5s", "--threads", "1", "--accum", "2"]) == 0
    log = [json.loads(x) for x in (run / "checkpoints" / "log.jsonl").read_text().splitlines()]
    stop = [r for r in log if "stop" in r]
    assert stop[-1]["stop"] == "max_time" and stop[-1]["elapsed_s"] >= 1.5
    state = json.loads(next((run / "checkpoints").glob("step-*/trainer.json")).read_text())
    assert state["accumulate"] == 2
    model = Transformer.load(run / "model")
    assert model.config.d_model == get_preset("tiny").model["d_model"]
    capsys.readouterr()
    assert main(["translate", "--model", str(run), "--input", str(tmp_path / "s"),
                 "--max-decoding-length", "5", "--beam-size", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(src)


@pytest.mark.parametrize("text,seconds", [
    ("90", 90), ("90s", 90), ("45m", 2700), ("1h30m", 5400), ("1.5h", 5400), ("2m30s", 150),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0", "-5", "1x", "m", "inf", "nan"])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError, match="--max-time"):
        parse_duration(text)


def _options(*flags: str):
    from pytransformer.cli import _train_options, build_parser

    args = build_parser().parse_args(["train", "--src", "s", "--tgt", "t", "--out", "o", *flags])
    return _train_options(args)


def test_dropout_flag_overrides_the_preset_and_keeps_the_config_model(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": {"d_ff": 96}}))
    options = _options("--preset", "tiny", "--dropout", "0.3", "--config", str(tmp_path / "c.json"))
    model, *_ = options.recipe()
    assert model["dropout"] == 0.3 and model["d_ff"] == 96
    assert model["d_model"] == get_preset("tiny").model["d_model"]
    model, *_ = _options("--preset", "tiny").recipe()
    assert model["dropout"] == get_preset("tiny").model["dropout"]


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_dropout_flag_rejects_what_is_not_a_probability(value):
    with pytest.raises(UserError, match="--dropout"):
        _options("--dropout", value)


def test_max_epochs_counts_whole_passes():
    data = TokenBatcher(pairs(), 96, **IDS)
    trainer = trainer_on(data)
    out = trainer.fit(max_epochs=2)
    assert out["stop"] == "max_epochs" and out["step"] == 2 * len(data)
    with pytest.raises(ValueError, match="max_steps, max_time or max_epochs"):
        trainer.fit()


def test_best_model_and_early_stopping(tmp_path):
    """A metric that improves, then gets worse: the best model is the one of the best step, and
    training stops after `patience` validations without improvement."""
    scores = iter([10.0, 20.0, 15.0, 12.0, 30.0])
    trainer = trainer_on(TokenBatcher(pairs(), 96, **IDS), tmp_path, valid_data=valid_batches(),
                         valid_every=2, valid_metrics=lambda m: {"valid_bleu": next(scores)},
                         best_metric="valid_bleu", patience=2)
    saved = {}
    evaluate = trainer.evaluate

    def remember():
        saved[trainer.step] = {k: v.copy() for k, v in trainer.model.parameters().items()}
        return evaluate()

    trainer.evaluate = remember
    out = trainer.fit(100)
    assert out["stop"] == "early_stopping" and out["step"] == 8
    assert out["best"] == {"step": 4, "value": 20.0, "metric": "valid_bleu"}
    best = Transformer.load(tmp_path / "best")
    for name, p in best.parameters().items():
        np.testing.assert_array_equal(p, saved[4][name])
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("best")] == [2, 4]
    # the count and the best survive a resume
    again = trainer_on(TokenBatcher(pairs(), 96, **IDS), tmp_path, valid_data=valid_batches(),
                       best_metric="valid_bleu", patience=2)
    again.load_checkpoint(tmp_path)
    assert again.best["step"] == 4 and again.bad_validations == 2
    with pytest.raises(ValueError, match="patience"):
        trainer_on(TokenBatcher(pairs(), 96, **IDS), patience=2)


def test_loss_as_best_metric_is_minimised(tmp_path):
    trainer = trainer_on(TokenBatcher(pairs(), 96, **IDS), tmp_path, valid_data=valid_batches(),
                         valid_every=1, best_metric="valid_loss")
    losses = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: losses.append(evaluate()["valid_loss"]) or trainer.last_valid
    trainer.fit(6)
    assert trainer.best["value"] == min(losses)
    assert trainer.best["step"] == 1 + int(np.argmin(losses))


def test_average_is_the_float64_mean(tmp_path, capsys):
    trainer = trainer_on(TokenBatcher(pairs(), 96, **IDS), tmp_path, checkpoint_every=2,
                         keep_checkpoints=5)
    trainer.fit(8)
    paths = last_checkpoints(tmp_path, 3)
    assert [os.path.basename(p) for p in paths] == [f"step-0000000{s}" for s in (4, 6, 8)]
    tensors = [ptio.load_safetensors(os.path.join(p, "model.safetensors"))[0] for p in paths]
    out = average_checkpoints(paths, tmp_path / "avg")
    avg = Transformer.load(out)
    for name, p in avg.parameters().items():
        want = (sum(t[name].astype(np.float64) for t in tensors) / 3).astype(np.float32)
        np.testing.assert_array_equal(p, want)
    first = next(iter(tensors[-1]))
    assert not np.array_equal(avg.parameters()[first], tensors[-1][first])
    # the CLI writes the same, replacing a model directory
    assert main(["average", *paths, "--out", str(tmp_path / "avg")]) == 0
    again = Transformer.load(tmp_path / "avg")
    for name, p in again.parameters().items():
        np.testing.assert_array_equal(p, avg.parameters()[name])


def test_average_refuses_what_does_not_fit(tmp_path, capsys):
    a = trainer_on(TokenBatcher(pairs(), 96, **IDS), tmp_path / "a")
    a.fit(1)
    other = Transformer(small_config(12, 32, 1, max_len=64), seed=0)
    other.save(tmp_path / "b")
    ckpt = str(tmp_path / "a" / "step-00000001")
    with pytest.raises(ptio.CheckpointError, match="config differs"):
        average_checkpoints([ckpt, tmp_path / "b"], tmp_path / "out")
    with pytest.raises(ptio.CheckpointError, match="missing"):
        average_checkpoints([ckpt, tmp_path], tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert main(["average", ckpt, "--out", str(tmp_path / "busy")]) == 2
    assert "--out" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(TypeError, match="paths"):
        average_checkpoints(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_average_last_through_the_cli(tmp_path):
    src = ["one two three", "two three four", "four five", "five six seven"] * 10
    (tmp_path / "s").write_text("\n".join(src) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--src", str(tmp_path / "s"), "--tgt", str(tmp_path / "s"),
                 "--out", str(run), "--preset", "tiny", "--tokenizer", "char", "--steps", "6",
                 "--checkpoint-every", "2", "--average-last", "3", "--threads", "1"]) == 0
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 3
    tensors = [ptio.load_safetensors(p / "model.safetensors")[0] for p in ckpts]
    final = Transformer.load(run / "model")
    for name, p in final.parameters().items():
        want = (sum(t[name].astype(np.float64) for t in tensors) / 3).astype(np.float32)
        np.testing.assert_array_equal(p, want)


def shard_data(tmp_path):
    d = tmp_path / "data"
    writer = ShardWriter(d, "train", 25)
    ps = pairs()
    d.mkdir()
    writer.add_pairs([s.tolist() for s, _ in ps], [t.tolist() for _, t in ps])
    write_manifest(d, {"train": writer.close()}, {})
    return d


_KILLED_RUN = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{tests!r}]
    import test_train_budget as t
    from pytransformer.train.shards import ShardBatcher, open_data
    import pytransformer
    pytransformer.set_num_threads(1)
    data = open_data({data!r})
    trainer = t.trainer_on(ShardBatcher(data.split("train"), 96, corpus_id=data.id, **t.IDS),
                           {ckpt!r}, checkpoint_every=3)
    step = trainer.train_step
    def dying():
        if trainer.step == 4:
            os._exit(9)  # as a kill: no cleanup, no final checkpoint
        return step()
    trainer.train_step = dying
    trainer.fit(10)
""")


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    d = shard_data(tmp_path)
    data = open_data(d)

    def batcher():
        return ShardBatcher(data.split("train"), 96, corpus_id=data.id, **IDS)

    straight = trainer_on(batcher())
    straight.fit(10)
    ckpt = tmp_path / "ckpt"
    code = _KILLED_RUN.format(tests=os.path.dirname(__file__), data=str(d), ckpt=str(ckpt))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    resumed = trainer_on(batcher(), ckpt)
    assert resumed.load_checkpoint(ckpt).endswith("step-00000003")
    resumed.fit(10)
    for name, p in straight.model.parameters().items():
        assert p.tobytes() == resumed.model.parameters()[name].tobytes(), name


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_preset_parameter_counts(name):
    cfg = dict(get_preset(name).model, max_len=64)
    model = Transformer(_config(500, cfg), seed=0)
    assert parameter_count(name, 500) == model.num_parameters()
    separate = Transformer(_config(500, cfg, tie="decoder"), seed=0)
    assert parameter_count(name, 500, shared_vocab=False) == separate.num_parameters()


def _config(vocab, fields, tie="all"):
    from pytransformer.models import TransformerConfig

    return TransformerConfig(src_vocab_size=vocab, tgt_vocab_size=vocab, tie_embeddings=tie,
                             **fields)


def test_presets_are_documented_and_checked():
    assert set(PRESETS) == {"tiny", "small", "base", "big"}
    with pytest.raises(ValueError, match="preset"):
        get_preset("huge")
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for name in PRESETS:
        assert f"`{name}`" in readme


_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from pytransformer.train.allocator import reuse_freed_memory
    if sys.argv[1] == "1":
        assert reuse_freed_memory()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # a step's activations: fifty 2 MB arrays alive together, then freed
        live = [np.ones(1 << 19, np.float32) for _ in range(50)]
        del live
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
# Under the sanitizers ASan's allocator replaces glibc's: mallopt has nothing to tune there.
@pytest.mark.skipif(os.environ.get("PYTRANSFORMER_SANITIZED") == "1", reason="ASan's allocator")
def test_reusing_freed_memory_saves_the_page_faults():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    faults = [int(subprocess.run([sys.executable, "-P", "-c", _FAULTS, flag], env=env, check=True,
                                 capture_output=True, text=True).stdout)
              for flag in ("0", "1")]  # fmt: skip
    pages = 10 * 50 * (2 << 20) // 4096
    assert faults[0] > 0.8 * pages  # the freed memory goes back to the system each round ...
    assert faults[1] < 0.2 * pages  # ... unless it is kept for reuse (100 MB: past the old 64 MB)


def test_reuse_freed_memory_arguments(monkeypatch):
    from pytransformer.train import allocator

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("PYTRANSFORMER_MALLOC_TUNING", "0")
    assert allocator.reuse_freed_memory() is False
    monkeypatch.delenv("PYTRANSFORMER_MALLOC_TUNING")
    with pytest.raises(TypeError, match="mmap_threshold"):
        allocator.reuse_freed_memory(True)
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.reuse_freed_memory(0)
    with pytest.raises(TypeError, match="trim_threshold"):
        allocator.reuse_freed_memory(trim_threshold=2.0**30)
    with pytest.raises(ValueError, match="trim_threshold"):
        allocator.reuse_freed_memory(32 << 20, trim_threshold=1 << 20)
