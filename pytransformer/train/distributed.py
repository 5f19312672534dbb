"""Data-parallel training and sharded work over MPI, through mpi4py (``pip install ".[mpi]"``).

Launched as ``mpiexec -n N python ...`` (or ``srun``), every rank holds the whole model and
reads its share of one global batch stream; after each update's backward the ranks sum their
gradients and take the same optimizer step, so the parameters stay identical everywhere.

- ``world()``: this process's rank and the number of ranks. mpi4py is imported only when the
  process was launched by an MPI launcher (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE`` or
  ``PMIX_RANK`` in the environment) or when asked (``world(force=True)``); otherwise the world
  is one process and nothing MPI is touched.
- ``RankShare``: rank r of N takes batches r, r+N, r+2N, ... of a ``DataSource``, so the global
  order is a one-process run's, and a checkpoint (the global position) resumes at any N.
- ``MPIReducer``: the Trainer's gradient reduction. Deterministic: each bucket of the flat
  gradient buffer is reduce-scattered (an all-to-all, then each rank adds its shard's N pieces
  in rank order) and all-gathered back, so the sum is (((g_0 + g_1) + g_2) + ...) whatever the
  network does, bit for bit what one process accumulating the same batches computes. It moves
  2(N-1)/N x the buffer per rank, as a ring all-reduce does. Buckets start as soon as the
  backward of their layers is done (a hook on each encoder/decoder layer's ``backward``, and
  the target embedding's) and are driven by a progress thread and every later hook, so
  communication overlaps the rest of the backward.
- Faults: ``guard()`` turns an exception on any rank into a message naming the rank and an
  ``MPI_Abort`` of the whole job (the launcher itself ends the job when a rank dies); every
  wait on other ranks polls with a deadline (``PYTRANSFORMER_MPI_TIMEOUT``, default 600 s)
  and aborts with a message when it passes, so no rank hangs.
- ``map_blocks``: ranks take interleaved blocks of a list; rank 0 gets the results in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checks import check_float, check_int

__all__ = [
    "World",
    "world",
    "launched_under_mpi",
    "guard",
    "RankShare",
    "MPIReducer",
    "map_blocks",
]

# Set by the launchers: Open MPI's mpiexec, MPICH's Hydra (and srun --mpi=pmi2), PMIx (srun
# --mpi=pmix, Open MPI 5's prterun).
_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
_TIMEOUT_VAR = "PYTRANSFORMER_MPI_TIMEOUT"
_DEFAULT_TIMEOUT = 600.0
_AGREE_BYTES = 4096  # the largest JSON value agree() carries
_ROLL_CALL, _ROLL_REPLY = 7001, 7002  # tags on World.roll, the communicator of the roll call
_ROLL_GRACE = 2.0  # seconds the ranks that timed out wait for the others to answer


def launched_under_mpi() -> bool:
    """Whether an MPI launcher started this process (mpiexec, mpirun, srun)."""
    return any(v in os.environ for v in _LAUNCH_VARS)


def _timeout_from_env() -> float:
    text = os.environ.get(_TIMEOUT_VAR)
    if text is None:
        return _DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{_TIMEOUT_VAR}: expected seconds, got {text!r}") from None
    return check_float(_TIMEOUT_VAR, value, positive=True)


@dataclass
class World:
    """The processes of a run: ``rank`` of ``size``; ``comm`` is the mpi4py communicator (None
    for one process without MPI). ``timeout``: seconds any wait on other ranks may last before
    the job is aborted."""

    rank: int = 0
    size: int = 1
    comm: Any = None
    timeout: float = _DEFAULT_TIMEOUT
    _mpi: Any = field(default=None, repr=False)
    roll: Any = field(default=None, repr=False)
    _sent: list = field(default_factory=list, repr=False)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def abort(self, message: str, code: int = 1) -> None:
        """Prints ``message`` (naming this rank) and ends every rank of the job."""
        print(f"pytransformer: rank {self.rank} of {self.size}: {message}", file=sys.stderr,
              flush=True)
        if self.comm is None:
            raise SystemExit(code)
        self.comm.Abort(code)

    def wait(self, requests: Sequence[Any], what: str) -> None:
        """Completes MPI requests, aborting the job when they take longer than ``timeout``."""
        _Poller(self, what).until(lambda: all(r.Test() for r in requests))

    def barrier(self, what: str = "a barrier") -> None:
        if self.size > 1:
            self.wait([self.comm.Ibarrier()], what)

    def answer_roll_calls(self) -> None:
        """Tells the ranks that timed out that this one is alive and waiting (called while
        polling, so only a rank stuck outside MPI stays silent)."""
        if self.roll is None:
            return
        status = self._mpi.Status()
        while self.roll.Iprobe(source=self._mpi.ANY_SOURCE, tag=_ROLL_CALL, status=status):
            self.roll.recv(source=status.Get_source(), tag=_ROLL_CALL)
            self._sent.append(self.roll.isend(self.rank, dest=status.Get_source(),
                                              tag=_ROLL_REPLY))

    def silent_ranks(self) -> list[int]:
        """Asks every other rank whether it is waiting too; the ones that do not answer within
        a grace period are the ones the job waits for."""
        others = [r for r in range(self.size) if r != self.rank]
        if self.roll is None:
            return others
        self._sent += [self.roll.isend(None, dest=r, tag=_ROLL_CALL) for r in others]
        answered: set[int] = set()
        status = self._mpi.Status()
        end = time.monotonic() + _ROLL_GRACE
        while time.monotonic() < end and len(answered) < len(others):
            while self.roll.Iprobe(source=self._mpi.ANY_SOURCE, tag=_ROLL_REPLY, status=status):
                answered.add(self.roll.recv(source=status.Get_source(), tag=_ROLL_REPLY))
            self.answer_roll_calls()
            time.sleep(0.01)
        return [r for r in others if r not in answered]


_WORLD: World | None = None


def world(force: bool = False, timeout: float | None = None) -> World:
    """This process's World. Without an MPI launcher (and without ``force``) it is one process
    and mpi4py is not imported. ``timeout`` overrides ``PYTRANSFORMER_MPI_TIMEOUT``."""
    global _WORLD
    if timeout is not None:
        timeout = check_float("timeout", timeout, positive=True)
    if _WORLD is None or (force and _WORLD.comm is None):
        if not (force or launched_under_mpi()):
            return World(timeout=timeout or _DEFAULT_TIMEOUT)
        try:
            from mpi4py import MPI
        except ImportError:
            raise ImportError(
                "launched under MPI but mpi4py is not installed: pip install 'pytransformer[mpi]'"
            ) from None
        comm = MPI.COMM_WORLD
        _WORLD = World(comm.Get_rank(), comm.Get_size(), comm, _timeout_from_env(), MPI,
                       comm.Dup())
    if timeout is not None:
        _WORLD.timeout = timeout
    return _WORLD


class _Poller:
    """Polls a condition with a deadline; aborts the job when the deadline passes."""

    def __init__(self, w: World, what: str):
        self.world, self.what = w, what
        self.deadline = time.monotonic() + w.timeout

    def until(self, done: Callable[[], bool]) -> None:
        spins = 0
        w = self.world
        while not done():
            spins += 1
            if spins > 100:  # spin briefly for latency, then yield the core to the other ranks
                time.sleep(min(0.005, 1e-5 * spins))
                if spins % 20 == 0:
                    w.answer_roll_calls()
            if time.monotonic() > self.deadline:
                silent = w.silent_ranks()
                who = (
                    f"rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} did not answer"
                    if silent else "every rank answered"
                )
                w.abort(
                    f"no answer from the other ranks for {w.timeout:g} s in {self.what} "
                    f"({who}: hung, or busy outside MPI; {_TIMEOUT_VAR} sets the limit)"
                )


@contextlib.contextmanager
def guard(w: World | None = None) -> Iterator[World]:
    """Runs a block on every rank; an exception on any rank prints one line naming the rank
    and aborts the whole job (a rank that merely exited would leave the others waiting in
    their next collective). Without MPI the exception propagates unchanged."""
    w = world() if w is None else w
    if w.comm is None:
        yield w
        return
    try:
        yield w
    except SystemExit as exc:
        if exc.code not in (None, 0):
            w.abort(f"exited with status {exc.code}", exc.code if isinstance(exc.code, int) else 1)
        raise
    except KeyboardInterrupt:
        w.abort("interrupted", 130)
    except BaseException as exc:
        if os.environ.get("PYTRANSFORMER_DEBUG"):
            traceback.print_exc()
        w.abort(f"error: {type(exc).__name__}: {exc}")


# -- data --------------------------------------------------------------------------------------


class RankShare:
    """Rank ``rank`` of ``size``'s share of a DataSource: batches rank, rank+size, ... of the
    stream every rank's copy of ``source`` yields (build the same source with the same seed on
    every rank).

    Every rank's copy moves past all ``size`` batches of a round, so after each of its batches
    the copies stand at the same global position: ``state_dict`` is the source's own (rank 0's
    is the checkpoint) and loads at any rank count. The batches of other ranks are skipped with
    the source's ``skip(n)`` when it has one, else taken and dropped (their assembly is
    repeated on every rank, not their forward and backward).
    """

    def __init__(self, source: Any, rank: int, size: int):
        for m in ("next_batch", "state_dict", "load_state_dict"):
            if not callable(getattr(source, m, None)):
                raise TypeError(
                    f"source: expected a DataSource (TokenBatcher, ...), got "
                    f"{type(source).__name__} (no {m}())"
                )
        self.size = check_int("size", size, 1)
        self.rank = check_int("rank", rank, 0, self.size - 1)
        self.source = source

    def __getattr__(self, name: str) -> Any:
        # pad_id, bos_id, eos_id and the like are the source's
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    @property
    def epoch(self) -> int:
        return self.source.epoch

    def _skip(self, n: int) -> None:
        if n == 0:
            return
        skip = getattr(self.source, "skip", None)
        if callable(skip):
            skip(n)
            return
        for _ in range(n):
            self.source.next_batch()

    def next_batch(self) -> Any:
        self._skip(self.rank)
        batch = self.source.next_batch()
        self._skip(self.size - 1 - self.rank)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


# -- the gradient reduction --------------------------------------------------------------------


@dataclass
class _Bucket:
    """A slice [lo, hi) of the flat gradient buffer, reduced in one piece; ``layers``: the
    encoder/decoder layers whose backward must be done before it can start (none: after the
    whole backward)."""

    lo: int
    hi: int
    layers: set[int]
    recv: np.ndarray = field(default=None, repr=False)
    shard: np.ndarray = field(default=None, repr=False)


def _shards(n: int, size: int) -> tuple[list[int], list[int]]:
    counts = [n // size + (r < n % size) for r in range(size)]
    return counts, [int(x) for x in np.cumsum([0] + counts[:-1])]


def _layers_in_backward_order(model: Any) -> list[tuple[str, Any]]:
    """(parameter-name prefix, module) of the modules whose gradients are final when their
    backward returns, in the order it returns: the decoder's layers from the last, the target
    embedding (when the source embedding does not share its table: with the output layer it
    may, which runs first), then the encoder's layers from the last."""
    found = []
    for stack in ("decoder", "encoder"):
        layers = getattr(getattr(model, stack, None), "layers", None) or []
        for i in reversed(range(len(layers))):
            found.append((f"{stack}.layers.{i}.", layers[i]))
        tgt, src = getattr(model, "tgt_embed", None), getattr(model, "src_embed", None)
        if stack == "decoder" and tgt is not None and hasattr(tgt, "backward") and (
            src is None or getattr(src, "weight", None) is not getattr(tgt, "weight", None)
        ):
            found.append(("tgt_embed.", tgt))
    return found


