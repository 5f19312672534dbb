"""No memory growth: a long training run and a long decoding loop hold no more memory at the end
than after warm-up.

Each loop runs in a fresh subprocess (so other tests' allocations do not pollute it) which
reports, after warm-up and at the end: the bytes malloc has handed out and not had back (glibc's
mallinfo2: C++ kernels, numpy buffers), the blocks Python's allocator holds
(sys.getallocatedblocks: Python objects) and the resident set size. A correct loop reuses what it
frees, so the first two come back to where they were (0 bytes and a handful of blocks measured);
a leak of a few hundred bytes per step grows the heap by hundreds of kilobytes over the run.
test_injected_leaks_fail_the_check proves the check sees such a leak.
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
# Growth allowed after warm-up, per step: far below the 300-byte leak the self-check injects.
ALLOWED_HEAP_BYTES_PER_STEP = 16
ALLOWED_BLOCKS_PER_STEP = 0.1  # a lost Python object per step is 1 block per step
ALLOWED_RSS_MB = 4.0  # coarse: memory mapped outside malloc and Python's allocator

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

    import ctypes

    try:  # glibc's count of the bytes malloc has handed out and not had back

        class _MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        _mallinfo2 = ctypes.CDLL(None).mallinfo2
        _mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):  # not glibc (or older than 2.33)
        _mallinfo2 = None

    def usage():  # RSS (MB), bytes in use from malloc (None without glibc), Python's blocks
        gc.collect()
        info = _mallinfo2() if _mallinfo2 is not None else None
        heap = None if info is None else info.uordblks + info.hblkhd
        return {"rss": rss_mb(), "heap": heap, "blocks": sys.getallocatedblocks()}

    pytransformer.set_num_threads(1)  # tiny kernels: no thread wake-ups on a busy machine
    cfg = TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=8, num_heads=2,
                            d_ff=16, num_encoder_layers=1, num_decoder_layers=1, max_len=16)
    model = Transformer(cfg, seed=0)
    pairs = synthetic_pairs("reverse", 32, 20, 1, 6, seed=0)
    batches = [make_batch(pairs[i:i + 4], 0, 1, 2) for i in range(0, 32, 4)]
    # PYTRANSFORMER_TEST_LEAK="numpy:N" keeps an N-byte array per step, "malloc:N" loses an
    # N-byte malloc per step (as a C++ kernel would): test_injected_leaks_fail_the_check.
    leak_kind, _, leak_bytes = os.environ.get("PYTRANSFORMER_TEST_LEAK", "none:0").partition(":")
    leak_bytes, kept = int(leak_bytes), []

    def leak():
        if leak_kind == "numpy":
            kept.append(np.ones(leak_bytes, np.uint8))
        elif leak_kind == "malloc":
            ctypes.CDLL(None).malloc(leak_bytes)
    steps, warmup = int(sys.argv[1]), int(sys.argv[2])
    """
)

_TRAIN = _PRELUDE + textwrap.dedent(
    """
    opt = Adam(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    t0 = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            before = usage()
        leak()
        model.zero_grad()
        model.loss_and_grad(batches[step % len(batches)], dropout_seed=step)
        opt.step(model.gradients())
        if step % 50 == 0:
            model.state_dict()
    print(json.dumps({"before": before, "after": usage(), "steps": steps - warmup,
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
            before = usage()
        leak()
        if step % 2:
            model.translate(sources, beam_size=2, max_decoding_length=6)
        else:
            mem = model.encode(batches[0].src, batches[0].src_lengths)
            state = model.init_decoder_state(mem, batches[0].src_lengths, 8)
            tokens = np.full(mem.shape[0], 1, np.int64)
            for _ in range(6):
                logits, _ = model.decode_step(state, tokens, need_attention=True)
                tokens = logits.argmax(-1)
    print(json.dumps({"before": before, "after": usage(), "steps": steps - warmup,
                      "seconds": time.perf_counter() - t0}))
    """
)


def _run(script: str, steps: int, warmup: int, leak: str = "none:0") -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTRANSFORMER_TEST_LEAK=leak,
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-c", script, str(steps), str(warmup)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _growth(r: dict) -> list[str]:
    """What grew past its allowance over the steps after warm-up (empty: nothing)."""
    before, after, n = r["before"], r["after"], r["steps"]
    print(f"over {n} steps: heap {before['heap']} -> {after['heap']} B, blocks "
          f"{before['blocks']} -> {after['blocks']}, RSS {before['rss']:.1f} -> "
          f"{after['rss']:.1f} MB")
    found = []
    if before["heap"] is not None and after["heap"] - before["heap"] > (
        ALLOWED_HEAP_BYTES_PER_STEP * n
    ):
        found.append(f"heap +{after['heap'] - before['heap']} B")
    if after["blocks"] - before["blocks"] > ALLOWED_BLOCKS_PER_STEP * n:
        found.append(f"Python blocks +{after['blocks'] - before['blocks']}")
    if after["rss"] - before["rss"] > ALLOWED_RSS_MB:
        found.append(f"RSS +{after['rss'] - before['rss']:.1f} MB")
    return found


def test_training_loop_memory_is_flat():
    assert _growth(_run(_TRAIN, steps=3000, warmup=300)) == []


def test_decoding_loop_memory_is_flat():
    assert _growth(_run(_DECODE, steps=1000, warmup=100)) == []


@pytest.mark.parametrize("kind", ["numpy", "malloc"])
def test_injected_leaks_fail_the_check(kind):
    """300 bytes a step, in numpy arrays or in malloc'd memory no Python object holds, over a
    third of the training run: the check reports it."""
    r = _run(_TRAIN, steps=1000, warmup=100, leak=f"{kind}:300")
    if r["after"]["heap"] is None:
        pytest.skip("no mallinfo2 (not glibc >= 2.33): only Python blocks and RSS are checked")
    found = _growth(r)
    assert any(f.startswith("heap") for f in found), found
    if kind == "numpy":
        assert any(f.startswith("Python blocks") for f in found), found
