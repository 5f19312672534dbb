"""Layer norm and softmax cross-entropy: ours vs PyTorch (and the numpy reference), interleaved.

Layer norm is memory-bound: GB/s counts the bytes a kernel must move (forward: read x, write y;
backward: read dy and x, write dx) beside the ~13.5 GB/s per-core streaming ceiling. Calls
allocate their outputs (torch too), so large shapes include first-touch page faults; the "fwd out"
rows write into one reused buffer (`out=`) instead. Torch's figures in those rows are its
allocating forward. Run: PYTHONPATH=$PWD python bench/bench_norm.py [--no-write]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from _common import interleaved_medians, markdown_table, update_results

import pytransformer
from pytransformer import ops

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is optional
    torch = None

STREAM_GBS = 13.5  # measured streaming bandwidth of one core, read + write


def ln_numpy(x, g, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def cpu_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds of the calling thread per call, interleaved. With one thread (ours and
    torch's both compute in the caller) this ignores the time slices other processes take."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def layer_norm_fns(x, dy, g, b) -> dict:
    """The timed calls for one shape: ours, torch's and (small shapes) numpy's."""
    C = x.shape[1]
    _, mean, rstd = ops.layer_norm(x, g, b, return_stats=True)
    y = np.empty_like(x)
    fns = {
        "ours fwd": lambda: ops.layer_norm(x, g, b),
        "ours fwd out": lambda: ops.layer_norm(x, g, b, out=y),  # a reused output buffer
        "ours bwd": lambda: ops.layer_norm_backward(dy, x, g, mean, rstd),
    }
    if x.size <= 4096 * 512:
        fns["numpy fwd"] = lambda: ln_numpy(x, g, b)
    if torch is not None:
        xt, dyt, gt, bt = (torch.from_numpy(a) for a in (x, dy, g, b))
        _, mt, rt = torch.ops.aten.native_layer_norm(xt, [C], gt, bt, 1e-5)
        fns["torch fwd"] = lambda: F.layer_norm(xt, (C,), gt, bt)
        fns["torch bwd"] = lambda: torch.ops.aten.native_layer_norm_backward(
            dyt, xt, [C], mt, rt, gt, bt, [True, True, True]
        )
    return fns


def layer_norm_rows(threads: int, shapes, repeats: int) -> list[list[object]]:
    rows = []
    rng = np.random.default_rng(0)
    for N, C in shapes:
        x = rng.standard_normal((N, C), dtype=np.float32)
        dy = rng.standard_normal((N, C), dtype=np.float32)
        g = rng.standard_normal(C, dtype=np.float32)
        b = rng.standard_normal(C, dtype=np.float32)
        t = interleaved_medians(layer_norm_fns(x, dy, g, b), repeats=repeats)
        for kind, nbytes in (("fwd", 2 * x.nbytes), ("fwd out", 2 * x.nbytes),
                             ("bwd", 3 * x.nbytes)):
            ours = t[f"ours {kind}"]
            peer = t.get(f"torch {kind.split()[0]}")
            rows.append(
                [
                    threads,
                    f"{N}x{C} {kind}",
                    f"{ours * 1e3:.2f}",
                    f"{nbytes / ours / 1e9:.1f}",
                    f"{peer * 1e3:.2f}" if peer else "-",
                    f"{nbytes / peer / 1e9:.1f}" if peer else "-",
                    f"{peer / ours:.2f}x" if peer else "-",
                    f"{t['numpy fwd'] * 1e3:.2f}" if kind == "fwd" and "numpy fwd" in t else "-",
                ]
            )
    return rows


def layer_norm_cpu_rows(shapes, repeats: int) -> list[list[object]]:
    rows = []
    rng = np.random.default_rng(2)
    for N, C in shapes:
        arrays = [rng.standard_normal(s, dtype=np.float32) for s in ((N, C), (N, C), C, C)]
        fns = layer_norm_fns(*arrays)
        fns.pop("numpy fwd", None)
        t = cpu_medians(fns, repeats)
        nb = arrays[0].nbytes
        for kind, nbytes in (("fwd", 2 * nb), ("fwd out", 2 * nb), ("bwd", 3 * nb)):
            ours, peer = t[f"ours {kind}"], t.get(f"torch {kind.split()[0]}")
            rows.append(
                [
                    f"{N}x{C} {kind}",
                    f"{nbytes / ours / 1e9:.1f}",
                    f"{nbytes / peer / 1e9:.1f}" if peer else "-",
                    f"{peer / ours:.2f}x" if peer else "-",
                ]
            )
    return rows


def cross_entropy_rows(threads: int, N: int, V: int, repeats: int) -> list[list[object]]:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((N, V), dtype=np.float32)
    targets = rng.integers(0, V, N)
    targets[::17] = -100
    buf = logits.copy()
    fns = {
        "ours": lambda: ops.softmax_cross_entropy(logits, targets, label_smoothing=0.1),
        "ours inplace": lambda: ops.softmax_cross_entropy(
            buf, targets, label_smoothing=0.1, inplace=True
        ),
    }
    if torch is not None:
        lt = torch.from_numpy(logits).requires_grad_()
        tt = torch.from_numpy(targets)

        def torch_xent():
            lt.grad = None
            F.cross_entropy(lt, tt, label_smoothing=0.1).backward()

        fns["torch"] = torch_xent
    t = interleaved_medians(fns, repeats=repeats, min_time=0.0)
    peer = t.get("torch")
    return [
        [
            threads,
            f"{N}x{V} {name}",
            f"{t[name] * 1e3:.1f}",
            f"{peer * 1e3:.1f}" if peer else "-",
            f"{peer / t[name]:.2f}x" if peer else "-",
        ]
        for name in ("ours", "ours inplace")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ln, ce = [], []
    shapes = [(4096, 512), (16384, 1024)]
    pytransformer.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    cpu = layer_norm_cpu_rows(shapes, 3 * args.repeats)
    for threads in (1, 2):
        pytransformer.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        ln += layer_norm_rows(threads, shapes, args.repeats)
        ce += cross_entropy_rows(threads, 2048, 32000, max(3, args.repeats // 2))
    peer = f"torch {torch.__version__}" if torch is not None else "no torch"
    body = "\n\n".join(
        [
            f"`PYTHONPATH=$PWD python bench/bench_norm.py` on {platform.machine()}, "
            f"ISA {pytransformer.cpu_info()['isa']}, peer {peer}; medians of {args.repeats} "
            f"interleaved runs. Streaming ceiling ~{STREAM_GBS} GB/s per core (read + write). "
            "Backward peer: `aten.native_layer_norm_backward` (dx, dgamma, dbeta).",
            markdown_table(
                [
                    "threads",
                    "layer norm",
                    "ours ms",
                    "ours GB/s",
                    "torch ms",
                    "torch GB/s",
                    "speed-up",
                    "numpy ms",
                ],
                ln,
            ),
            "The same at 1 thread in CPU time of the calling thread (`time.thread_time`, "
            f"medians of {3 * args.repeats} interleaved calls): what the kernels reach when the "
            "shared machine's other processes are not taking time slices. It still includes "
            "first-touch page faults of the new output arrays (large at 16384x1024).",
            markdown_table(["layer norm, 1 thread", "ours GB/s", "torch GB/s", "speed-up"], cpu),
            "Cross-entropy, label smoothing 0.1, every 17th target ignored; loss and dlogits "
            "(torch: `F.cross_entropy` forward + backward).",
            markdown_table(["threads", "cross-entropy", "ours ms", "torch ms", "speed-up"], ce),
        ]
    )
    print(body)
    if not args.no_write:
        update_results("norm", body)


if __name__ == "__main__":
    main()
