"""No memory growth: a long training run and a long decoding loop keep a flat RSS after warm-up.

Each loop runs in a fresh subprocess (so other tests' allocations do not pollute its RSS) which
prints its resident set size after warm-up and at the end. Python's allocator and glibc keep
freed memory for reuse, so a correct loop plateaus; a leak of even a few hundred bytes per step
(one lost small array per step) would grow by megabytes over thousands of steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import pytransformer

# ASan's quarantine holds freed memory back on purpose: RSS under the sanitizer build says nothing.
pytestmark = pytest.mark.skipif(
    os.environ.get("PYTRANSFORMER_SANITIZED") == "1", reason="RSS is meaningless under ASan"
)
# Children import the same pytransformer as this process (the sanitized copy under
# tools/sanitize.sh), not whatever the current directory holds: hence -P and this path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pytransformer.__file__)))
ALLOWED_GROWTH_MB = 4.0  # after warm-up; a lost (B, T, V) logits array per step is ~2.5 KB

_PRELUDE = textwrap.dedent(
    """
    import gc, json, os, sys, time
    import numpy as np
    import pytransformer
    from pytransformer import Transformer, TransformerConfig
    from pytransformer.train.data import make_batch, synthetic_pairs
    from pytransformer.train.optim import Adam

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    pytransformer.set_num_threads(1)  # tiny kernels: no thread wake-ups on a busy machine
    cfg = TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=8, num_heads=2,
                            d_ff=16, num_encoder_layers=1, num_decoder_layers=1, max_len=16)
    model = Transformer(cfg, seed=0)
    pairs = synthetic_pairs("reverse", 32, 20, 1, 6, seed=0)
    batches = [make_batch(pairs[i:i + 4], 0, 1, 2) for i in range(0, 32, 4)]
    leak = []  # PYTRANSFORMER_TEST_LEAK_BYTES > 0 leaks that much per step (checks the check)
    leak_bytes = int(os.environ.get("PYTRANSFORMER_TEST_LEAK_BYTES", "0"))
    steps, warmup = int(sys.argv[1]), int(sys.argv[2])
    """
)

_TRAIN = _PRELUDE + textwrap.dedent(
    """
    opt = Adam(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    t0 = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            gc.collect()
            before = rss_mb()
        if leak_bytes:
            leak.append(np.ones(leak_bytes, np.uint8))
        model.zero_grad()
        model.loss_and_grad(batches[step % len(batches)], dropout_seed=step)
        opt.step(model.gradients())
        if step % 50 == 0:
            model.state_dict()
    gc.collect()
    print(json.dumps({"before": before, "after": rss_mb(), "steps": steps,
                      "seconds": time.perf_counter() - t0}))
    """
)

_DECODE = _PRELUDE + textwrap.dedent(
    """
    model.eval()
    sources = [list(p[0]) for p in pairs[:3]]
    t0 = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            gc.collect()
            before = rss_mb()
        if step % 2:
            model.translate(sources, beam_size=2, max_decoding_length=6)
        else:
            mem = model.encode(batches[0].src, batches[0].src_lengths)
            state = model.init_decoder_state(mem, batches[0].src_lengths, 8)
            tokens = np.full(mem.shape[0], 1, np.int64)
            for _ in range(6):
                logits, _ = model.decode_step(state, tokens, need_attention=True)
                tokens = logits.argmax(-1)
    gc.collect()
    print(json.dumps({"before": before, "after": rss_mb(), "steps": steps,
                      "seconds": time.perf_counter() - t0}))
    """
)


def _run(script: str, steps: int, warmup: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-P", "-c", script, str(steps), str(warmup)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"RSS {result['before']:.1f} MB -> {result['after']:.1f} MB over {steps} steps")
    return result


def test_training_loop_rss_is_flat():
    r = _run(_TRAIN, steps=3000, warmup=300)
    growth = r["after"] - r["before"]
    assert growth < ALLOWED_GROWTH_MB, (
        f"RSS grew {growth:.1f} MB over {r['steps']} training steps after warm-up "
        f"({r['before']:.1f} -> {r['after']:.1f} MB)"
    )


def test_decoding_loop_rss_is_flat():
    r = _run(_DECODE, steps=1000, warmup=100)
    growth = r["after"] - r["before"]
    assert growth < ALLOWED_GROWTH_MB, (
        f"RSS grew {growth:.1f} MB over {r['steps']} decoding rounds after warm-up "
        f"({r['before']:.1f} -> {r['after']:.1f} MB)"
    )
