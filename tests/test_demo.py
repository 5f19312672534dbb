"""The demo's small variant learns the number-words task on held-out numbers."""

import importlib.util
import json

import pytest

pytest.importorskip("num2words")
pytest.importorskip("sentencepiece")

from pytransformer.demo import run_demo  # noqa: E402


def test_quick_demo_translates_unseen_numbers(tmp_path, capsys):
    scores = run_demo(str(tmp_path), quick=True, progress=False)
    # 200 updates on 800 numbers: about 90% of 100 unseen numbers come out exactly right.
    assert scores["exact_match"] >= 75.0
    assert scores["bleu"] >= 90.0
    out = capsys.readouterr().out
    assert f"exact match {scores['exact_match']:.1f}%" in out
    assert f"BLEU {scores['bleu']:.1f}" in out and "test numbers never seen in training" in out
    assert json.loads((tmp_path / "demo_scores.json").read_text())["exact_match"] == pytest.approx(
        scores["exact_match"]
    )
    if importlib.util.find_spec("matplotlib") is None:  # the demo says so and goes on
        assert "(no pictures:" in out
    else:
        for png in ("curve.png", "attention.png"):
            assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
