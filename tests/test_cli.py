"""The command line: a tiny end-to-end run and the errors a user can cause."""

import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

import pytransformer.cli as cli
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

    from pytransformer.decode import api

    real = api.translate
    calls = []

    def interrupted(model, sources, *a, **kw):  # the second block of sources interrupted
        calls.append(len(sources))
        if sum(1 for c in calls if c) == 2:
            raise KeyboardInterrupt
        return real(model, sources, *a, **kw)

    monkeypatch.setattr(api, "translate", interrupted)
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


def one_line_error(capsys, arg: str) -> str:
    """The single stderr line of a failed command; it names `arg`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pytransformer: error: ") and arg in err, err
    return err


@pytest.mark.parametrize(
    "args, arg",
    [
        (["translate", "--model", "/nonexistent/model"], "--model"),
        (["evaluate", "--hyp", "/nonexistent/h.txt", "--ref", "/nonexistent/r.txt"], "--ref"),
    ],
)
def test_user_errors_are_one_line(args, arg, capsys):
    assert main(args) != 0
    assert "does not exist" in one_line_error(capsys, arg)


def test_output_into_a_missing_directory(trained, capsys):
    args = ["translate", "--model", str(trained / "run"), "--input", str(trained / "src.txt"),
            "--output", str(trained / "nowhere" / "out.txt")]
    assert main(args) != 0
    assert "directory does not exist" in one_line_error(capsys, "--output")


# Every character str.splitlines() breaks a line at besides "\n" and "\r".
SEPARATORS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_line_breaks_other_than_newline_stay_inside_lines(corpus, capsys, monkeypatch):
    """A corpus whose source lines hold each of SEPARATORS (and CRLF endings) stays aligned line
    for line through train, translate (file and stdin) and evaluate."""
    d = corpus
    src = [f"{s}{SEPARATORS[i % len(SEPARATORS)]}x" for i, s in enumerate(SRC)]
    (d / "src.txt").write_bytes("".join(f"{s}\r\n" for s in src).encode())
    assert cli._read_lines(str(d / "src.txt"), "--src") == src
    assert main(train_args(d)) == 0  # would be "src.txt has 48 lines but tgt.txt has 24"
    translate = ["translate", "--model", str(d / "run"), "--beam-size", "1",
                 "--max-decoding-length", "8"]
    assert main(translate + ["--input", str(d / "src.txt"), "--output", str(d / "hyp.txt")]) == 0
    hyps = cli._read_lines(str(d / "hyp.txt"), "--hyp")
    assert len(hyps) == len(src)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((d / "src.txt").read_bytes())))
    assert main(translate) == 0
    assert cli.split_lines(capsys.readouterr().out) == hyps
    # Hypotheses carrying the separators are scored against the references line for line.
    odd = [t + sep for t, sep in zip(TGT, SEPARATORS * 3, strict=True)]
    (d / "odd.txt").write_text("".join(f"{h}\n" for h in odd))
    assert main(["evaluate", "--hyp", str(d / "odd.txt"), "--ref", str(d / "tgt.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == 0.0


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A trained model and, for each kind of bad path, one of that kind."""
    d = tmp_path_factory.mktemp("paths")
    (d / "src.txt").write_text("\n".join(SRC) + "\n")
    (d / "tgt.txt").write_text("\n".join(TGT) + "\n")
    (d / "config.json").write_text(json.dumps(TINY))
    assert main(train_args(d)) == 0
    locked = d / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return {
        "d": d, "model": str(d / "run"), "src": str(d / "src.txt"), "tgt": str(d / "tgt.txt"),
        "config": str(d / "config.json"),
        "missing": str(d / "missing.txt"), "directory": str(d),
        "missing_dir": str(d / "nowhere" / "out.txt"), "file": str(d / "src.txt"),
        "unwritable": os.path.join(_unwritable_directory(locked), "out.txt"),
    }


def _unwritable_directory(locked: pathlib.Path) -> str:
    """A directory no file can be created in: `locked` (mode 555) unless we run as root, then a
    read-only system directory; None when there is none."""
    for candidate in (str(locked), "/sys", "/proc"):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("no unwritable directory on this machine")


_READ, _WRITE = ("missing", "directory"), ("missing_dir", "directory", "unwritable")
_DIR_IN, _DIR_OUT = ("missing", "file"), ("file", "unwritable")
# case -> the bad kinds of path each of its path arguments is given
BAD_PATHS = {
    "train": {"--src": _READ, "--tgt": _READ, "--valid-src": _READ, "--valid-tgt": _READ,
              "--config": _READ, "--out": _DIR_OUT},
    "translate": {"--model": _DIR_IN, "--input": _READ, "--output": _WRITE},
    "evaluate --hyp": {"--ref": _READ, "--hyp": _READ},
    "evaluate --model": {"--model": _DIR_IN, "--src": _READ},
    "demo": {"--out": _DIR_OUT},
    "plot curve": {"path": ("missing", "file"), "-o": _WRITE},
    "plot attention": {"path": _DIR_IN, "-o": _WRITE},
}


def _good_options(case: str, p: dict) -> dict[str, str]:
    """Valid path arguments of each case of BAD_PATHS."""
    d = p["d"]
    return {
        "train": {"--src": p["src"], "--tgt": p["tgt"], "--valid-src": p["src"],
                  "--valid-tgt": p["tgt"], "--config": p["config"], "--out": str(d / "out")},
        "translate": {"--model": p["model"], "--input": p["src"], "--output": str(d / "h.txt")},
        "evaluate --hyp": {"--ref": p["tgt"], "--hyp": p["tgt"]},
        "evaluate --model": {"--ref": p["tgt"], "--model": p["model"], "--src": p["src"]},
        "demo": {"--out": str(d / "demo")},
        "plot curve": {"path": p["model"], "-o": str(d / "c.png")},
        "plot attention": {"path": p["model"], "--sentence": "one", "-o": str(d / "a.png")},
    }[case]


@pytest.mark.parametrize(
    "case, arg, kind",
    [(case, arg, kind) for case, args in BAD_PATHS.items() for arg, kinds in args.items()
     for kind in kinds],
)
def test_bad_paths_are_one_line_naming_the_argument(paths, capsys, case, arg, kind):
    """Each path argument of each command, given a missing file, a directory, a file inside a
    missing directory, a file where a directory belongs or an unwritable place: one line on
    stderr naming the argument, a non-zero exit, nothing written."""
    options = dict(_good_options(case, paths), **{arg: paths[kind]})
    argv = case.split()[:2] if case.startswith("plot") else case.split()[:1]
    if "path" in options:
        argv.append(options.pop("path"))
    argv += [x for kv in options.items() for x in kv]
    before = sorted(p.name for p in paths["d"].iterdir())
    assert main(argv) != 0
    one_line_error(capsys, "--output" if arg == "-o" else arg)
    assert sorted(p.name for p in paths["d"].iterdir()) == before


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
