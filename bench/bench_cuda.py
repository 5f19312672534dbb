"""CUDA kernels (pytransformer.cuda) against PyTorch CUDA, interleaved, on one GPU.

SGEMM is reported in GFLOP/s beside the device's measured FP32 ceiling (cuBLAS SGEMM through
torch.matmul with TF32 off, at the same shape); attention in GFLOP/s (4·B·H·Lq·Lk·D for the
forward, halved when causal) beside torch's scaled_dot_product_attention; layer norm in GB/s
beside a device-to-device copy of the same bytes. Each timed call ends with a synchronize so
the wall time covers the kernel. Without pytransformer._cuda, a device or torch with CUDA it says
so and exits 0.
Run: PYTHONPATH=$PWD /work/venv/bin/python bench/bench_cuda.py [--write]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from _common import interleaved_medians, markdown_table, update_results

from pytransformer import cuda

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is optional
    torch = None


def sdpa(q, k, v, *, is_causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def timed(fn):
    """fn followed by a device synchronize, so host timing covers the kernel."""

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def bench_gemm(rows: list[list[object]]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    for M, N, K, trans_b in [
        (512, 512, 512, False),
        (2048, 2048, 2048, False),
        (4096, 4096, 4096, False),
        (8192, 2048, 512, True),
        (8192, 512, 2048, True),
    ]:
        a = torch.randn(M, K, device="cuda")
        b = torch.randn(N, K, device="cuda") if trans_b else torch.randn(K, N, device="cuda")
        out = torch.empty(M, N, device="cuda")
        bt = b.t() if trans_b else b
        t = interleaved_medians(
            {
                "ours": timed(partial(cuda.matmul, a, b, trans_b=trans_b, out=out)),
                "cublas": timed(partial(torch.matmul, a, bt, out=out)),
            },
            repeats=5,
            min_time=0.05,
        )
        flops = 2.0 * M * N * K
        rows.append(
            [
                f"sgemm {M}x{N}x{K}{' (B^T)' if trans_b else ''}",
                f"{flops / t['ours'] / 1e9:.0f} GFLOP/s",
                f"{flops / t['cublas'] / 1e9:.0f} GFLOP/s (cuBLAS)",
                f"{t['cublas'] / t['ours']:.2f}",
            ]
        )


def bench_attention(rows: list[list[object]]) -> None:
    for B, L, H, D, causal in [
        (8, 512, 8, 64, False),
        (8, 512, 8, 64, True),
        (4, 1024, 8, 64, True),
    ]:
        q, k, v = (torch.randn(B, L, H, D, device="cuda") for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # torch wants (B, H, L, D)
        t = interleaved_medians(
            {
                "ours": timed(partial(cuda.attention, q, k, v, causal=causal)),
                "torch": timed(partial(sdpa, qt, kt, vt, is_causal=causal)),
            },
            repeats=5,
            min_time=0.05,
        )
        flops = 4.0 * B * H * L * L * D * (0.5 if causal else 1.0)
        rows.append(
            [
                f"attention fwd B{B} L{L} H{H} D{D}{' causal' if causal else ''}",
                f"{flops / t['ours'] / 1e9:.0f} GFLOP/s",
                f"{flops / t['torch'] / 1e9:.0f} GFLOP/s (SDPA)",
                f"{t['torch'] / t['ours']:.2f}",
            ]
        )
        out, lse = cuda.attention(q, k, v, causal=causal, return_lse=True)
        dout = torch.randn_like(out)
        tb = interleaved_medians(
            {
                "ours": timed(
                    partial(cuda.attention_backward, dout, q, k, v, out, lse, causal=causal)
                )
            },
            repeats=5,
            min_time=0.05,
        )
        rows.append(
            [
                f"attention bwd B{B} L{L} H{H} D{D}{' causal' if causal else ''}",
                f"{2.5 * flops / tb['ours'] / 1e9:.0f} GFLOP/s",
                "",
                "",
            ]
        )


def bench_layer_norm(rows: list[list[object]]) -> None:
    N, C = 16384, 1024
    x = torch.randn(N, C, device="cuda")
    g, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    y = torch.empty_like(x)
    t = interleaved_medians(
        {
            "ours": timed(partial(cuda.layer_norm, x, g, b)),
            "torch": timed(partial(F.layer_norm, x, (C,), g, b)),
            "copy": timed(partial(y.copy_, x)),
        },
        repeats=5,
        min_time=0.05,
    )
    gb = 2.0 * N * C * 4 / 1e9
    rows.append(
        [
            f"layer_norm fwd {N}x{C}",
            f"{gb / t['ours']:.0f} GB/s",
            f"{gb / t['torch']:.0f} GB/s (torch)",
            f"{t['torch'] / t['ours']:.2f} (copy {gb / t['copy']:.0f} GB/s)",
        ]
    )
    # The backward reads dy and x twice (parameter gradients, then dx) and writes dx.
    _, mean, rstd = cuda.layer_norm(x, g, b, return_stats=True)
    dy = torch.randn_like(x)
    tb = interleaved_medians(
        {"ours": timed(partial(cuda.layer_norm_backward, dy, x, g, mean, rstd))},
        repeats=5,
        min_time=0.05,
    )
    rows.append([f"layer_norm bwd {N}x{C}", f"{2.5 * gb / tb['ours']:.0f} GB/s", "", ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help="update the CUDA section of RESULTS.md"
    )
    args = parser.parse_args()
    if not cuda.is_available() or torch is None or not torch.cuda.is_available():
        print("bench_cuda: skipped (needs pytransformer._cuda, a CUDA device and torch with CUDA)")
        return 0
    rows: list[list[object]] = []
    bench_gemm(rows)
    bench_attention(rows)
    bench_layer_norm(rows)
    table = markdown_table(["kernel", "ours", "reference", "speed ratio (ref time / ours)"], rows)
    print(f"device: {torch.cuda.get_device_name()}\n{table}")
    if args.write:
        update_results("CUDA", f"Device: {torch.cuda.get_device_name()}.\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
