"""What the model classes share: one flat parameter buffer, train/eval modes, checkpoints,
and the forward / backward / loss passes around a model-specific hidden computation.

A model class supplies `_hidden(...) -> (h, backward)`: the packed final hidden states (N, C) of
its stack and a function that back-propagates dh (N, C) through the stack and the embeddings.
The output projection, the loss and the bookkeeping of a pass are done here once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import io, ops
from ..checks import check_float, check_ids, check_int, check_lengths
from ..nn.layers import Context, Embedding, Linear, position_table
from ..nn.layout import Layout
from ..nn.params import ParamStore
from . import quantize
from .config import TransformerConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_EVAL_ROWS = 4096  # rows of logits evaluate_loss materialises at a time

Backward = Callable[[np.ndarray], None]
Hidden = Callable[[], tuple[np.ndarray, Backward]]


class Model:
    """Parameters, gradients, modes, checkpoints and passes, common to the model classes.

    `config_class` is the configuration a class is built from and saved with (a dataclass with
    `to_json`/`from_json`): TransformerConfig for the token models, which also get the sinusoidal
    position table here; the Vision Transformer has its own.
    """

    config_class: type = TransformerConfig

    def __init__(self, config: Any, seed: int) -> None:
        cls = self.config_class
        if not isinstance(config, cls):
            raise TypeError(f"config: expected a {cls.__name__}, got {type(config).__name__}")
        check_int("seed", seed)
        self.config = config
        self.ctx = Context()
        self.store = ParamStore()
        if isinstance(config, TransformerConfig):
            self.positions = position_table(
                config.positional_encoding, config.max_len, config.d_model
            )
        self._saved: tuple | None = None
        self._logits_buffer = RowBuffer()

    def _finish(self, seed: int) -> None:
        skip = getattr(self, "_skip_init", False)
        self.store.allocate(None if skip else np.random.default_rng(int(seed)))

    @classmethod
    def _uninitialised(cls, config: Any) -> Any:
        """A model with zero parameters, for load(): random initialisation would be wasted."""
        model = cls.__new__(cls)
        model._skip_init = True
        model.__init__(config)
        return model

    # -- parameters -----------------------------------------------------------------------------
    def parameters(self) -> dict[str, np.ndarray]:
        """Named float32 views of every (unique) parameter, in a stable order; writes go through."""
        return {name: p.data for name, p in self.store.params.items()}

    def gradients(self) -> dict[str, np.ndarray]:
        """Named gradient views, same keys and shapes as `parameters()`."""
        return {name: p.grad for name, p in self.store.params.items()}

    @property
    def param_buffer(self) -> np.ndarray:
        """Every parameter in one flat float32 buffer (gaps between parameters are zeros)."""
        return self.store.flat_data

    @property
    def grad_buffer(self) -> np.ndarray:
        """Every gradient in one flat float32 buffer, the layout of `param_buffer`."""
        return self.store.flat_grad

    def num_parameters(self) -> int:
        return sum(p.size for p in self.store.params.values())

    def zero_grad(self) -> None:
        self.store.zero_grad()

    def train(self) -> Model:
        self.ctx.train_mode = True
        return self

    def eval(self) -> Model:
        self.ctx.train_mode = False
        self._logits_buffer.release()
        return self

    @property
    def training(self) -> bool:
        return self.ctx.train_mode

    # -- state dict and checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter by name."""
        return {name: p.data.copy() for name, p in self.store.params.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copies `state` into the parameters. Keys must match exactly and shapes agree; floating
        arrays of another precision are converted. Nothing is written unless all checks pass."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict of numpy arrays, got {type(state).__name__}")
        params = self.store.params
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if missing or unexpected:
            raise ValueError(f"state: missing keys {missing}, unexpected keys {unexpected}")
        for name, p in params.items():
            a = state[name]
            if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
                what = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
                raise TypeError(f"state[{name!r}]: expected a floating numpy array, got {what}")
            if a.shape != p.shape:
                raise ValueError(
                    f"state[{name!r}]: shape {a.shape} does not match the model's {p.shape}"
                )
        for name, p in params.items():
            np.copyto(p.data, state[name], casting="same_kind")

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `model.safetensors` (with the config and class in its metadata), then
        `config.json`, each atomically (temp file + fsync + rename). `load` trusts the config
        stored with the weights, so a save stopped between the two renames still loads."""
        os.makedirs(directory, exist_ok=True)
        config_json = self.config.to_json()
        meta = {
            "format": "pytransformer",
            "model_class": type(self).__name__,
            "config": config_json,
            "compute_type": quantize.compute_type(self),
        }
        tensors = {**self.parameters(), **quantize.quantized_tensors(self)}
        io.save_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors, metadata=meta)
        io.atomic_write_text(os.path.join(directory, CONFIG_FILE), config_json + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, compute_type: str | None = None) -> Any:
        """Rebuilds a model saved by `save`. A missing, corrupt or mismatched checkpoint raises
        `pytransformer.io.CheckpointError` (a ValueError) saying what is wrong.

        compute_type: "float32", or "int8" for int8 inference (see `models.quantize`; weights
        stored int8 are kept as they are, float ones quantized); None (the default) runs the
        checkpoint as stored: int8 for a file `pytransformer quantize` wrote, else float32.
        "float32" dequantizes an int8 checkpoint."""
        compute_type = quantize.check_compute_type(compute_type)
        config_path = os.path.join(directory, CONFIG_FILE)
        weights_path = os.path.join(directory, WEIGHTS_FILE)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise io.CheckpointError(
                    f"{path}: missing (not a checkpoint directory written by save())"
                )
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
        try:
            config = cls.config_class.from_json(text)
        except (TypeError, ValueError) as exc:
            raise io.CheckpointError(f"{config_path}: invalid config ({exc})") from None
        tensors, meta = io.load_safetensors(weights_path)
        if meta.get("model_class", cls.__name__) != cls.__name__:
            raise io.CheckpointError(
                f"{weights_path}: holds a {meta['model_class']}, not a {cls.__name__}"
            )
        if "config" in meta:
            config = _stored_config(meta["config"], config, weights_path)
        model = cls._uninitialised(config)
        try:
            quantize.load_weights(model, tensors, compute_type)
        except (TypeError, ValueError) as exc:
            raise io.CheckpointError(f"{weights_path}: does not fit the config ({exc})") from None
        return model

    # -- passes -----------------------------------------------------------------------------------
    def _logits(
        self,
        dropout_seed: Any,
        hidden: Hidden,
        shape: tuple[int, ...],
        to_rows: Callable[[np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """Packed logits (N, V) of hidden(); in train mode keeps what `backward` needs: shape is
        the dlogits it will take, to_rows turns them into the packed rows of h."""
        seed = check_int("dropout_seed", dropout_seed)
        with self.ctx.forward_pass(seed, grad=self.training):
            h, backward = hidden()
            logits = self.output.forward(h)
        self._saved = (h, backward, shape, to_rows) if self.training else None
        return logits

    def backward(self, dlogits: np.ndarray) -> None:
        """Accumulates the gradients of sum(dlogits * logits) for the last train-mode `forward`
        (entries past a sequence's length, where the model has them, are ignored)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a preceding forward() in train mode")
        h, backward, shape, to_rows = self._saved
        dlogits = _check_dlogits(dlogits, shape)
        self._saved = None
        backward(self.output.backward(to_rows(dlogits), h))

    def _loss_and_grad(
        self, dropout_seed: Any, label_smoothing: Any, hidden: Hidden, targets: np.ndarray
    ) -> tuple[float, int]:
        """(mean loss x n, n) of the label-smoothed cross-entropy of output(h) against the packed
        targets; gradients accumulate."""
        label_smoothing = check_float("label_smoothing", label_smoothing, 0.0, 1.0)
        seed = check_int("dropout_seed", dropout_seed)
        with self.ctx.forward_pass(seed, grad=True):
            h, backward = hidden()
            loss, n, dh = self._output_loss(h, targets, label_smoothing, True)
            del h
            backward(dh)
        return loss * n, n

    def _evaluate_loss(self, hidden: Hidden, targets: np.ndarray) -> tuple[float, int]:
        with self.ctx.inference():
            h, _ = hidden()
            loss, n, _ = self._output_loss(h, targets, 0.0, False)
        return loss * n, n

    def _output_loss(
        self, h: np.ndarray, targets: np.ndarray, label_smoothing: float, need_grad: bool
    ) -> tuple[float, int, np.ndarray | None]:
        """Label-smoothed cross-entropy of output(h) against targets, over non-pad targets only
        (padding rows are never projected). h (N, C), targets (N,) or any shape of N ids.
        Returns (mean loss, n_tokens, dh (N, C) or None); accumulates the output layer's
        gradients."""
        output = self.output
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        rows = self._target_rows(targets)
        n = int(rows.size)
        if n == 0:
            return 0.0, 0, (np.zeros_like(h) if need_grad else None)
        if not need_grad:
            total = 0.0
            for start in range(0, n, _EVAL_ROWS):
                r = rows[start : start + _EVAL_ROWS]
                logits = output.forward(h[r])
                loss, _ = ops.softmax_cross_entropy(
                    logits, targets[r], label_smoothing=label_smoothing, ignore_index=-1,
                    inplace=True,
                )
                total += loss * r.size
            return total / n, n, None
        dense = n == targets.size
        hs = h if dense else h[rows]
        logits = output.forward(hs, out=self._logits_buffer.rows(n, output.weight.data.shape[0]))
        loss, dlogits = ops.softmax_cross_entropy(
            logits,
            targets if dense else targets[rows],
            label_smoothing=label_smoothing,
            ignore_index=-1,
            inplace=True,
        )
        dhs = output.backward(dlogits, hs)
        del logits, dlogits, hs
        if dense:
            return loss, n, dhs
        dh = np.zeros_like(h)
        dh[rows] = dhs
        return loss, n, dh

    def _target_rows(self, targets: np.ndarray) -> np.ndarray:
        """The positions of the flat targets that count in the loss: the non-pad ones."""
        return np.flatnonzero(targets != self.config.pad_id)

    # -- pieces shared by the variants ------------------------------------------------------------
    def _make_embedding(self, name: str, vocab_size: int, weight: Any) -> Embedding:
        cfg = self.config
        return Embedding(
            self.store, name, vocab_size, cfg.d_model, self.positions, cfg.dropout, self.ctx,
            weight=weight, scale=None if cfg.scale_embedding else 1.0,
        )

    def _embed(self, embedding: Embedding, ids: np.ndarray, layout: Layout) -> np.ndarray:
        """Embeds the real positions of ids (B, L): packed (N, C)."""
        return embedding.forward(layout.pack_ids(ids), layout.positional(self.positions))

    def _make_output(self, vocab_size: int, weight: Any) -> Linear:
        return Linear(
            self.store, "output", self.config.d_model, vocab_size,
            bias=self.config.output_bias, weight=weight,
        )

    def _check_tokens(self, name: str, ids: Any, vocab_size: int) -> np.ndarray:
        """(B, L) ids of a vocabulary, L within max_len."""
        ids = check_ids(name, ids, vocab_size, 2)
        if ids.shape[1] > self.config.max_len:
            raise ValueError(
                f"{name}: length {ids.shape[1]} exceeds the model's max_len {self.config.max_len}"
            )
        return ids

    def _check_src(self, src: Any, src_lengths: Any) -> tuple[np.ndarray, np.ndarray]:
        src = self._check_tokens("src", src, self.config.src_vocab_size)
        return src, check_lengths("src_lengths", src_lengths, src.shape[0], src.shape[1])

    def _check_pair(self, name: str, a: np.ndarray, other: str, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {a.shape} does not match {other}'s {b.shape}")


def batch_field(batch: Any, name: str, kind: str = "pytransformer.train.Batch") -> Any:
    if not hasattr(batch, name):
        raise TypeError(f"batch: expected an object with a {name!r} attribute ({kind})")
    return getattr(batch, name)


def target_layout(tgt_out: np.ndarray, pad_id: int) -> Layout:
    """Rows' real target positions: the non-pad prefix of each row of tgt_out. Should a row have
    padding inside (not what make_batch builds), every position is kept and the loss alone
    skips pad targets."""
    B, T = tgt_out.shape
    valid = tgt_out != pad_id
    lengths = valid.sum(axis=1)
    if np.array_equal(valid, np.arange(T)[None, :] < lengths[:, None]):
        return Layout(B, T, lengths)
    return Layout(B, T)


class RowBuffer:
    """A float32 (rows, cols) buffer kept across training steps: the logits of a step (N x V,
    over 100 MB at V = 8,000) are otherwise a fresh mapping that the kernel zeroes and the GEMM
    faults in again every step, which made the output projection run at 55 % of the rate of the
    same product into warm memory (Multi30k batches, 2 threads). It grows to the largest batch
    seen (rounded up to 64 rows), which batches of varying size reach after a few steps, so it
    holds no more than the largest step needed; `release` frees it (`Model.eval` does)."""

    def __init__(self) -> None:
        self._data = np.empty(0, np.float32)

    def rows(self, n: int, cols: int) -> np.ndarray:
        """A C-contiguous (n, cols) view of the buffer (its contents are undefined)."""
        if self._data.size < n * cols:
            self.release()  # the old one goes first: no two alive at once
            self._data = np.empty(-(-n // 64) * 64 * cols, np.float32)
        return self._data[: n * cols].reshape(n, cols)

    def release(self) -> None:
        self._data = np.empty(0, np.float32)


def dense_rows(dlogits: np.ndarray) -> np.ndarray:
    """(B, T, V) -> (B*T, V): every position is a row (teacher-forced targets)."""
    return dlogits.reshape(-1, dlogits.shape[-1])


def _check_dlogits(dlogits: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(dlogits, np.ndarray) or dlogits.dtype != np.float32:
        raise TypeError("dlogits: expected a float32 numpy array")
    if dlogits.shape != shape:
        raise ValueError(f"dlogits: expected shape {shape}, got {dlogits.shape}")
    return np.ascontiguousarray(dlogits)


def _stored_config(stored: str, config: Any, weights_path: str) -> Any:
    """The config saved inside the weights file: the one its tensors were written with, so it
    wins over config.json. They differ only if a save with a new config stopped between its two
    renames (the weights file goes first), or if config.json was edited or copied in: warn."""
    try:
        inner = type(config).from_json(stored)
    except (TypeError, ValueError) as exc:
        raise io.CheckpointError(f"{weights_path}: invalid stored config ({exc})") from None
    a, b = inner.to_dict(), config.to_dict()
    if a != b:
        diff = ", ".join(
            f"{k}: {b.get(k)!r} there, {a.get(k)!r} stored" for k in a if a[k] != b.get(k)
        )
        warnings.warn(
            f"config.json next to {weights_path} differs from the config stored with the weights "
            f"({diff}); loading with the stored one (an interrupted save, or an edited "
            "config.json: save() again to make them agree)",
            stacklevel=3,
        )
    return inner