def _param_regions(model: Any, flat: np.ndarray) -> list[tuple[str, int, int]]:
    """(name, lo, hi) of every gradient in the flat buffer, each extended to the next one's
    start (so the alignment gaps belong to someone)."""
    base = flat.ctypes.data
    spans = sorted(((g.ctypes.data - base) // 4, name) for name, g in model.gradients().items())
    regions = []
    for k, (lo, name) in enumerate(spans):
        hi = spans[k + 1][0] if k + 1 < len(spans) else flat.size
        regions.append((name, int(lo), int(hi)))
    return regions


def plan_buckets(model: Any, flat: np.ndarray, bucket_bytes: int) -> tuple[list[_Bucket], list]:
    """Splits [0, flat.size) into buckets in the order they can start: runs of consecutive
    layers (in backward order, adjacent in the buffer) up to ``bucket_bytes``, then what no
    layer owns (embeddings, output layer, final norms), started after the backward. Returns the
    buckets and the layers to hook."""
    regions = _param_regions(model, flat)
    layers = _layers_in_backward_order(model)
    owner = np.full(flat.size, -1, np.int64)
    hooked = []
    for j, (prefix, layer) in enumerate(layers):
        mine = [(lo, hi) for name, lo, hi in regions if name.startswith(prefix)]
        if not mine:
            continue
        lo, hi = min(a for a, _ in mine), max(b for _, b in mine)
        if sum(b - a for a, b in mine) != hi - lo or (owner[lo:hi] != -1).any():
            continue  # not one contiguous slice of its own: reduced after the backward
        owner[lo:hi] = j
        hooked.append((j, layer, lo, hi))
    buckets: list[_Bucket] = []
    limit = max(1, bucket_bytes // 4)
    for j, _, lo, hi in hooked:
        last = buckets[-1] if buckets else None
        if last is not None and last.lo == hi and last.hi - lo <= limit:
            last.lo = lo
            last.layers.add(j)
        else:
            buckets.append(_Bucket(lo, hi, {j}))
    buckets = [  # a layer larger than a bucket (an embedding table) goes in several
        _Bucket(a, min(b.hi, a + limit), b.layers)
        for b in buckets
        for a in range(b.lo, b.hi, limit)
    ]
    rest = np.flatnonzero(owner == -1)
    if rest.size:
        cuts = np.flatnonzero(np.diff(rest) != 1)
        starts = np.concatenate(([rest[0]], rest[cuts + 1]))
        stops = np.concatenate((rest[cuts] + 1, [rest[-1] + 1]))
        for lo, hi in zip(starts.tolist(), stops.tolist(), strict=True):
            for a in range(lo, hi, limit):
                buckets.append(_Bucket(a, min(hi, a + limit), set()))
    return buckets, [(j, layer) for j, layer, _, _ in hooked]


class _Reduction:
    """One update's reduction: buckets start in plan order as their layers finish; each goes
    through an all-to-all (reduce-scatter in rank order) on one communicator and an all-gather
    on another, so the two phases of different buckets never cross in a communicator."""

    def __init__(self, reducer: MPIReducer, flat: np.ndarray, buckets: list[_Bucket], finish):
        self.r, self.flat, self.buckets, self.finish = reducer, flat, buckets, finish
        self.done_layers: set[int] = set()
        self.next_start = 0  # buckets[:next_start] started (phase 1)
        self.next_gather = 0  # buckets[:next_gather] in phase 2
        self.phase1: list[Any] = []
        self.phase2: list[Any] = []
        self.lock = threading.Lock()  # the backward's hooks and the progress thread
        self.error: BaseException | None = None

    def layer_done(self, j: int) -> None:
        if j in self.done_layers:  # its buckets may be on their way: a second pass would be lost
            raise RuntimeError("a hooked module's backward ran twice in one pass")
        with self.lock:
            self.done_layers.add(j)
            self._start_ready(all_ready=False)
            self.progress()

    def drive(self, period: float) -> Callable[[], None]:
        """Calls progress() from a thread every ``period`` seconds while the backward computes
        (MPI moves a large message on only inside an MPI call, and the kernels release the GIL);
        returns the function that stops the thread."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(period):
                with self.lock:
                    if self.error is not None:
                        return
                    try:
                        self.progress()
                    except BaseException as exc:  # reported by complete() on the main thread
                        self.error = exc

        thread = threading.Thread(target=loop, name="pytransformer-mpi-progress", daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join()

        return halt

    def _start_ready(self, all_ready: bool) -> None:
        r = self.r
        while self.next_start < len(self.buckets):
            b = self.buckets[self.next_start]
            if not (all_ready or (b.layers and b.layers <= self.done_layers)):
                return
            self.finish(0, b.lo, b.hi)
            counts, displs = _shards(b.hi - b.lo, r.size)
            mine = counts[r.rank]
            if b.recv is None or b.recv.size != mine * r.size:
                b.recv = np.empty(mine * r.size, np.float32)
                b.shard = np.empty(mine, np.float32)
            recv_spec = [b.recv, ([mine] * r.size, [mine * k for k in range(r.size)]), r.FLOAT]
            send_spec = [self.flat[b.lo : b.hi], (counts, displs), r.FLOAT]
            self.phase1.append(r.scatter_comm.Ialltoallv(send_spec, recv_spec))
            self.next_start += 1

    def progress(self) -> bool:
        """Moves every bucket as far as it can go; True when all are complete."""
        r = self.r
        while self.next_gather < self.next_start and self.phase1[self.next_gather].Test():
            b = self.buckets[self.next_gather]
            pieces = b.recv.reshape(r.size, -1)
            if r.size == 1:
                b.shard[...] = pieces[0]
            else:
                np.add(pieces[0], pieces[1], out=b.shard)
                for k in range(2, r.size):
                    b.shard += pieces[k]
            counts, displs = _shards(b.hi - b.lo, r.size)
            out = [self.flat[b.lo : b.hi], (counts, displs), r.FLOAT]
            self.phase2.append(r.gather_comm.Iallgatherv([b.shard, r.FLOAT], out))
            self.next_gather += 1
        if self.next_gather < len(self.buckets):
            return False
        return all(q.Test() for q in self.phase2)

    def complete(self) -> None:
        if self.error is not None:
            raise self.error
        self._start_ready(all_ready=True)
        t0 = time.perf_counter()
        _Poller(self.r.world, "the gradient reduction").until(self.progress)
        self.r.comm_seconds += time.perf_counter() - t0


class MPIReducer:
    """The Trainer's ``reducer`` under MPI (see the module docstring): a deterministic bucketed
    gradient sum, rank-order sums of scalars, rank 0's stop decisions, barriers, each with the
    world's deadline. ``bucket_mb``: the size of a bucket (PyTorch DDP's default, 25 MB);
    ``overlap``: start buckets during the backward (False: all after it); ``progress_thread``:
    a thread drives the started buckets every ``progress_ms`` while the backward computes (when
    MPI was initialised with MPI_THREAD_MULTIPLE, mpi4py's default request); without it they
    move on only at the layer hooks.

    ``comm_seconds`` adds up the time spent waiting for other ranks (what the backward did not
    hide); ``buckets`` is the last plan, as (lo, hi, hooked) triples."""

    def __init__(
        self,
        w: World | None = None,
        *,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        progress_thread: bool = True,
        progress_ms: float = 1.0,
    ):
        w = world() if w is None else w
        if not isinstance(w, World):
            raise TypeError(f"world: expected a distributed.World, got {type(w).__name__}")
        self.world, self.rank, self.size = w, w.rank, w.size
        self.bucket_bytes = int(check_float("bucket_mb", bucket_mb, positive=True) * 2**20)
        self.overlap = bool(overlap)
        self.progress_period = check_float("progress_ms", progress_ms, positive=True) / 1000.0
        self.progress_thread = bool(progress_thread) and self.overlap and (
            w._mpi is not None and w._mpi.Query_thread() >= w._mpi.THREAD_MULTIPLE
        )
        self.comm_seconds = 0.0
        self._plan: tuple[Any, ...] | None = None
        if w.comm is not None:
            self.FLOAT, self.DOUBLE = w._mpi.FLOAT, w._mpi.DOUBLE
            self.scatter_comm, self.gather_comm = w.comm.Dup(), w.comm.Dup()
            self.ctl_comm = w.comm.Dup()

    @property
    def buckets(self) -> list[tuple[int, int, bool]]:
        return [] if self._plan is None else [(b.lo, b.hi, bool(b.layers)) for b in self._plan[2]]

    @property
    def hooked_modules(self) -> int:
        """How many modules of the last plan start buckets from their backward."""
        return 0 if self._plan is None else len(self._plan[1])

    def _buckets_for(self, model: Any, flat: np.ndarray) -> tuple[list[_Bucket], list]:
        key = (id(model), flat.ctypes.data, flat.size)
        if self._plan is None or self._plan[0] != key:
            self._check_same_model(model, flat)
            buckets, hooks = plan_buckets(model, flat, self.bucket_bytes)
            self._plan = (key, hooks, buckets)
        return self._plan[2], self._plan[1]

    def _check_same_model(self, model: Any, flat: np.ndarray) -> None:
        """Every rank must start from the same parameters (same seed or checkpoint): checked
        once, by a checksum of the parameters and the buffer's size."""
        params = getattr(model, "param_buffer", None)
        data = params if isinstance(params, np.ndarray) else flat
        mine = np.array([zlib.crc32(memoryview(data).cast("B")), flat.size], np.float64)
        rows = np.empty((self.size, 2), np.float64)
        self.world.wait([self.ctl_comm.Iallgather(mine, rows)], "comparing the models")
        differ = [r for r in range(self.size) if not np.array_equal(rows[r], rows[0])]
        if differ:
            raise ValueError(
                f"model: the parameters of rank(s) {differ} differ from rank 0's (build the model "
                "with the same seed, or load the same checkpoint, on every rank)"
            )

    @contextlib.contextmanager
    def reducing(self, model: Any, grads: list[np.ndarray], finish) -> Iterator[None]:
        """See ``trainer.GradientReducer.reducing``."""
        if len(grads) != 1:
            raise TypeError("model: data-parallel training needs a model with a flat grad_buffer")
        flat = grads[0]
        if self.size == 1:
            yield
            finish(0, 0, flat.size)
            return
        buckets, hooks = self._buckets_for(model, flat)
        run = _Reduction(self, flat, buckets, finish)
        restore = _hook_layers(hooks, run.layer_done) if self.overlap else (lambda: None)
        halt = run.drive(self.progress_period) if self.progress_thread else (lambda: None)
        try:
            yield
        finally:
            halt()
            restore()
        run.complete()

    def sum_in_rank_order(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, np.float64).reshape(-1)
        if self.size == 1:
            return values
        rows = np.empty((self.size, values.size), np.float64)
        t0 = time.perf_counter()
        self.world.wait([self.ctl_comm.Iallgather(values, rows)], "a sum over the ranks")
        self.comm_seconds += time.perf_counter() - t0
        out = rows[0].copy()
        for k in range(1, self.size):
            out += rows[k]
        return out

    def agree(self, value: Any) -> Any:
        if self.size == 1:
            return value
        buf = np.zeros(_AGREE_BYTES, np.uint8)
        if self.rank == 0:
            data = json.dumps(value).encode()
            if len(data) > _AGREE_BYTES - 4:
                raise ValueError(f"agree: value too long ({len(data)} bytes as JSON)")
            buf[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
            buf[4 : 4 + len(data)] = np.frombuffer(data, np.uint8)
        self.world.wait([self.ctl_comm.Ibcast(buf, root=0)], "the stop decision")
        n = int(buf[:4].view(np.uint32)[0])
        return json.loads(buf[4 : 4 + n].tobytes().decode())

    def barrier(self) -> None:
        if self.size > 1:
            self.world.wait([self.ctl_comm.Ibarrier()], "waiting for rank 0's checkpoint")


def _hook_layers(hooks: list[tuple[int, Any]], done: Callable[[int], None]) -> Callable[[], None]:
    """Wraps each layer's ``backward`` (on the instance) to call ``done(j)`` after it; returns
    the function that takes the wrappers off again."""
    wrapped = []
    for j, layer in hooks:
        original = layer.backward

        def backward(*args: Any, _original=original, _j=j, **kwargs: Any) -> Any:
            out = _original(*args, **kwargs)
            done(_j)
            return out

        try:
            layer.backward = backward
        except AttributeError:  # a layer with __slots__: its bucket waits for the backward
            continue
        wrapped.append(layer)

    def restore() -> None:
        for layer in wrapped:
            layer.__dict__.pop("backward", None)

    return restore


# -- sharded work ------------------------------------------------------------------------------


def map_blocks(
    w: World,
    items: Sequence[Any],
    fn: Callable[[Sequence[Any]], list[Any]],
    block: int,
    on_block: Callable[[int, list[Any]], None] | None = None,
) -> list[Any] | None:
    """``fn`` over consecutive blocks of ``block`` items, block k on rank k mod size. Rank 0
    returns every result in input order (and calls ``on_block(start, results)`` for each block
    in order, as soon as it and all before it are in); the other ranks return None. ``fn`` must
    return one result per item. The blocks are the ones a single process would cut, so the
    results are those of a one-process run whenever fn's result depends on the block alone."""
    block = check_int("block", block, 1)
    starts = list(range(0, len(items), block))
    mine = starts[w.rank :: w.size]
    if w.size == 1 or w.comm is None:
        out: list[Any] = []
        for s in starts:
            res = _checked(fn, items, s, block)
            if on_block is not None:
                on_block(s, res)
            out.extend(res)
        return out
    if not w.is_root:
        sends = [w.comm.isend((s, _checked(fn, items, s, block)), dest=0, tag=17) for s in mine]
        w.wait(sends, "sending results to rank 0")
        return None
    return _gather_blocks(w, items, fn, block, starts, on_block)


def _checked(fn: Callable, items: Sequence[Any], start: int, block: int) -> list[Any]:
    chunk = items[start : start + block]
    res = list(fn(chunk))
    if len(res) != len(chunk):
        raise ValueError(f"fn: returned {len(res)} results for a block of {len(chunk)} items")
    return res


def _gather_blocks(w, items, fn, block, starts, on_block) -> list[Any]:
    """Rank 0: its own blocks interleaved with receiving the others'; delivers in order."""
    results: dict[int, list[Any]] = {}
    delivered = 0

    def deliver() -> None:
        nonlocal delivered
        while delivered < len(starts) and starts[delivered] in results:
            if on_block is not None:
                on_block(starts[delivered], results[starts[delivered]])
            delivered += 1

    def receive_waiting() -> bool:
        got = False
        while w.comm.Iprobe(source=w._mpi.ANY_SOURCE, tag=17):
            s, res = w.comm.recv(source=w._mpi.ANY_SOURCE, tag=17)
            results[s] = res
            got = True
        return got

    for s in starts[:: w.size]:
        results[s] = _checked(fn, items, s, block)
        receive_waiting()
        deliver()
    while len(results) < len(starts):
        poller = _Poller(w, "collecting the other ranks' results")
        poller.until(receive_waiting)  # the deadline restarts with every block received
        deliver()
    deliver()
    return [r for s in starts for r in results[s]]
