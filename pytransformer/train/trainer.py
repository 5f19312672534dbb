"""The training loop: updates, validation, progress, a JSON-lines log and resumable checkpoints.

A run is a pure function of (initial weights, data, seed, settings): the batch order comes from
the data source's seeded generator (a TokenBatcher, an ImageBatcher, any ``DataSource``), dropout
masks from a seed derived from (seed, step, micro-batch), and the kernels give the same bits at
any thread count. A checkpoint stores all of that state, so ``load_checkpoint`` + ``fit``
continues bit-identically to an uninterrupted run.

Checkpoint layout (one directory per saved step under ``checkpoint_dir``)::

    step-00001000/
        config.json, model.safetensors   the model (model.save)
        optimizer.safetensors            Adam moments m/<name>, v/<name>; step in the metadata
        trainer.json                     step, data order state, counters, settings
    log.jsonl                            the training log (default location)

Each step directory is written under a temporary name and renamed into place when complete, so
a crash never leaves a half-written checkpoint that looks finished. The temporary directory of a
save killed part-way is removed by the next save in that root (once its process is gone).

Log records (one JSON object per line): every ``log_every`` updates
``{"step", "epoch", "train_loss", "lr", "grad_norm", "tokens_per_s", "tokens", "elapsed_s"}``
(train_loss: mean label-smoothed loss per target token over the interval; tokens/s: non-pad
target tokens per second of training time); after each validation
``{"step", "valid_loss", "valid_ppl", "valid_tokens", "elapsed_s", ...}`` (loss without
smoothing, per token; plus what ``valid_metrics`` returns, such as ``valid_bleu``, and
``"best": true`` when ``best_metric`` improved); at the end of ``fit`` ``{"step", "stop"}``
(why it stopped: max_steps, max_time, max_epochs or early_stopping).
"Tokens" are the batches' ``n_targets``: target tokens for token batches, images for images.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from .. import io
from ..checks import check_float, check_int
from .data import TokenBatcher
from .optim import Adam

__all__ = ["Trainer", "DataSource", "TrainBatch", "GradientReducer", "latest_checkpoint"]

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# A save (tmp) or a removal (del) in progress, named with the id of the process doing it.
_TMP_STEP_DIR = re.compile(r"^\.(?:step-\d{8,}|best)\.(?:tmp|del)-(\d+)$")
_MASK64 = (1 << 64) - 1
_RANKS_HINT = " (accumulate counts the batches of an update over all ranks: accumulate x ranks)"
_FORMAT = "pytransformer-trainer"
_OPT_FILE, _STATE_FILE, _LOG_FILE = "optimizer.safetensors", "trainer.json", "log.jsonl"
BEST_DIR = "best"  # under checkpoint_dir: the model of the best validation so far


class TrainBatch(Protocol):
    """A batch as the Trainer sees it: the model's loss_and_grad reads the rest."""

    @property
    def n_targets(self) -> int:
        """What the batch's mean loss averages over (target tokens, images): the weight of its
        gradient in an accumulated update, and the count in the log."""
        ...


class DataSource(Protocol):
    """Training data as the Trainer takes it (TokenBatcher and ImageBatcher are two): an endless
    stream of batches whose position is checkpointed and restored exactly.

    A source that also has ``pad_id``, ``bos_id`` and ``eos_id`` (token data) must agree with the
    model's config on them.
    """

    epoch: int  # epochs completed, for the log

    def next_batch(self) -> TrainBatch:
        """The next batch (a new epoch begins after the last one of an epoch)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable position in the stream."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Goes back to a position `state_dict` returned (ValueError when it does not fit)."""
        ...


_SOURCE_METHODS = ("next_batch", "state_dict", "load_state_dict")

# finish(k, lo, hi): completes the local gradient of grads[k][lo:hi] (see Trainer.train_step).
Finish = Callable[[int, int, int], None]


