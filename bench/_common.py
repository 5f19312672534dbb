"""Shared benchmark helpers: interleaved timing, RESULTS.md section updates and the command
lines recorded there."""

from __future__ import annotations

import os
import pathlib
import statistics
import time
from collections.abc import Callable

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def interleaved_samples(
    fns: dict[str, Callable[[], object]],
    repeats: int = 7,
    min_time: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``repeats`` samples each, taken in turn so machine noise hits
    all alike. ``clock=time.thread_time`` measures the calling thread's CPU time instead."""
    for fn in fns.values():  # warm up caches, thread pools, allocations
        fn()
    inner = {}
    for name, fn in fns.items():
        t0, n = clock(), 0
        while clock() - t0 < min_time:
            fn()
            n += 1
        inner[name] = max(1, n)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(inner[name]):
                fn()
            samples[name].append((clock() - t0) / inner[name])
    return samples


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int = 7,
    min_time: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each fn (see interleaved_samples)."""
    samples = interleaved_samples(fns, repeats, min_time, clock)
    return {name: statistics.median(s) for name, s in samples.items()}


def update_results(section: str, body: str) -> None:
    """Replaces the text between <!-- section:begin --> and <!-- section:end --> in RESULTS.md."""
    text = RESULTS.read_text()
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if begin not in text:
        text += f"\n## {section}\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    RESULTS.write_text(f"{head}{begin}\n{body.rstrip()}\n{end}{tail}")


def command_line(script: str, args: list[str]) -> str:
    """How a bench ran, as RESULTS.md records it: OMP_WAIT_POLICY when set (it moves the
    multi-threaded figures; GOMP_SPINCOUNT only when it is not the library's default of 1000),
    then the script under bench/ with its arguments."""
    policy, spin = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    prefix = [f"OMP_WAIT_POLICY={policy}"] if policy else []
    prefix += [f"GOMP_SPINCOUNT={spin}"] if spin and spin != "1000" else []
    return " ".join([*prefix, "PYTHONPATH=$PWD python", f"bench/{script}", *args])


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
