"""Every Python snippet in the README runs, so the documentation cannot rot."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
RESULTS = README.parent / "bench" / "RESULTS.md"
# A decimal figure, not part of a version string such as 4.8.5.
FIGURE = re.compile(r"(?<![\d.])\d+\.\d+(?![\d.])")
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_setup_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks[0].strip() == 'pip install ".[demo]" && pytransformer demo'
    assert blocks[1].strip() == 'pip install ".[test]" && pytest'


def _speed_table() -> list[str]:
    """The rows of the table under README's "## Speed" heading."""
    section = README.read_text().split("\n## Speed\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


# README speed-table row (by the start of its "what" cell) -> the bench/RESULTS.md section
# (between <!-- name:begin --> and <!-- name:end -->) that measured it
SECTIONS = {"matmul": "gemm", "attention": "attention", "training": "train",
            "translation": "decode", "the same vs CTranslate2": "decode"}


def _results_section(name: str) -> str:
    return RESULTS.read_text().split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]


def test_every_speed_figure_comes_from_the_results():
    """Each figure of README's speed table (ratios, GFLOP/s) is one that the matching section
    of bench/RESULTS.md records, so the README cannot drift from the measurements."""
    rows = _speed_table()[1:]  # below the header
    assert len(rows) >= 5
    missing = []
    for row in rows:
        what = row.split("|")[1].strip()
        (section,) = [v for k, v in SECTIONS.items() if what.startswith(k)]
        measured = set(FIGURE.findall(_results_section(section)))
        figures = FIGURE.findall(row)
        assert len(figures) >= 4, row
        missing += [(what, f) for f in figures if f not in measured]
    assert not missing, f"README speed figures not in bench/RESULTS.md: {missing}"


def _printed(stdout: str) -> list:
    """Each printed line as the Python value it shows (a line may hold several, space-separated
    values: print(a, b))."""
    return [ast.literal_eval(f"({line.replace('] [', '], [')},)") for line in
            stdout.strip().splitlines()]


def _check_translator_snippet(lines: list) -> None:
    """print(translate(["three", "seven"])) then print(translate(["three"], n_best=2))."""
    (pair,), (nbest,) = lines
    assert len(pair) == 2 and all(isinstance(h, str) for h in pair)
    assert pair[0] == "drei" or pair[1] == "sieben", pair  # 40 updates learn the words
    assert len(nbest) == 1 and len(nbest[0]) == 2 and nbest[0][0] != nbest[0][1], nbest


def _check_model_snippet(lines: list) -> None:
    """print(results[0].hypotheses, results[0].scores): 2 hypotheses, best first."""
    ((hyps, scores),) = lines
    assert len(hyps) == len(scores) == 2
    assert all(3 <= t < 20 for h in hyps for t in h), hyps  # no pad/bos/eos in a hypothesis
    assert all(-1e3 < s <= 0 for s in scores) and scores[0] >= scores[1], scores


def _check_vit_snippet(lines: list) -> None:
    """print(predict(images[:4]).tolist()) then print(class_attention(images[:4]).shape)."""
    (classes,), (shape,) = lines
    assert len(classes) == 4 and all(isinstance(c, int) and 0 <= c < 10 for c in classes)
    assert shape == (4, 4, 4, 4, 4), shape  # images, layers, heads, the 4 x 4 patch grid


def _check_streaming_snippet(lines: list) -> None:
    """print(len(lines), translate_file(...)), the file equal to the stream, <= 5 tokens."""
    ([count, written],), (same,), (short,) = lines
    assert count == written == 3 and same is True and short is True, lines


# one per snippet, in README order
CHECKS = [_check_translator_snippet, _check_model_snippet, _check_vit_snippet,
          _check_streaming_snippet]


def test_every_snippet_has_a_check():
    assert len(SNIPPETS) == len(CHECKS)


@pytest.mark.parametrize(
    "code, check", list(zip(SNIPPETS, CHECKS, strict=False)),
    ids=[f"snippet{i}" for i in range(min(len(SNIPPETS), len(CHECKS)))],
)
def test_readme_snippet_runs_and_prints_what_it_says(code, check, tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    check(_printed(out.stdout))
