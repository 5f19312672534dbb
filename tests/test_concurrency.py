"""Several Python threads on one model: what docs/THREADING.md promises.

- Inference (encode, decode_step, translate, generate, evaluate_loss) from many threads at once
  on one model gives exactly the results of the same calls made one after another.
- One thread training (loss_and_grad + optimizer step) while others read `state_dict()` or
  decode: nothing crashes, every snapshot is finite with the right keys and shapes, and the
  training result is bit-identical to the same training run alone (readers and decoders do not
  disturb dropout seeds, saved activations or gradients).
- Kernels called from several threads at once (they release the GIL) give the single-thread bits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from model_cases import small_config

import pytransformer as pt
from pytransformer import Transformer, TransformerLM, ops
from pytransformer.train.data import make_batch, synthetic_pairs
from pytransformer.train.optim import Adam

N_THREADS = 4


def _model(cls=Transformer) -> Transformer:
    return cls(small_config(23, 16, layers=2, max_len=16, dropout=0.1), seed=11)


def _sources(n: int, seed: int) -> list[list[int]]:
    return [list(p[0]) for p in synthetic_pairs("random", n, 23, 1, 7, seed=seed)]


def _run_threads(fn, args_list):
    """Runs fn(*args) for every args in threads released together; returns results in order."""
    barrier = threading.Barrier(len(args_list))

    def start(args):
        barrier.wait()
        return fn(*args)

    with ThreadPoolExecutor(len(args_list)) as pool:
        return list(pool.map(start, args_list))


def _hyps(results):
    return [(r.hypotheses, r.scores) for r in results]


def test_threads_share_one_model_for_translation():
    model = _model().eval()
    inputs = [(_sources(5, seed),) for seed in range(N_THREADS)]
    alone = [
        _hyps(model.translate(s, beam_size=3, max_decoding_length=8, return_scores=True))
        for (s,) in inputs
    ]
    for _ in range(2):
        together = _run_threads(
            lambda s: _hyps(
                model.translate(s, beam_size=3, max_decoding_length=8, return_scores=True)
            ),
            inputs,
        )
        assert together == alone


def test_threads_decode_step_by_step_on_one_model():
    """Each thread owns its DecoderState; the model is shared (in train mode even: decoding never
    applies dropout)."""
    model = _model()  # train mode on purpose
    rng = np.random.default_rng(0)
    srcs = [rng.integers(3, 23, size=(2, 6)) for _ in range(N_THREADS)]
    lengths = np.array([6, 4])

    def decode(src):
        memory = model.encode(src, lengths)
        state = model.init_decoder_state(memory, lengths, 8)
        tokens, out = np.full(2, 1), []
        for _ in range(8):
            logits, attn = model.decode_step(state, tokens, need_attention=True)
            out.append((logits, attn))
            tokens = logits.argmax(-1)
        return memory, out

    alone = [decode(s) for s in srcs]
    together = _run_threads(decode, [(s,) for s in srcs])
    for (m1, o1), (m2, o2) in zip(alone, together, strict=True):
        np.testing.assert_array_equal(m1, m2)
        for (l1, a1), (l2, a2) in zip(o1, o2, strict=True):
            np.testing.assert_array_equal(l1, l2)
            np.testing.assert_array_equal(a1, a2)


def test_threads_generate_and_evaluate_on_one_model():
    lm = _model(TransformerLM).eval()
    prompts = [(_sources(3, seed),) for seed in range(N_THREADS)]
    alone = [lm.generate(p, max_new_tokens=5, temperature=1.0, seed=3) for (p,) in prompts]
    together = _run_threads(lambda p: lm.generate(p, max_new_tokens=5, temperature=1.0, seed=3),
                            prompts)  # fmt: skip
    assert together == alone
    model = _model()
    batches = [
        (make_batch(synthetic_pairs("copy", 4, 23, 1, 6, seed=s), 0, 1, 2),)
        for s in range(N_THREADS)
    ]
    alone = [model.evaluate_loss(b) for (b,) in batches]
    assert _run_threads(model.evaluate_loss, batches) == alone


def _train(model, steps: int, on_step=None) -> None:
    batches = [
        make_batch(synthetic_pairs("reverse", 6, 23, 2, 8, seed=s), 0, 1, 2) for s in range(4)
    ]
    opt = Adam(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    for step in range(steps):
        model.zero_grad()
        model.loss_and_grad(batches[step % 4], dropout_seed=step)
        opt.step(model.gradients())
        if on_step:
            on_step(step)


def test_training_while_other_threads_read_state_dict_and_decode():
    steps = 20
    reference = _model()
    _train(reference, steps)

    model = _model()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    done = threading.Event()
    snapshots, translations, errors = [], [], []

    def reader():
        try:
            while not done.is_set():
                snap = model.state_dict()
                assert {k: v.shape for k, v in snap.items()} == shapes
                assert all(np.isfinite(v).all() for v in snap.values())
                snapshots.append(snap)
        except BaseException as exc:  # reported below: a thread's assert does not fail a test
            errors.append(exc)

    def decoder():
        try:
            while not done.is_set():
                res = model.translate(_sources(2, 5), beam_size=2, max_decoding_length=6)
                assert all(0 <= t < 23 for r in res for h in r.hypotheses for t in h)
                translations.append(res)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader), threading.Thread(target=decoder)]
    for t in threads:
        t.start()
    try:
        _train(model, steps)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert snapshots and translations
    # the training run is exactly the one made alone
    for name, value in reference.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)


def test_consistent_snapshot_between_steps():
    """The documented way to checkpoint while training: take state_dict() in the training thread
    between steps (or under a lock the training loop also holds); it equals the parameters after
    that step exactly."""
    model = _model()
    lock = threading.Lock()
    snaps = {}

    def on_step(step):
        with lock:
            snaps[step] = model.state_dict()

    _train(model, 6, on_step)
    replay = _model()
    _train(replay, 4)
    for name, value in replay.state_dict().items():
        np.testing.assert_array_equal(snaps[3][name], value)


def test_kernels_from_many_threads_match_single_thread():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 48)).astype(np.float32)
    b = rng.standard_normal((48, 40)).astype(np.float32)
    q = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    kv = rng.standard_normal((2, 11, 2, 2, 8)).astype(np.float32)
    lengths = np.array([11, 5])

    def work(i):
        x = ops.matmul(a * (i + 1), b, activation="gelu")
        o, lse = ops.attention(q, kv[:, :, 0], kv[:, :, 1], key_lengths=lengths, causal=True,
                               return_lse=True)  # fmt: skip
        g = ops.attention_backward(o, q, kv[:, :, 0], kv[:, :, 1], o, lse, key_lengths=lengths,
                                   causal=True)  # fmt: skip
        y = ops.layer_norm(x, np.ones(40, np.float32), np.zeros(40, np.float32))
        loss, d = ops.softmax_cross_entropy(y, np.arange(64) % 40, label_smoothing=0.1)
        return [x, o, lse, *g, y, np.float32(loss), d]

    alone = [work(i) for i in range(N_THREADS)]
    for _ in range(3):
        together = _run_threads(work, [(i,) for i in range(N_THREADS)])
        for r1, r2 in zip(alone, together, strict=True):
            for x1, x2 in zip(r1, r2, strict=True):
                np.testing.assert_array_equal(x1, x2)


_FORK_SCRIPT = r"""
import os, sys
import numpy as np
import pytransformer as pt

pt.set_num_threads(2)
a = np.ones((256, 256), np.float32)
if sys.argv[1] == "after_team":
    pt.ops.matmul(a, a)  # starts the OpenMP team
pid = os.fork()
if pid == 0:
    ok = float(pt.ops.matmul(a, a)[0, 0]) == 256.0
    threads = pt.get_num_threads()
    try:
        pt.set_num_threads(2)
        refused = False
    except RuntimeError as exc:
        refused = "fork" in str(exc)
    print(ok, threads, refused, flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("when,expected", [("after_team", "True 1 True"),
                                           ("before_team", "True 2 False")])
def test_fork_child_does_not_hang(when, expected, tmp_path):
    """A child forked after a multi-threaded kernel runs kernels on one thread (libgomp's team
    does not survive fork) instead of hanging; one forked before any team keeps its threads."""
    if not hasattr(os, "fork") or not pt._C.have_openmp():
        pytest.skip("needs fork() and OpenMP")
    # Run outside the repository, so the child imports the installed (built) package.
    done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, when], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected.split()
