"""The command line: a tiny end-to-end run and the errors a user can cause."""

import json
import subprocess
import sys

import pytest

from pytransformer.cli import main
from pytransformer.train.trainer import Trainer, latest_checkpoint

SRC = ["one two", "two three", "three four", "four five", "five six", "six seven"] * 4
TGT = ["eins zwei", "zwei drei", "drei vier", "vier fünf", "fünf sechs", "sechs sieben"] * 4
TINY = {
    "model": {"d_model": 32, "num_heads": 2, "d_ff": 64, "num_encoder_layers": 1,
              "num_decoder_layers": 1, "dropout": 0.0},
    "tokenizer": "char", "steps": 6, "max_tokens": 256, "warmup": 5, "checkpoint_every": 3,
    "valid_every": 3,
}


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "src.txt").write_text("\n".join(SRC) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(TGT) + "\n")
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return tmp_path


def train_args(d, *extra):
    return ["train", "--src", str(d / "src.txt"), "--tgt", str(d / "tgt.txt"),
            "--valid-src", str(d / "src.txt"), "--valid-tgt", str(d / "tgt.txt"),
            "--config", str(d / "config.json"), "--out", str(d / "run"), *extra]


@pytest.fixture
def trained(corpus):
    assert main(train_args(corpus)) == 0
    return corpus


def test_train_translate_evaluate(trained, capsys):
    d = trained
    assert (d / "run" / "model" / "config.json").exists()
    assert latest_checkpoint(d / "run" / "checkpoints").endswith("step-00000006")
    capsys.readouterr()
    assert main(["translate", "--model", str(d / "run"), "--input", str(d / "src.txt"),
                 "--output", str(d / "hyp.txt"), "--beam-size", "2",
                 "--max-decoding-length", "20"]) == 0
    hyps = (d / "hyp.txt").read_text().splitlines()
    assert len(hyps) == len(SRC)
    assert main(["evaluate", "--hyp", str(d / "hyp.txt"), "--ref", str(d / "tgt.txt")]) == 0
    scores = json.loads(capsys.readouterr().out)
    expected = 100.0 * sum(h == r for h, r in zip(hyps, TGT, strict=True)) / len(TGT)
    assert scores["exact_match"] == pytest.approx(expected)


def test_n_best_lines(trained, capsys):
    d = trained
    (d / "two.txt").write_text("one two\nsix seven\n")
    assert main(["translate", "--model", str(d / "run"), "--input", str(d / "two.txt"),
                 "--n-best", "3", "--beam-size", "3", "--max-decoding-length", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["0"] * 3 + ["1"] * 3


def test_translate_in_blocks_with_progress(trained, capsys, monkeypatch):
    """Long inputs go block by block (progress on stderr); the output is the same as one block,
    n-best indices count across blocks, and an interrupted run leaves an existing file alone."""
    import pytransformer.cli as cli
    from pytransformer.translator import Translator

    d = trained
    (d / "many.txt").write_text("".join(f"{s}\n" for s in SRC * 3))
    n = 3 * len(SRC)
    args = ["translate", "--model", str(d / "run"), "--input", str(d / "many.txt"),
            "--beam-size", "2", "--max-decoding-length", "12"]
    assert main(args + ["--output", str(d / "whole.txt")]) == 0
    capsys.readouterr()
    monkeypatch.setattr(cli, "_TRANSLATE_BLOCK", 4)
    assert main(args + ["--output", str(d / "blocks.txt")]) == 0
    err = capsys.readouterr().err
    assert (d / "blocks.txt").read_text() == (d / "whole.txt").read_text()
    assert f"translated {n}/{n} lines" in err and "translated 4/" in err
    assert main(args + ["--n-best", "2"]) == 0
    firsts = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert firsts == [str(i) for i in range(n) for _ in range(2)]

    real = Translator.translate
    calls = []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Translator, "translate", interrupted)
    before = (d / "whole.txt").read_text()
    assert main(args + ["--output", str(d / "whole.txt")]) == 130
    assert (d / "whole.txt").read_text() == before
    assert not [p for p in d.iterdir() if p.name.startswith(".whole.txt")]


def test_resume_continues_to_more_steps(trained):
    d = trained
    config = dict(TINY, steps=9)
    (d / "config.json").write_text(json.dumps(config))
    assert main(train_args(d, "--resume")) == 0
    assert latest_checkpoint(d / "run" / "checkpoints").endswith("step-00000009")


def test_plot_curve(trained, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curve.png"
    assert main(["plot", "curve", str(trained / "run"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra", [[], ["--layer", "0", "--head", "1"]])
def test_plot_attention(trained, tmp_path, extra):
    pytest.importorskip("matplotlib")
    out = tmp_path / "attention.png"
    args = ["plot", "attention", str(trained / "run"), "--sentence", "one two", "-o", str(out)]
    assert main(args + extra) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_attention_bad_head(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    args = ["plot", "attention", str(trained / "run"), "--sentence", "one", "--head", "99",
            "-o", str(tmp_path / "a.png")]
    assert main(args) != 0
    assert "head" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint(corpus, monkeypatch, capsys):
    real_step = Trainer.train_step

    def interrupted(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert main(train_args(corpus)) == 130
    assert latest_checkpoint(corpus / "run" / "checkpoints").endswith("step-00000002")
    assert "checkpoint saved" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["translate", "--model", "/nonexistent/model"], "does not exist"),
        (["evaluate", "--hyp", "/nonexistent/h.txt", "--ref", "/nonexistent/r.txt"],
         "file not found"),
    ],
)
def test_user_errors_are_one_line(args, message, capsys):
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_output_into_a_missing_directory(trained, capsys):
    args = ["translate", "--model", str(trained / "run"), "--input", str(trained / "src.txt"),
            "--output", str(trained / "nowhere" / "out.txt")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "directory does not exist" in err and len(err.strip().splitlines()) == 1


def test_mismatched_and_empty_training_files(corpus, capsys):
    (corpus / "short.txt").write_text("one\n")
    args = train_args(corpus)
    args[args.index("--tgt") + 1] = str(corpus / "short.txt")
    assert main(args) == 2
    assert "lines" in capsys.readouterr().err
    (corpus / "empty.txt").write_text("")
    args = train_args(corpus)
    args[args.index("--src") + 1] = args[args.index("--tgt") + 1] = str(corpus / "empty.txt")
    assert main(args) != 0
    assert "no sentence pairs" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(trained, capsys):
    weights = trained / "run" / "model" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    args = ["translate", "--model", str(trained / "run"), "--input", str(trained / "src.txt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pytransformer: error:" in err
    assert weights.read_bytes() == bytes(blob)


def test_module_entry_point_exits_nonzero_without_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pytransformer", "translate", "--model", str(tmp_path / "none")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("pytransformer: error:") and "Traceback" not in out.stderr