class GradientReducer(Protocol):
    """How the processes of a data-parallel run combine their work (one process: nothing to
    combine; ``distributed.MPIReducer`` under mpiexec). Rank 0 alone writes logs and
    checkpoints. Every method is collective: all ranks call it in the same order."""

    rank: int
    size: int

    def reducing(self, model: Any, grads: list[np.ndarray], finish: Finish) -> Any:
        """A context around the last local backward pass of an update. ``finish(k, lo, hi)``
        must be called once on every element of ``grads`` (buckets may be finished while the
        backward still runs); on exit ``grads`` holds the sum over ranks in rank order."""
        ...

    def sum_in_rank_order(self, values: np.ndarray) -> np.ndarray:
        """The float64 ``values`` of every rank added in rank order."""
        ...

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` (JSON-serialisable) on every rank: stop decisions are made once."""
        ...

    def barrier(self) -> None:
        """Waits for every rank (after rank 0 wrote a checkpoint)."""
        ...


class _OneProcess:
    """The reducer of a run in one process."""

    rank, size = 0, 1

    @contextlib.contextmanager
    def reducing(self, model: Any, grads: list[np.ndarray], finish: Finish) -> Iterator[None]:
        yield
        for k, g in enumerate(grads):
            finish(k, 0, g.size)

    def sum_in_rank_order(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64)

    def agree(self, value: Any) -> Any:
        return value

    def barrier(self) -> None:
        pass


def _check_data_source(train_data: Any) -> None:
    missing = [m for m in _SOURCE_METHODS if not callable(getattr(train_data, m, None))]
    if missing or not hasattr(train_data, "epoch"):
        raise TypeError(
            f"train_data: expected a TokenBatcher, an ImageBatcher or another DataSource, got "
            f"{type(train_data).__name__} (it lacks {', '.join(missing) or 'epoch'})"
        )


def _check_special_ids(config: Any, train_data: Any) -> None:
    """Token data must pad and mark sentences with the ids the model was built for."""
    for name in ("pad_id", "bos_id", "eos_id"):
        if not (hasattr(config, name) and hasattr(train_data, name)):
            continue
        if getattr(config, name) != getattr(train_data, name):
            raise ValueError(
                f"train_data: {name}={getattr(train_data, name)} but the model's config has "
                f"{name}={getattr(config, name)}"
            )


def _step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def _process_running(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_saves(root: str) -> None:
    """Removes the temporary step directories of saves and removals whose process is gone
    (killed part-way: nothing else would ever remove them, and each can be as large as a
    checkpoint). None of them is a checkpoint any more or yet, so nothing is lost; one whose
    process still runs is left alone."""
    for name in os.listdir(root):
        m = _TMP_STEP_DIR.match(name)
        if m and not _process_running(int(m.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The newest complete checkpoint directory under ``root`` (None when there is none)."""
    dirs = _step_dirs(os.fspath(root))
    return dirs[-1][1] if dirs else None


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
    return check_int(name, value, 0 if allow_zero else 1)


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective scramble of a 64-bit integer."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _dropout_seed(seed: int, step: int, micro: int) -> int:
    """A 63-bit seed for one forward pass, distinct for every (run seed, step, micro-batch)."""
    h = _mix64(seed * 0x9E3779B97F4A7C15 + 1)
    h = _mix64(h ^ (step * 0xD1B54A32D192ED03))
    return _mix64(h ^ (micro + 0x632BE59BD9B4E019)) >> 1


def _check_reducer(reducer: Any) -> GradientReducer:
    names = ("reducing", "sum_in_rank_order", "agree", "barrier")
    missing = [m for m in names if not callable(getattr(reducer, m, None))]
    rank, size = getattr(reducer, "rank", None), getattr(reducer, "size", None)
    if missing or not (isinstance(rank, int) and isinstance(size, int) and 0 <= rank < size):
        raise TypeError(
            f"reducer: expected a GradientReducer (distributed.MPIReducer), got "
            f"{type(reducer).__name__}"
        )
    return reducer


def _check_optimizer_holds(model: Any, optimizer: Adam) -> None:
    """The optimizer must update the model's own arrays (not copies such as a state_dict)."""
    params = model.parameters()
    if params.keys() != optimizer.params.keys():
        raise ValueError("optimizer: its parameter names differ from model.parameters()")
    for name, p in params.items():
        q = optimizer.params[name]
        if q.ctypes.data != p.ctypes.data or q.shape != p.shape:
            raise ValueError(
                f"optimizer: params[{name!r}] is not the model's array (build the optimizer "
                "from model.parameters(), not from copies)"
            )


class Trainer:
    """Trains ``model`` with ``optimizer`` on batches from ``train_data``.

    model: a Transformer / TransformerLM / TransformerEncoderModel / VisionTransformer (anything
    with ``loss_and_grad``, ``evaluate_loss``, ``zero_grad``, ``gradients``, ``state_dict``,
    ``load_state_dict``, ``save``, ``train``, ``config``).
    optimizer: an ``optim.Adam``/``AdamW`` over ``model.parameters()``.
    train_data: a ``DataSource`` (TokenBatcher, ImageBatcher; its state is checkpointed).
    valid_data: a batcher or any iterable of batches the model takes (each with ``n_targets``),
    evaluated every ``valid_every`` updates (0: only when asked) and at the end.
    accumulate: batches per update (per rank under MPI: an update then takes ``accumulate x
    ranks`` batches); the gradient is that of the mean loss over all their targets.
    checkpoint_dir: where checkpoints go (None: no checkpoints); ``checkpoint_every`` updates
    (0: only at the end of ``fit``); the newest ``keep_checkpoints`` are kept.
    log_path: the JSON-lines log (default ``checkpoint_dir/log.jsonl``; None without a
    checkpoint_dir means no log file). progress: show a tqdm bar when tqdm is importable, plain
    lines on stderr every ``log_every`` updates otherwise; False for silence.
    reducer: how data-parallel processes combine gradients (``distributed.MPIReducer``; None:
    one process). Give every rank the same model, optimizer and settings, and as train_data its
    ``distributed.RankShare`` of one global stream; rank 0 alone logs, shows progress and writes
    checkpoints.

    The gradient of an update is a sum in a fixed order: each batch's gradient of its loss sum
    (mean-loss gradient x its target count), added one after the other, divided by the total
    count once. Across ranks the per-rank sums are added in rank order, so N ranks taking one
    batch each give the same bits as one process accumulating the same N batches.
    valid_metrics: called with the model after each validation loss; the numbers it returns
    (e.g. ``{"valid_bleu": ...}``) join the validation record.
    best_metric: a key of the validation record (``"valid_loss"``, ``"valid_bleu"``, ...); each
    improvement (lower for names ending in loss/ppl, higher otherwise) saves the model to
    ``checkpoint_dir/best``. patience: stop after this many validations in a row without an
    improvement of best_metric (early stopping; None: never).
    """

    def __init__(
        self,
        model: Any,
        optimizer: Adam,
        train_data: DataSource,
        *,
        valid_data: TokenBatcher | Iterable[TrainBatch] | None = None,
        label_smoothing: float = 0.1,
        seed: int = 0,
        accumulate: int = 1,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        keep_checkpoints: int = 3,
        valid_every: int = 0,
        log_path: str | os.PathLike | None = None,
        log_every: int = 50,
        progress: bool = True,
        reducer: GradientReducer | None = None,
        valid_metrics: Callable[[Any], dict[str, float]] | None = None,
        best_metric: str | None = None,
        patience: int | None = None,
    ):
        for attr in ("loss_and_grad", "evaluate_loss", "zero_grad", "gradients", "save", "train"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(f"model: expected a pytransformer model (no {attr}())")
        if not isinstance(optimizer, Adam):
            raise TypeError(
                f"optimizer: expected an optim.Adam/AdamW, got {type(optimizer).__name__}"
            )
        _check_data_source(train_data)
        label_smoothing = check_float("label_smoothing", label_smoothing, 0.0, 1.0)
        _check_optimizer_holds(model, optimizer)
        _check_special_ids(getattr(model, "config", None), train_data)
        self.model, self.optimizer, self.train_data = model, optimizer, train_data
        self.label_smoothing = float(label_smoothing)
        self.seed = _positive_int("seed", seed, allow_zero=True)
        self.accumulate = _positive_int("accumulate", accumulate)
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every, allow_zero=True)
        self.keep_checkpoints = _positive_int("keep_checkpoints", keep_checkpoints)
        self.valid_every = _positive_int("valid_every", valid_every, allow_zero=True)
        self.log_every = _positive_int("log_every", log_every)
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        if log_path is None and self.checkpoint_dir is not None:
            log_path = os.path.join(self.checkpoint_dir, _LOG_FILE)
        self.log_path = None if log_path is None else os.fspath(log_path)
        self.reducer = _OneProcess() if reducer is None else _check_reducer(reducer)
        self.is_writer = self.reducer.rank == 0
        self.progress = bool(progress) and self.is_writer
        self._accumulator: list[np.ndarray] | None = None
        self._valid = None if valid_data is None else list(valid_data)
        if self._valid is not None and not all(hasattr(b, "n_targets") for b in self._valid):
            raise TypeError(
                "valid_data: expected a batcher or an iterable of batches (Batch, ImageBatch)"
            )
        if self._valid is not None and sum(b.n_targets for b in self._valid) == 0:
            raise ValueError("valid_data: holds no target tokens")
        if valid_metrics is not None and not callable(valid_metrics):
            raise TypeError("valid_metrics: expected a callable taking the model")
        if best_metric is not None and not isinstance(best_metric, str):
            raise TypeError(f"best_metric: expected a str, got {type(best_metric).__name__}")
        if patience is not None and best_metric is None:
            raise ValueError("patience: early stopping needs a best_metric to watch")
        self.valid_metrics, self.best_metric = valid_metrics, best_metric
        self.patience = None if patience is None else _positive_int("patience", patience)
        self.step = 0  # updates done
        self.tokens_seen = 0  # non-pad target tokens trained on
        self.elapsed = 0.0  # seconds spent in fit, over every run that led to this state
        self.best: dict[str, Any] | None = None  # {"step", "value"} of the best validation
        self.bad_validations = 0  # validations since the best one
        self.last_valid: dict[str, float] | None = None
        self.clock: Callable[[], float] = time.perf_counter  # what max_time is measured with
        self._limits: dict[str, Any] = {}
        self._interval = {"loss": 0.0, "tokens": 0, "time": 0.0}
        self._started = time.perf_counter()

    # -- one update -------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer update on ``accumulate`` batches (per rank). Returns {"loss" (mean
        label-smoothed loss per target token), "tokens", "lr", "grad_norm", "seconds"}.

        The gradient is sum_j n_j g_j / N in a fixed order (g_j: batch j's mean-loss gradient,
        n_j its target count, N the update's total): every batch's backward runs on a zeroed
        buffer, is scaled by n_j and added to the running sum; the ranks' sums are added in rank
        order by the reducer, and the division by N comes last. What that costs over scaling
        in place: one multiply per batch over the gradient, and with ``accumulate`` > 1 one
        add per batch and an extra buffer the size of the gradients."""
        t0 = time.perf_counter()
        self.model.train()
        batches = [self.train_data.next_batch() for _ in range(self.accumulate)]
        counts = [b.n_targets for b in batches]
        if self.reducer.size == 1 and sum(counts) == 0:
            raise ValueError(f"update {self.step + 1}: the batches hold no target tokens")
        grads = self._gradient_arrays()
        acc = self._accumulator_arrays(grads) if len(batches) > 1 else None
        rank, size = self.reducer.rank, self.reducer.size
        loss_sum, last = 0.0, len(batches) - 1
        for i, batch in enumerate(batches):
            self.model.zero_grad()
            step: Any = contextlib.nullcontext()
            if i == last:
                fold = self._fold_last(grads, acc, np.float32(counts[i]), first=i == 0)
                step = self.reducer.reducing(self.model, grads, fold)
            with step:
                s, _ = self.model.loss_and_grad(
                    batch,
                    label_smoothing=self.label_smoothing,
                    dropout_seed=_dropout_seed(self.seed, self.step + 1, i * size + rank),
                )
            loss_sum += s
            if i < last:
                self._fold_into(acc, grads, np.float32(counts[i]), first=i == 0)
        loss_sum, total = self.reducer.sum_in_rank_order(np.array([loss_sum, sum(counts)]))
        total = int(total)
        if total == 0:
            raise ValueError(f"update {self.step + 1}: the batches hold no target tokens")
        loss = float(loss_sum) / total
        if not math.isfinite(loss):
            raise FloatingPointError(f"update {self.step + 1}: the loss is {loss}")
        for g in grads:
            np.divide(g, np.float32(total), out=g)
        info = self.optimizer.step(self.model.gradients())
        self.step += 1
        self.tokens_seen += total
        seconds = time.perf_counter() - t0
        return {"loss": loss, "tokens": total, "seconds": seconds, **info}

    def _gradient_arrays(self) -> list[np.ndarray]:
        """The gradients as 1-D views: the flat buffer when the model has one."""
        flat = getattr(self.model, "grad_buffer", None)
        if isinstance(flat, np.ndarray):
            return [flat]
        return [g.reshape(-1) for g in self.model.gradients().values()]

    def _accumulator_arrays(self, grads: list[np.ndarray]) -> list[np.ndarray]:
        acc = self._accumulator
        if acc is None or [a.shape for a in acc] != [g.shape for g in grads]:
            acc = self._accumulator = [np.empty_like(g) for g in grads]
        return acc

    @staticmethod
    def _fold_into(
        acc: list[np.ndarray], grads: list[np.ndarray], n: np.float32, first: bool
    ) -> None:
        """acc (+)= n x grads, for a batch before the last of an update."""
        for a, g in zip(acc, grads, strict=True):
            if first:
                np.multiply(g, n, out=a)
            else:
                g *= n
                a += g

    @staticmethod
    def _fold_last(
        grads: list[np.ndarray], acc: list[np.ndarray] | None, n: np.float32, first: bool
    ) -> Finish:
        """finish(k, lo, hi) for the last batch: grads = n x grads (+ acc), slice by slice (the
        reducer may call it bucket by bucket while the backward still runs)."""

        def finish(k: int, lo: int, hi: int) -> None:
            g = grads[k][lo:hi]
            g *= n
            if not first:
                g += acc[k][lo:hi]  # addition commutes bit for bit: the same as acc + n g

        return finish

    # -- validation -------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Loss per target token (no smoothing, no dropout) and perplexity on the validation set."""
        if self._valid is None:
            raise ValueError("evaluate: no valid_data was given")
        loss_sum, tokens = 0.0, 0
        for s, n in self._valid_sums():
            loss_sum += s
            tokens += int(n)
        loss = loss_sum / tokens
        result: dict[str, Any] = {
            "valid_loss": loss,
            "valid_ppl": math.exp(min(loss, 700.0)),
            "valid_tokens": tokens,
        }
        if self.valid_metrics is not None:
            result.update(self.valid_metrics(self.model))
        self.last_valid = result
        record = {"step": self.step, **result, "elapsed_s": self.elapsed}
        if self._track_best(result):
            record["best"] = True
        self._log(record)
        return result

    def _valid_sums(self) -> np.ndarray:
        """(loss sum, tokens) of every validation batch, in order. Under MPI rank r evaluates
        batches r, r+N, ...; the others' entries are zeros, so the sum over ranks is each
        batch's own numbers and the totals add up as in one process."""
        rank, size = self.reducer.rank, self.reducer.size
        sums = np.zeros((len(self._valid), 2), np.float64)
        for i in range(rank, len(self._valid), size):
            sums[i] = self.model.evaluate_loss(self._valid[i])
        return self.reducer.sum_in_rank_order(sums).reshape(-1, 2)
    def _track_best(self, result: dict[str, Any]) -> bool:
        """Updates the best validation (saving its model) and the early-stopping count."""
        name = self.best_metric
        if name is None or name not in result:
            return False
        value = float(result[name])
        lower = name.endswith(("loss", "ppl"))
        if self.best is not None and not (
            value < self.best["value"] if lower else value > self.best["value"]
        ):
            self.bad_validations += 1
            return False
        self.best = {"step": self.step, "value": value, "metric": name}
        self.bad_validations = 0
        if self.checkpoint_dir is not None:
            if self.is_writer:
                self._save_model_dir(os.path.join(self.checkpoint_dir, BEST_DIR))
            self.reducer.barrier()
        return True

    def _save_model_dir(self, final: str) -> None:
        """Saves the model (config.json + model.safetensors) to ``final`` atomically."""
        root = os.path.dirname(final)
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f".{os.path.basename(final)}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save(tmp)
            io.fsync_dir(tmp)
            self._put_in_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- the loop ---------------------------------------------------------------------------------

    def fit(
        self,
        max_steps: int | None = None,
        *,
        max_time: float | None = None,
        max_epochs: int | None = None,
    ) -> dict[str, Any]:
        """Trains until the first limit is reached: ``self.step == max_steps`` (an absolute count,
        so a resumed run is given the same number), ``max_time`` seconds spent in ``fit`` (over
        every run that led here, resumed ones included; checked before each update, so it stops
        within one update of the budget), ``max_epochs`` passes over the data, or early
        stopping (``patience``). At least one of the three limits is needed.

        Validates every ``valid_every`` updates and at the end (when there is validation data),
        checkpoints every ``checkpoint_every`` updates and at the end. Returns {"step",
        "train_loss" (of the last update), "tokens_seen", "elapsed_s", "stop" (the reason),
        "best" (step and value of the best validation, or None), **last validation}."""
        if max_steps is None and max_time is None and max_epochs is None:
            raise ValueError("fit: give max_steps, max_time or max_epochs (else it never ends)")
        self._limits = {
            "max_steps": None if max_steps is None
            else _positive_int("max_steps", max_steps, allow_zero=True),
            "max_time": None if max_time is None else check_float("max_time", max_time, 0.0),
            "max_epochs": None if max_epochs is None
            else _positive_int("max_epochs", max_epochs, allow_zero=True),
        }
        bar = self._progress_bar(max_steps)
        last: dict[str, float] = {}
        base, started = self.elapsed, self.clock()

        def tick() -> None:
            self.elapsed = base + (self.clock() - started)

        try:
            while (reason := self._agree(self._stop_reason())) is None:
                last = self.train_step()
                self._account(last, bar)
                tick()
                if (
                    self.valid_every
                    and self._valid is not None
                    and self.step % self.valid_every == 0
                ):
                    self.evaluate()
                    tick()
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                    tick()
        finally:
            if bar is not None:
                bar.close()
        if self._interval["tokens"]:
            self._flush_interval(None)
        if self._valid is not None and (not self.valid_every or self.step % self.valid_every):
            self.evaluate()
            tick()
        self._log({"step": self.step, "stop": reason, "elapsed_s": self.elapsed})
        if self.checkpoint_dir is not None and (
            not self.checkpoint_every or self.step % self.checkpoint_every
        ):
            self.save_checkpoint()
        return {
            "step": self.step,
            "train_loss": last.get("loss", math.nan),
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed,
            "stop": reason,
            "best": self.best,
            **(self.last_valid or {}),
        }

    def _epochs_done(self) -> int:
        """Whole passes over the training data so far (a source that exposes its position within
        the epoch, as the batchers do, counts an epoch whose last batch was taken as done)."""
        data = self.train_data
        done = int(data.epoch)
        position, size = getattr(data, "position", None), getattr(data, "__len__", None)
        if position is not None and size is not None and position == size():
            done += 1
        return done

    def _stop_reason(self) -> str | None:
        """Why training stops now, or None to go on: every stop decision of ``fit`` is taken here
        (one place to make collective when several processes train together)."""
        limits = self._limits
        if limits.get("max_steps") is not None and self.step >= limits["max_steps"]:
            return "max_steps"
        if limits.get("max_time") is not None and self.elapsed >= limits["max_time"]:
            return "max_time"
        if limits.get("max_epochs") is not None and self._epochs_done() >= limits["max_epochs"]:
            return "max_epochs"
        if self.patience is not None and self.bad_validations >= self.patience:
            return "early_stopping"
        return None

    def _agree(self, reason: str | None) -> str | None:
        """Rank 0's stop decision, on every rank (each rank's clock and signals differ; one
        process: the reason itself)."""
        return self.reducer.agree(reason)

    def _progress_bar(self, max_steps: int | None):
        if not self.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(
            total=max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True
        )

    def _account(self, info: dict[str, float], bar) -> None:
        """Adds one update to the logging interval; logs/prints at interval ends."""
        iv = self._interval
        iv["loss"] += info["loss"] * info["tokens"]
        iv["tokens"] += info["tokens"]
        iv["time"] += info["seconds"]
        iv["lr"], iv["grad_norm"] = info["lr"], info["grad_norm"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{info['loss']:.3f}",
                lr=f"{info['lr']:.2e}",
                tok_s=f"{info['tokens'] / max(info['seconds'], 1e-9):.0f}",
                refresh=False,
            )
        if self.step % self.log_every == 0:
            self._flush_interval(bar)

    def _flush_interval(self, bar) -> None:
        iv = self._interval
        record = {
            "step": self.step,
            "epoch": self.train_data.epoch,
            "train_loss": iv["loss"] / max(iv["tokens"], 1),
            "lr": iv["lr"],
            "grad_norm": iv["grad_norm"],
            "tokens_per_s": iv["tokens"] / max(iv["time"], 1e-9),
            "tokens": self.tokens_seen,
            "elapsed_s": time.perf_counter() - self._started,
        }
        self._log(record)
        if self.progress and bar is None:
            print(
                f"step {record['step']}  loss {record['train_loss']:.4f}  lr {record['lr']:.3e}  "
                f"tok/s {record['tokens_per_s']:.0f}",
                file=sys.stderr,
                flush=True,
            )
        self._interval = {"loss": 0.0, "tokens": 0, "time": 0.0}

    def _log(self, record: dict[str, Any]) -> None:
        if self.log_path is None or not self.is_writer:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints ------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        lr = self.optimizer.lr
        return {
            "format": _FORMAT,
            "version": 1,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "seed": self.seed,
            "accumulate": self.accumulate * self.reducer.size,  # batches per update, all ranks
            "ranks": self.reducer.size,
            "label_smoothing": self.label_smoothing,
            "model_class": type(self.model).__name__,
            "data": self.train_data.state_dict(),
            "schedule": lr.to_dict()
            if hasattr(lr, "to_dict")
            else lr
            if not callable(lr)
            else None,
            "last_valid": self.last_valid,
            "elapsed_s": self.elapsed,
            "best": self.best,
            "bad_validations": self.bad_validations,
        }

    def save_checkpoint(self) -> str:
        """Writes the current state to ``checkpoint_dir/step-XXXXXXXX`` atomically; prunes old
        ones. Returns the directory. Under MPI rank 0 writes and every rank waits for it."""
        if self.checkpoint_dir is None:
            raise ValueError("save_checkpoint: no checkpoint_dir was given")
        final = os.path.join(self.checkpoint_dir, f"step-{self.step:08d}")
        if self.is_writer:
            self._write_checkpoint(final)
        self.reducer.barrier()
        return final

    def _write_checkpoint(self, final: str) -> None:
        root = self.checkpoint_dir
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f".step-{self.step:08d}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save(tmp)
            opt = self.optimizer.state_dict()
            tensors = {f"m/{k}": a for k, a in opt["m"].items()}
            tensors.update({f"v/{k}": a for k, a in opt["v"].items()})
            meta = {"step": str(opt["step"]), "hyper": json.dumps(opt["hyper"])}
            io.save_safetensors(os.path.join(tmp, _OPT_FILE), tensors, meta)
            text = json.dumps(self._trainer_state(), indent=1)
            io.atomic_write_text(os.path.join(tmp, _STATE_FILE), text)
            io.fsync_dir(tmp)
            self._put_in_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()

    @staticmethod
    def _put_in_place(tmp: str, final: str) -> None:
        """Renames the finished tmp directory to final (replacing an older one of the same step)."""
        old = None
        if os.path.exists(final):
            old = final + f".old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        io.fsync_dir(os.path.dirname(final))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        root = self.checkpoint_dir
        for step, path in _step_dirs(root)[: -self.keep_checkpoints]:
            # Renamed out of the step-* names first: a removal killed part-way must not leave a
            # directory that still looks like a complete checkpoint with half its files gone.
            doomed = os.path.join(root, f".step-{step:08d}.del-{os.getpid()}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        _remove_abandoned_saves(self.checkpoint_dir)

    def load_checkpoint(self, path: str | os.PathLike) -> str:
        """Restores model weights, optimizer moments and step, data order and counters from a
        checkpoint directory (``step-XXXXXXXX``) or from the newest one under a checkpoint root.
        Raises CheckpointError when it is missing, corrupt or was made for another model/data/
        settings. Returns the directory used."""
        path = os.fspath(path)
        if not os.path.exists(os.path.join(path, _STATE_FILE)):
            newest = latest_checkpoint(path)
            if newest is None:
                raise io.CheckpointError(f"{path}: no checkpoint (no trainer.json, no step-* dirs)")
            path = newest
        state = self._read_state(path)
        tensors, _ = io.load_safetensors(
            os.path.join(path, "model.safetensors"), require_checksum=True
        )
        opt_tensors, opt_meta = io.load_safetensors(
            os.path.join(path, _OPT_FILE), require_checksum=True
        )
        try:
            opt_state = {
                "step": int(opt_meta["step"]),
                "m": {k[2:]: v for k, v in opt_tensors.items() if k.startswith("m/")},
                "v": {k[2:]: v for k, v in opt_tensors.items() if k.startswith("v/")},
            }
            self.model.load_state_dict(tensors)
            self.optimizer.load_state_dict(opt_state)
            self.train_data.load_state_dict(state["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise io.CheckpointError(
                f"{path}: does not fit this model/optimizer/data ({exc})"
            ) from None
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.last_valid = state.get("last_valid")
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.best = state.get("best")
        self.bad_validations = int(state.get("bad_validations", 0))
        self._interval = {"loss": 0.0, "tokens": 0, "time": 0.0}
        if self.is_writer:
            self._truncate_log()
        return path

    def _read_state(self, path: str) -> dict[str, Any]:
        state_path = os.path.join(path, _STATE_FILE)
        try:
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            raise io.CheckpointError(f"{state_path}: missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise io.CheckpointError(f"{state_path}: corrupt ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise io.CheckpointError(f"{state_path}: not a pytransformer trainer state")
        if state.get("model_class") != type(self.model).__name__:
            raise io.CheckpointError(
                f"{path}: holds a {state.get('model_class')}, not a {type(self.model).__name__}"
            )
        config_path = os.path.join(path, "config.json")
        config = getattr(self.model, "config", None)
        if config is not None and os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                try:
                    saved = json.load(f)
                except json.JSONDecodeError as exc:
                    raise io.CheckpointError(f"{config_path}: corrupt ({exc})") from None
            if saved != config.to_dict():
                diff = sorted(k for k in set(saved) | set(config.to_dict())
                              if saved.get(k) != config.to_dict().get(k))  # fmt: skip
                raise io.CheckpointError(f"{path}: the model config differs in {diff}")
        have = {
            "seed": self.seed,
            "accumulate": self.accumulate * self.reducer.size,
            "label_smoothing": self.label_smoothing,
        }
        for key, value in have.items():
            if state.get(key) != value:
                raise io.CheckpointError(
                    f"{path}: saved with {key}={state.get(key)!r}, this trainer has {value!r}"
                    + _RANKS_HINT * (key == "accumulate")
                    + " (the resumed run would not match the original)"
                )
        return state

    def _truncate_log(self) -> None:
        """Drops log records of updates after the restored step (left by the interrupted run)."""
        if self.log_path is None or not os.path.exists(self.log_path):
            return
        kept = []
        with open(self.log_path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= self.step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from a crash
        io.atomic_write_text(self.log_path, "".join(kept))
