"""The Transformer of "Attention Is All You Need" and its encoder-only / decoder-only variants.

Dimension legend: B batch, S source length, T target length, C d_model, H heads, D = C/H, V vocab.

Parameters: every model keeps all parameters in one flat float32 buffer and all gradients in
another of the same layout (`param_buffer` / `grad_buffer`; `parameters()` / `gradients()` give
named C-contiguous views, tied matrices once), so an optimizer can be one loop and `zero_grad()`
is one fill.

Training: `loss, n = model.loss_and_grad(batch, label_smoothing=0.1, dropout_seed=k)` runs the
forward pass, the fused label-smoothed cross-entropy over the non-pad targets and the explicit
backward; gradients (of the mean loss) accumulate into `gradients()`; `loss` is that mean times
n. Dropout applies in train mode (`model.train()`, the default) with masks derived only from
dropout_seed. `evaluate_loss(batch)` is the no-dropout, no-smoothing, no-gradient counterpart.
Padding costs nothing: position-wise layers run on the packed real tokens only (see
`nn.layout.Layout`); attention reads them back in (B, L) layout.

Decoding: `memory = model.encode(src, src_lengths)`, `state = model.init_decoder_state(memory,
src_lengths, max_steps)`, then `logits, attn = model.decode_step(state, tokens)` per position and
`state.reorder(rows)` to follow beams or drop finished rows (`TransformerLM`: `init_state(B,
max_steps)`). These never write module state, so several threads may decode with one model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import numpy as np

from . import ops
from .nn.blocks import Decoder, Encoder
from .nn.layers import (
    _PACKED_MIN_ROWS,
    Context,
    Embedding,
    Linear,
    packed_weights,
    sinusoidal_positions,
)
from .nn.layout import Layout
from .nn.params import ParamStore, embedding_init

_ACTIVATIONS = ("relu", "gelu")
_TIES = ("decoder", "all", "none")
_WEIGHTS_FILE = "model.safetensors"
_CONFIG_FILE = "config.json"
_EVAL_ROWS = 4096  # rows of logits evaluate_loss materialises at a time
_PACK_MIN_ROW_STEPS = 256  # see worth_packing


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TransformerConfig:
    """Hyper-parameters of the model (defaults: the paper's base model).

    tie_embeddings: "decoder" — the target embedding is the output projection (the paper);
    "all" — source embedding, target embedding and output projection are one matrix (needs
    src_vocab_size == tgt_vocab_size); "none" — three separate matrices.
    norm_first: False = post-norm (the paper); True = pre-norm with a final LayerNorm per stack.
    Layer counts may be 0 for a stack a variant does not use (TransformerLM has no encoder).
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "relu"
    norm_first: bool = False
    tie_embeddings: str = "decoder"
    output_bias: bool = True
    max_len: int = 1024
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
            setattr(self, name, int(v))
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")

        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            integer(name, 1)
        for name in ("num_encoder_layers", "num_decoder_layers", "pad_id", "bos_id", "eos_id"):
            integer(name, 0)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
            setattr(self, name, float(v))
        if not isinstance(self.layer_norm_eps, (int, float)) or isinstance(
            self.layer_norm_eps, bool
        ):
            raise TypeError(
                f"layer_norm_eps: expected a float, got {type(self.layer_norm_eps).__name__}"
            )
        if not (self.layer_norm_eps > 0 and math.isfinite(self.layer_norm_eps)):
            raise ValueError(
                f"layer_norm_eps must be a positive finite float, got {self.layer_norm_eps}"
            )
        self.layer_norm_eps = float(self.layer_norm_eps)
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.tie_embeddings not in _TIES:
            raise ValueError(f"tie_embeddings must be one of {_TIES}, got {self.tie_embeddings!r}")
        for name in ("norm_first", "output_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{name}: expected a bool, got {type(getattr(self, name)).__name__}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TransformerConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: invalid JSON ({exc})") from None
        return cls.from_dict(d)


# ----------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------
def _check_ids(name: str, ids: Any, vocab_size: int, ndim: int) -> np.ndarray:
    """Integer array of rank ndim, non-empty, every id in [0, vocab_size); returns int64/int32."""
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name}: expected a numpy integer array, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {ids.dtype}")
    if ids.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{name}: empty batch (shape {ids.shape})")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise IndexError(
            f"{name}: id {int(ids[where])} at {where} is out of range [0, {vocab_size})"
        )
    if ids.dtype not in (np.int32, np.int64):
        ids = ids.astype(np.int64)
    return ids


def _check_lengths(name: str, lengths: Any, batch: int, max_length: int) -> np.ndarray:
    """Integer array (batch,) with every length in [0, max_length]; returns it as int64.
    (A length 0 — an empty source — is all padding: its attention rows come out as zeros.)"""
    if not isinstance(lengths, np.ndarray):
        raise TypeError(f"{name}: expected a numpy integer array, got {type(lengths).__name__}")
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {lengths.shape}")
    if (lengths < 0).any() or (lengths > max_length).any():
        raise ValueError(
            f"{name}: every length must be in [0, {max_length}] (the padded array's length), "
            f"got min {int(lengths.min())} max {int(lengths.max())}"
        )
    return lengths.astype(np.int64, copy=False)


def _check_max_len(name: str, length: int, max_len: int) -> None:
    if length > max_len:
        raise ValueError(f"{name}: length {length} exceeds the model's max_len {max_len}")


def _check_batch_attr(batch: Any, name: str) -> Any:
    if not hasattr(batch, name):
        raise TypeError(
            f"batch: expected an object with a {name!r} attribute (pytransformer.data.Batch)"
        )
    return getattr(batch, name)


# ----------------------------------------------------------------------------------------------
# incremental decoding state
# ----------------------------------------------------------------------------------------------
class DecoderState:
    """Caches of incremental decoding for a batch of rows that all sit at the same position.

    kv_caches: per decoder layer (B, max_steps, 2, H, D) — self-attention keys [:, :, 0] and values
    [:, :, 1]; positions < `step` are filled. cross_kvs: per layer (G, S, 2, H, D), the encoder
    memory's projected keys/values (None for a decoder-only LM) for G = B / g sources, where row r
    decodes source row r // g: the beams of a sentence sit in g consecutive rows and share one
    copy, read once per step. `memory_layout` describes those G rows; `src_lengths` is per row.
    `src_rows` records which original source each row decodes, so `reorder` copies cross K/V only
    for a new set of sources (reordering beams within a sentence copies nothing).
    packed_weights: {id(Linear): PackedWeight} of the layers each step runs, packed when the
    state was made (so they do not follow later changes to the weights), or None.
    """

    def __init__(
        self,
        kv_caches: list[np.ndarray],
        cross_kvs: list[np.ndarray] | None,
        memory_layout: Layout | None,
        max_steps: int,
        packed_weights: dict | None = None,
    ) -> None:
        self.kv_caches = kv_caches
        self.packed_weights = packed_weights
        self.cross_kvs = cross_kvs
        self.memory_layout = memory_layout
        self.max_steps = max_steps
        self.step = 0
        self.src_rows = np.arange(kv_caches[0].shape[0], dtype=np.int64)
        self._cross_sources = self.src_rows  # the original source of each cross_kvs row

    @property
    def batch_size(self) -> int:
        return self.kv_caches[0].shape[0]

    @property
    def src_lengths(self) -> np.ndarray | None:
        """(B,) source lengths of the rows (None for a decoder-only LM)."""
        if self.memory_layout is None:
            return None
        ml = self.memory_layout
        lengths = ml.lengths if ml.lengths is not None else np.full(ml.B, ml.L, np.int64)
        return np.repeat(lengths, self.batch_size // ml.B)

    def reorder(self, indices: np.ndarray) -> None:
        """Row i of the new state is row indices[i] of the current one (rows may be dropped or
        duplicated; B' = len(indices) may differ from B). Copies only the `step` filled
        positions of the self-attention caches."""
        B = self.batch_size
        if not isinstance(indices, np.ndarray):
            raise TypeError(
                f"indices: expected a numpy integer array, got {type(indices).__name__}"
            )
        if indices.dtype.kind not in "iu":
            raise TypeError(f"indices: expected an integer array, got dtype {indices.dtype}")
        if indices.ndim != 1:
            raise ValueError(f"indices: expected 1 dimension, got shape {indices.shape}")
        if indices.size == 0:
            raise ValueError("indices: empty (a state needs at least one row)")
        if (indices < 0).any() or (indices >= B).any():
            bad = int(indices[(indices < 0) | (indices >= B)][0])
            raise IndexError(f"indices: row {bad} is out of range [0, {B})")
        indices = indices.astype(np.int64, copy=False)
        B2 = indices.size
        if B2 == B and np.array_equal(indices, np.arange(B)):
            return
        if B2 <= B:
            self._reorder_in_place(indices)
        else:  # more rows than the buffers hold (beams fanning out): new buffers
            t = self.step
            self.kv_caches = [_copy_rows(np.empty((B2,) + c.shape[1:], np.float32), c, indices, t)
                              for c in self.kv_caches]
        new_rows = self.src_rows[indices]
        if self.cross_kvs is not None:
            self._regroup_cross(new_rows)
        self.src_rows = new_rows

    def _regroup_cross(self, rows: np.ndarray) -> None:
        """Cross K/V rows for the sources of `rows`: one per run of equal sources when all runs
        have one length g and distinct sources (beam search), else one per row."""
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        runs = np.diff(np.r_[starts, rows.size])
        grouped = (runs == runs[0]).all() and np.unique(rows[starts]).size == starts.size
        sources = rows[starts] if grouped else rows
        if np.array_equal(sources, self._cross_sources):
            return
        where = {int(s): i for i, s in reversed(list(enumerate(self._cross_sources.tolist())))}
        pick = np.array([where[int(s)] for s in sources], dtype=np.int64)
        self.cross_kvs = [kv[pick] for kv in self.cross_kvs]
        self.memory_layout = self.memory_layout.take(pick)
        self._cross_sources = sources

    def _reorder_in_place(self, indices: np.ndarray) -> None:
        """Moves only the rows that change (beam search keeps most beams in their rows); a source
        row that is itself overwritten is saved first. The caches become views of their first
        len(indices) rows."""
        t, B2 = self.step, indices.size
        moved = np.flatnonzero(indices != np.arange(B2))
        if moved.size:
            dst, src = moved.tolist(), indices[moved].tolist()
            clobbered = set(src) & set(dst)
            for c in self.kv_caches:
                saved = {j: c[j, :t].copy() for j in clobbered}
                for i, j in zip(dst, src, strict=True):
                    c[i, :t] = saved[j] if j in saved else c[j, :t]
        self.kv_caches = [c[:B2] for c in self.kv_caches]


def _stored_config(
    stored: str, config: TransformerConfig, weights_path: str
) -> TransformerConfig:
    """The config saved inside the weights file: the one its tensors were written with, so it
    wins over config.json. They differ only if a save with a new config stopped between its two
    renames (the weights file goes first), or if config.json was edited or copied in: warn."""
    from . import io

    try:
        inner = TransformerConfig.from_json(stored)
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


def _copy_rows(new: np.ndarray, old: np.ndarray, indices: np.ndarray, t: int) -> np.ndarray:
    """new[i, :t] = old[indices[i], :t], one contiguous block per row: np.take into a strided
    `out` was 13x slower here (40 ms vs 3 ms for a 128-row cache at t=32)."""
    for i, j in enumerate(indices.tolist()):
        new[i, :t] = old[j, :t]
    return new


# ----------------------------------------------------------------------------------------------
# shared model machinery
# ----------------------------------------------------------------------------------------------
class _Model:
    """Parameters, gradients, modes and checkpoints, common to the three model classes."""

    def __init__(self, config: TransformerConfig, seed: int) -> None:
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config: expected a TransformerConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.config = config
        self.ctx = Context()
        self.store = ParamStore()
        self.positions = sinusoidal_positions(config.max_len, config.d_model)
        self._saved: tuple | None = None

    def _finish(self, seed: int) -> None:
        skip = getattr(self, "_skip_init", False)
        self.store.allocate(None if skip else np.random.default_rng(int(seed)))

    @classmethod
    def _uninitialised(cls, config: TransformerConfig) -> Any:
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

    def train(self) -> _Model:
        self.ctx.train_mode = True
        return self

    def eval(self) -> _Model:
        self.ctx.train_mode = False
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
        from . import io

        os.makedirs(directory, exist_ok=True)
        config_json = self.config.to_json()
        meta = {
            "format": "pytransformer",
            "model_class": type(self).__name__,
            "config": config_json,
        }
        io.save_safetensors(
            os.path.join(directory, _WEIGHTS_FILE), self.parameters(), metadata=meta
        )
        io.atomic_write_text(os.path.join(directory, _CONFIG_FILE), config_json + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Any:
        """Rebuilds a model saved by `save`. A missing, corrupt or mismatched checkpoint raises
        `pytransformer.io.CheckpointError` (a ValueError) saying what is wrong."""
        from . import io

        config_path = os.path.join(directory, _CONFIG_FILE)
        weights_path = os.path.join(directory, _WEIGHTS_FILE)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise io.CheckpointError(
                    f"{path}: missing (not a checkpoint directory written by save())"
                )
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
        try:
            config = TransformerConfig.from_json(text)
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
            model.load_state_dict(tensors)
        except (TypeError, ValueError) as exc:
            raise io.CheckpointError(f"{weights_path}: does not fit the config ({exc})") from None
        return model

    # -- pieces shared by the variants ------------------------------------------------------------
    def _output_loss(
        self,
        output: Linear,
        h: np.ndarray,
        targets: np.ndarray,
        label_smoothing: float,
        need_grad: bool,
    ) -> tuple[float, int, np.ndarray | None]:
        """Label-smoothed cross-entropy of output(h) against targets, over non-pad targets only
        (padding rows are never projected). h (B, L, C), targets (B, L).
        Returns (mean loss, n_tokens, dh (B, L, C) or None); accumulates the output layer's
        gradients."""
        C = h.shape[-1]
        h2 = h.reshape(-1, C)
        flat = targets.reshape(-1)
        rows = np.flatnonzero(flat != self.config.pad_id)
        n = int(rows.size)
        if n == 0:
            return 0.0, 0, (np.zeros_like(h) if need_grad else None)
        dense = n == flat.size
        if not need_grad:
            total = 0.0
            for start in range(0, n, _EVAL_ROWS):
                r = rows[start : start + _EVAL_ROWS]
                logits = output.forward(h2[r])
                loss, _ = ops.softmax_cross_entropy(
                    logits, flat[r], label_smoothing=label_smoothing, ignore_index=-1, inplace=True
                )
                total += loss * r.size
            return total / n, n, None
        hs = h2 if dense else h2[rows]
        logits = output.forward(hs)
        loss, dlogits = ops.softmax_cross_entropy(
            logits,
            flat if dense else flat[rows],
            label_smoothing=label_smoothing,
            ignore_index=-1,
            inplace=True,
        )
        dhs = output.backward(dlogits, hs)
        del logits, dlogits, hs
        if dense:
            return loss, n, dhs.reshape(h.shape)
        dh = np.zeros_like(h2)
        dh[rows] = dhs
        return loss, n, dh.reshape(h.shape)

    def _make_embedding(self, name: str, vocab_size: int, weight: Any) -> Embedding:
        cfg = self.config
        return Embedding(
            self.store,
            name,
            vocab_size,
            cfg.d_model,
            self.positions,
            cfg.dropout,
            self.ctx,
            weight=weight,
        )

    def _embed(self, embedding: Embedding, ids: np.ndarray, layout: Layout) -> np.ndarray:
        """Embeds the real positions of ids (B, L): packed (N, C)."""
        return embedding.forward(layout.pack_ids(ids), layout.positional(self.positions))

    def _make_output(self, vocab_size: int, weight: Any) -> Linear:
        return Linear(
            self.store,
            "output",
            self.config.d_model,
            vocab_size,
            bias=self.config.output_bias,
            weight=weight,
        )


def _check_label_smoothing(label_smoothing: float) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return float(label_smoothing)


def _check_seed(name: str, seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(seed).__name__}")
    return int(seed)


def _check_max_steps(max_steps: Any, max_len: int) -> int:
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
        raise TypeError(f"max_steps: expected an int, got {type(max_steps).__name__}")
    if not 1 <= max_steps <= max_len:
        raise ValueError(f"max_steps must be in [1, max_len={max_len}], got {max_steps}")
    return int(max_steps)


# ----------------------------------------------------------------------------------------------
# encoder-decoder
# ----------------------------------------------------------------------------------------------
def _target_layout(tgt_out: np.ndarray, pad_id: int) -> Layout:
    """Rows' real target positions: the non-pad prefix of each row of tgt_out. Should a row have
    padding inside (not what make_batch builds), every position is kept and the loss alone
    skips pad targets."""
    B, T = tgt_out.shape
    valid = tgt_out != pad_id
    lengths = valid.sum(axis=1)
    if np.array_equal(valid, np.arange(T)[None, :] < lengths[:, None]):
        return Layout(B, T, lengths)
    return Layout(B, T)


def _check_dlogits(dlogits: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(dlogits, np.ndarray) or dlogits.dtype != np.float32:
        raise TypeError("dlogits: expected a float32 numpy array")
    if dlogits.shape != shape:
        raise ValueError(f"dlogits: expected shape {shape}, got {dlogits.shape}")
    return np.ascontiguousarray(dlogits)


class Transformer(_Model):
    """The encoder-decoder Transformer.

    Parameter names: `src_embed.weight`, `tgt_embed.weight` (also the output projection when
    tie_embeddings="decoder"), `embed.weight` (all three when "all"), `output.weight` (only when
    "none"), `output.bias` (when output_bias), `encoder.layers.{i}.*`, `decoder.layers.{i}.*`,
    `encoder.norm.*` / `decoder.norm.*` (pre-norm). Each layer: `self_attn.qkv` (3C, C) rows
    [q; k; v], `self_attn.out`, `cross_attn.q`, `cross_attn.kv` (2C, C) rows [k; v],
    `cross_attn.out`, `ffn.fc1`, `ffn.fc2`, `norm1`, `norm2`, (decoder) `norm3`; Linear weights are
    (out_features, in_features).
    """

    def __init__(self, config: TransformerConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        cfg = config
        if cfg.num_encoder_layers < 1 or cfg.num_decoder_layers < 1:
            raise ValueError(
                "Transformer needs num_encoder_layers >= 1 and num_decoder_layers >= 1"
            )
        C = cfg.d_model
        if cfg.tie_embeddings == "all":
            if cfg.src_vocab_size != cfg.tgt_vocab_size:
                raise ValueError(
                    'tie_embeddings="all" needs src_vocab_size == tgt_vocab_size, got '
                    f"{cfg.src_vocab_size} and {cfg.tgt_vocab_size}"
                )
            shared = self.store.add("embed.weight", (cfg.src_vocab_size, C), embedding_init)
            src_w = tgt_w = out_w = shared
        else:
            src_w = self.store.add("src_embed.weight", (cfg.src_vocab_size, C), embedding_init)
            tgt_w = self.store.add("tgt_embed.weight", (cfg.tgt_vocab_size, C), embedding_init)
            out_w = tgt_w if cfg.tie_embeddings == "decoder" else None
        self.src_embed = self._make_embedding("src_embed", cfg.src_vocab_size, src_w)
        self.tgt_embed = self._make_embedding("tgt_embed", cfg.tgt_vocab_size, tgt_w)
        self.encoder = Encoder(self.store, "encoder", cfg, self.ctx)
        self.decoder = Decoder(self.store, "decoder", cfg, self.ctx)
        self.output = self._make_output(cfg.tgt_vocab_size, out_w)
        self._finish(seed)

    # -- checks -----------------------------------------------------------------------------------
    def _check_src(self, src: Any, src_lengths: Any) -> tuple[np.ndarray, np.ndarray]:
        src = _check_ids("src", src, self.config.src_vocab_size, 2)
        _check_max_len("src", src.shape[1], self.config.max_len)
        return src, _check_lengths("src_lengths", src_lengths, src.shape[0], src.shape[1])

    def _check_tgt(self, name: str, tgt: Any, batch: int) -> np.ndarray:
        tgt = _check_ids(name, tgt, self.config.tgt_vocab_size, 2)
        _check_max_len(name, tgt.shape[1], self.config.max_len)
        if tgt.shape[0] != batch:
            raise ValueError(f"{name}: batch size {tgt.shape[0]} does not match src's {batch}")
        return tgt

    def _check_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        src, src_lengths = self._check_src(
            _check_batch_attr(batch, "src"), _check_batch_attr(batch, "src_lengths")
        )
        tgt_in = self._check_tgt("tgt_in", _check_batch_attr(batch, "tgt_in"), src.shape[0])
        tgt_out = self._check_tgt("tgt_out", _check_batch_attr(batch, "tgt_out"), src.shape[0])
        if tgt_out.shape != tgt_in.shape:
            raise ValueError(
                f"tgt_out: shape {tgt_out.shape} does not match tgt_in's {tgt_in.shape}"
            )
        return src, src_lengths, tgt_in, tgt_out

    # -- training ---------------------------------------------------------------------------------
    def _hidden(
        self, src: np.ndarray, src_lengths: np.ndarray, tgt_in: np.ndarray, tgt_layout: Layout
    ) -> tuple[np.ndarray, np.ndarray]:
        """Packed decoder output (N_t, C) and packed memory (N_s, C)."""
        src_layout = Layout(src.shape[0], src.shape[1], src_lengths)
        memory = self.encoder.forward(self._embed(self.src_embed, src, src_layout), src_layout)
        x = self._embed(self.tgt_embed, tgt_in, tgt_layout)
        return self.decoder.forward(x, tgt_layout, memory, src_layout), memory

    def _hidden_backward(self, dh: np.ndarray, memory: np.ndarray) -> None:
        dmemory = np.zeros_like(memory)
        self.tgt_embed.backward(self.decoder.backward(dh, dmemory))
        self.src_embed.backward(self.encoder.backward(dmemory))

    def forward(
        self, src: np.ndarray, src_lengths: np.ndarray, tgt_in: np.ndarray, *, dropout_seed: int = 0
    ) -> np.ndarray:
        """Logits (B, T, V) for teacher-forced targets. src (B, S) ids (padding: any id in range),
        src_lengths (B,), tgt_in (B, T). In train mode keeps what `backward` needs (and applies
        dropout, its masks from dropout_seed)."""
        src, src_lengths = self._check_src(src, src_lengths)
        tgt_in = self._check_tgt("tgt_in", tgt_in, src.shape[0])
        self.ctx.begin_pass(_check_seed("dropout_seed", dropout_seed))
        self.ctx.grad_mode = self.ctx.train_mode
        try:
            h, memory = self._hidden(src, src_lengths, tgt_in, Layout(*tgt_in.shape))
            logits = self.output.forward(h)
        finally:
            self.ctx.grad_mode = False
        self._saved = (h, memory, tgt_in.shape) if self.training else None
        return logits.reshape(tgt_in.shape + (self.config.tgt_vocab_size,))

    def backward(self, dlogits: np.ndarray) -> None:
        """Accumulates the gradients of sum(dlogits * logits) for the last train-mode `forward`."""
        if self._saved is None:
            raise RuntimeError("backward() needs a preceding forward() in train mode")
        h, memory, shape = self._saved
        dlogits = _check_dlogits(dlogits, shape + (self.config.tgt_vocab_size,))
        self._saved = None
        dh = self.output.backward(dlogits.reshape(h.shape[0], -1), h)
        self._hidden_backward(dh, memory)

    def loss_and_grad(
        self, batch: Any, *, label_smoothing: float = 0.1, dropout_seed: int = 0
    ) -> tuple[float, int]:
        """Forward, label-smoothed cross-entropy over the non-pad targets of batch.tgt_out,
        backward. Gradients (of the mean loss over those tokens) accumulate into `gradients()`.
        Dropout is applied in train mode, its masks derived only from dropout_seed.
        Returns (mean loss x n_tokens, n_tokens)."""
        src, src_lengths, tgt_in, tgt_out = self._check_batch(batch)
        label_smoothing = _check_label_smoothing(label_smoothing)
        self.ctx.begin_pass(_check_seed("dropout_seed", dropout_seed))
        self.ctx.grad_mode = True
        try:
            tgt_layout = _target_layout(tgt_out, self.config.pad_id)
            h, memory = self._hidden(src, src_lengths, tgt_in, tgt_layout)
            targets = tgt_layout.pack_ids(tgt_out)
            loss, n, dh = self._output_loss(self.output, h, targets, label_smoothing, True)
            del h
            self._hidden_backward(dh, memory)
        finally:
            self.ctx.grad_mode = False
        return loss * n, n

    def evaluate_loss(self, batch: Any) -> tuple[float, int]:
        """(sum of token cross-entropies, n_tokens) over the non-pad targets; no dropout, no label
        smoothing, no gradients."""
        src, src_lengths, tgt_in, tgt_out = self._check_batch(batch)
        with self.ctx.inference():
            tgt_layout = _target_layout(tgt_out, self.config.pad_id)
            h, _ = self._hidden(src, src_lengths, tgt_in, tgt_layout)
            targets = tgt_layout.pack_ids(tgt_out)
            loss, n, _ = self._output_loss(self.output, h, targets, 0.0, False)
        return loss * n, n

    # -- incremental decoding ---------------------------------------------------------------------
    def encode(self, src_ids: np.ndarray, src_lengths: np.ndarray) -> np.ndarray:
        """Encoder memory (B, S, C) float32 (no dropout); rows past a length are zeros."""
        src, src_lengths = self._check_src(src_ids, src_lengths)
        layout = Layout(src.shape[0], src.shape[1], src_lengths)
        with self.ctx.inference():
            memory = self.encoder.forward(self._embed(self.src_embed, src, layout), layout)
        return layout.pad(memory)

    def init_decoder_state(
        self,
        memory: np.ndarray,
        src_lengths: np.ndarray,
        max_steps: int,
        *,
        pack_weights: bool | None = None,
    ) -> DecoderState:
        """Projects the memory to each decoder layer's cross-attention K/V once and preallocates
        the self-attention caches for max_steps positions. pack_weights: give the state packed
        copies of the weights every step reads (`ops.PackedWeight`; about the decoder's size in
        extra memory while the state lives, each step 10-30 % faster with 4+ rows); None decides
        by `worth_packing(B, max_steps)`."""
        cfg = self.config
        if not isinstance(memory, np.ndarray) or memory.dtype != np.float32:
            raise TypeError("memory: expected a float32 numpy array (from encode())")
        if memory.ndim != 3 or memory.shape[2] != cfg.d_model or 0 in memory.shape:
            raise ValueError(
                f"memory: expected shape (B>0, S>0, {cfg.d_model}), got {memory.shape}"
            )
        B, S, _ = memory.shape
        src_lengths = _check_lengths("src_lengths", src_lengths, B, S)
        max_steps = _check_max_steps(max_steps, cfg.max_len)
        layout = Layout(B, S, src_lengths.copy())
        packed = layout.pack(np.ascontiguousarray(memory))
        with self.ctx.inference():
            cross = [
                layer.cross_attn.project_memory(packed, layout) for layer in self.decoder.layers
            ]
        H = cfg.num_heads
        caches = [
            np.empty((B, max_steps, 2, H, cfg.d_model // H), np.float32)
            for _ in self.decoder.layers
        ]
        packed = _pack_step_weights(self, pack_weights, B, max_steps)
        return DecoderState(caches, cross, layout, max_steps, packed)

    def decode_step(
        self,
        state: DecoderState,
        tokens: np.ndarray,
        *,
        need_attention: bool = False,
        attention_layer: int = -1,
        attention_heads: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Feeds tokens (B,) at position state.step; returns (logits (B, V), attention or None).
        With need_attention: the cross-attention of decoder layer `attention_layer` (negative:
        from the last), (B, S) averaged over heads, or (B, H, S) with attention_heads."""
        if not need_attention:
            return _decode_step(self, state, tokens, None), None
        layer = check_layer_index(attention_layer, len(self.decoder.layers))
        if not isinstance(attention_heads, (bool, np.bool_)):
            raise TypeError(
                f"attention_heads: expected a bool, got {type(attention_heads).__name__}"
            )
        probs: list = []
        logits = _decode_step(self, state, tokens, (probs, layer, bool(attention_heads)))
        return logits, (probs[0][:, :, 0] if attention_heads else probs[0][:, 0])

    def translate(self, sources: Any, **kwargs: Any) -> Any:
        """Decodes a list of source id sequences: see `pytransformer.decoding.translate`."""
        from .decoding import translate

        return translate(self, sources, **kwargs)


def worth_packing(rows: int, steps: int) -> bool:
    """Whether decoding `rows` rows for about `steps` positions should pack the step weights:
    packing costs about a few steps' worth of memory traffic and makes each step with 4 or more
    rows 10-30 % faster, so it pays from a few hundred row-steps on."""
    return rows >= _PACKED_MIN_ROWS and rows * steps >= _PACK_MIN_ROW_STEPS


def _pack_step_weights(model: Any, pack_weights: Any, rows: int, steps: int) -> dict | None:
    if pack_weights is None:
        pack_weights = worth_packing(rows, steps)
    if not isinstance(pack_weights, (bool, np.bool_)):
        raise TypeError(f"pack_weights: expected a bool or None, got {type(pack_weights).__name__}")
    if not pack_weights:
        return None
    layers = [*model.decoder.step_linears(), model.output]
    return {id(layer): layer.pack() for layer in layers}


def check_layer_index(layer: Any, n: int) -> int:
    """A layer index in [-n, n) (negative counts from the last), returned in [0, n)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"attention_layer: expected an int, got {type(layer).__name__}")
    if not -n <= layer < n:
        raise ValueError(f"attention_layer: {layer} is out of range for {n} decoder layers")
    return int(layer) % n


def _decode_step(model: Any, state: DecoderState, tokens: Any, probs: tuple | None) -> np.ndarray:
    """One incremental step of model.decoder (shared by Transformer and TransformerLM).
    probs: None, or (list, layer, per_head) that receives that layer's cross-attention."""
    if not isinstance(state, DecoderState):
        raise TypeError(f"state: expected a DecoderState, got {type(state).__name__}")
    tokens = _check_ids("tokens", tokens, model.config.tgt_vocab_size, 1)
    if tokens.shape[0] != state.batch_size:
        raise ValueError(f"tokens: {tokens.shape[0]} rows, the state has {state.batch_size}")
    if state.step >= state.max_steps:
        raise ValueError(f"state: all {state.max_steps} steps are used (max_steps)")
    pos = state.step
    with model.ctx.inference(), packed_weights(state.packed_weights):
        x = model.tgt_embed.forward(tokens[:, None], model.positions[pos : pos + 1])
        out, layer, heads = probs if probs is not None else (None, -1, False)
        h = model.decoder.step(
            x, pos, state.kv_caches, state.cross_kvs, state.memory_layout, out, layer, heads
        )
        logits = model.output.forward(h)
    state.step += 1
    return logits


# ----------------------------------------------------------------------------------------------
# decoder-only language model
# ----------------------------------------------------------------------------------------------
class TransformerLM(_Model):
    """Decoder-only causal language model (decoder layers without cross-attention) over
    tgt_vocab_size tokens with num_decoder_layers layers. Parameters: `tgt_embed.weight` (also the
    output projection unless tie_embeddings="none", then `output.weight`), `output.bias`,
    `decoder.layers.{i}.*` (`self_attn`, `ffn`, `norm1`, `norm3`), `decoder.norm.*` (pre-norm)."""

    def __init__(self, config: TransformerConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        cfg = config
        if cfg.num_decoder_layers < 1:
            raise ValueError("TransformerLM needs num_decoder_layers >= 1")
        self.tgt_embed = self._make_embedding("tgt_embed", cfg.tgt_vocab_size, None)
        self.decoder = Decoder(self.store, "decoder", cfg, self.ctx, cross=False)
        tied = self.tgt_embed.weight if cfg.tie_embeddings != "none" else None
        self.output = self._make_output(cfg.tgt_vocab_size, tied)
        self._finish(seed)

    def _check_tokens(self, name: str, ids: Any) -> np.ndarray:
        ids = _check_ids(name, ids, self.config.tgt_vocab_size, 2)
        _check_max_len(name, ids.shape[1], self.config.max_len)
        return ids

    def _hidden(self, ids: np.ndarray, layout: Layout) -> np.ndarray:
        return self.decoder.forward(self._embed(self.tgt_embed, ids, layout), layout)

    def forward(self, ids: np.ndarray, *, dropout_seed: int = 0) -> np.ndarray:
        """Next-token logits (B, T, V) for ids (B, T) (padding, if any, at the end of rows)."""
        ids = self._check_tokens("ids", ids)
        self.ctx.begin_pass(_check_seed("dropout_seed", dropout_seed))
        self.ctx.grad_mode = self.ctx.train_mode
        try:
            h = self._hidden(ids, Layout(*ids.shape))
            logits = self.output.forward(h)
        finally:
            self.ctx.grad_mode = False
        self._saved = (h, ids.shape) if self.training else None
        return logits.reshape(ids.shape + (self.config.tgt_vocab_size,))

    def backward(self, dlogits: np.ndarray) -> None:
        """Accumulates the gradients of sum(dlogits * logits) for the last train-mode `forward`."""
        if self._saved is None:
            raise RuntimeError("backward() needs a preceding forward() in train mode")
        h, shape = self._saved
        dlogits = _check_dlogits(dlogits, shape + (self.config.tgt_vocab_size,))
        self._saved = None
        dh = self.output.backward(dlogits.reshape(h.shape[0], -1), h)
        self.tgt_embed.backward(self.decoder.backward(dh))

    def _check_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        tgt_in = self._check_tokens("tgt_in", _check_batch_attr(batch, "tgt_in"))
        tgt_out = self._check_tokens("tgt_out", _check_batch_attr(batch, "tgt_out"))
        if tgt_out.shape != tgt_in.shape:
            raise ValueError(
                f"tgt_out: shape {tgt_out.shape} does not match tgt_in's {tgt_in.shape}"
            )
        return tgt_in, tgt_out

    def loss_and_grad(
        self, batch: Any, *, label_smoothing: float = 0.1, dropout_seed: int = 0
    ) -> tuple[float, int]:
        """As Transformer.loss_and_grad, on batch.tgt_in / batch.tgt_out (src fields unused)."""
        tgt_in, tgt_out = self._check_batch(batch)
        label_smoothing = _check_label_smoothing(label_smoothing)
        self.ctx.begin_pass(_check_seed("dropout_seed", dropout_seed))
        self.ctx.grad_mode = True
        try:
            layout = _target_layout(tgt_out, self.config.pad_id)
            h = self._hidden(tgt_in, layout)
            targets = layout.pack_ids(tgt_out)
            loss, n, dh = self._output_loss(self.output, h, targets, label_smoothing, True)
            del h
            self.tgt_embed.backward(self.decoder.backward(dh))
        finally:
            self.ctx.grad_mode = False
        return loss * n, n

    def evaluate_loss(self, batch: Any) -> tuple[float, int]:
        """(sum of token cross-entropies, n_tokens) over non-pad targets; no dropout or
        smoothing."""
        tgt_in, tgt_out = self._check_batch(batch)
        with self.ctx.inference():
            layout = _target_layout(tgt_out, self.config.pad_id)
            h = self._hidden(tgt_in, layout)
            loss, n, _ = self._output_loss(self.output, h, layout.pack_ids(tgt_out), 0.0, False)
        return loss * n, n

    def init_state(
        self, batch_size: int, max_steps: int, *, pack_weights: bool | None = None
    ) -> DecoderState:
        """Empty self-attention caches for batch_size rows and max_steps positions
        (pack_weights: as in `Transformer.init_decoder_state`)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        max_steps = _check_max_steps(max_steps, self.config.max_len)
        H, C = self.config.num_heads, self.config.d_model
        caches = [
            np.empty((int(batch_size), max_steps, 2, H, C // H), np.float32)
            for _ in self.decoder.layers
        ]
        packed = _pack_step_weights(self, pack_weights, int(batch_size), max_steps)
        return DecoderState(caches, None, None, max_steps, packed)

    def decode_step(
        self, state: DecoderState, tokens: np.ndarray, *, need_attention: bool = False
    ) -> tuple[np.ndarray, None]:
        """Feeds tokens (B,) at position state.step; returns (logits (B, V), None)."""
        return _decode_step(self, state, tokens, None), None

    def generate(self, prompts: Any, **kwargs: Any) -> Any:
        """Continues each prompt: see `pytransformer.decoding.generate`."""
        from .decoding import generate

        return generate(self, prompts, **kwargs)


# ----------------------------------------------------------------------------------------------
# encoder-only model
# ----------------------------------------------------------------------------------------------
class TransformerEncoderModel(_Model):
    """Encoder-only model with a per-token output head (tagging / masked-LM style): src_vocab_size
    input tokens, num_encoder_layers layers, tgt_vocab_size output classes. `encode` gives the
    hidden states (B, S, C) for any other head. Parameters: `src_embed.weight` (also the head when
    tie_embeddings="all", which needs equal vocabularies), `output.weight`, `output.bias`,
    `encoder.layers.{i}.*`, `encoder.norm.*` (pre-norm)."""

    def __init__(self, config: TransformerConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        cfg = config
        if cfg.num_encoder_layers < 1:
            raise ValueError("TransformerEncoderModel needs num_encoder_layers >= 1")
        self.src_embed = self._make_embedding("src_embed", cfg.src_vocab_size, None)
        self.encoder = Encoder(self.store, "encoder", cfg, self.ctx)
        tied = None
        if cfg.tie_embeddings == "all":
            if cfg.src_vocab_size != cfg.tgt_vocab_size:
                raise ValueError(
                    'tie_embeddings="all" needs src_vocab_size == tgt_vocab_size, got '
                    f"{cfg.src_vocab_size} and {cfg.tgt_vocab_size}"
                )
            tied = self.src_embed.weight
        self.output = self._make_output(cfg.tgt_vocab_size, tied)
        self._finish(seed)

    def _check_src(self, src: Any, src_lengths: Any) -> tuple[np.ndarray, np.ndarray]:
        src = _check_ids("src", src, self.config.src_vocab_size, 2)
        _check_max_len("src", src.shape[1], self.config.max_len)
        return src, _check_lengths("src_lengths", src_lengths, src.shape[0], src.shape[1])

    def _hidden(self, src: np.ndarray, layout: Layout) -> np.ndarray:
        return self.encoder.forward(self._embed(self.src_embed, src, layout), layout)

    def encode(self, src: np.ndarray, src_lengths: np.ndarray) -> np.ndarray:
        """Final hidden states (B, S, C), zeros past each length; no dropout, no gradients."""
        src, src_lengths = self._check_src(src, src_lengths)
        layout = Layout(src.shape[0], src.shape[1], src_lengths)
        with self.ctx.inference():
            return layout.pad(self._hidden(src, layout))

    def forward(
        self, src: np.ndarray, src_lengths: np.ndarray, *, dropout_seed: int = 0
    ) -> np.ndarray:
        """Per-token logits (B, S, tgt_vocab_size), zeros past each length; in train mode keeps
        what `backward` needs."""
        src, src_lengths = self._check_src(src, src_lengths)
        layout = Layout(src.shape[0], src.shape[1], src_lengths)
        self.ctx.begin_pass(_check_seed("dropout_seed", dropout_seed))
        self.ctx.grad_mode = self.ctx.train_mode
        try:
            h = self._hidden(src, layout)
            logits = self.output.forward(h)
        finally:
            self.ctx.grad_mode = False
        self._saved = (h, layout) if self.training else None
        return layout.pad(logits)

    def backward(self, dlogits: np.ndarray) -> None:
        """Accumulates the gradients of sum(dlogits * logits) for the last train-mode `forward`
        (entries past each length are ignored)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a preceding forward() in train mode")
        h, layout = self._saved
        dlogits = _check_dlogits(dlogits, (layout.B, layout.L, self.config.tgt_vocab_size))
        self._saved = None
        dh = self.output.backward(layout.pack(dlogits), h)
        self.src_embed.backward(self.encoder.backward(dh))

    def _check_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src, src_lengths = self._check_src(
            _check_batch_attr(batch, "src"), _check_batch_attr(batch, "src_lengths")
        )
        labels = _check_ids(
            "labels", _check_batch_attr(batch, "labels"), self.config.tgt_vocab_size, 2
        )
        if labels.shape != src.shape:
            raise ValueError(f"labels: shape {labels.shape} does not match src's {src.shape}")
        return src, src_lengths, labels

    def _labels_loss(
        self, batch: Any, label_smoothing: float, need_grad: bool
    ) -> tuple[float, int]:
        src, src_lengths, labels = self._check_batch(batch)
        layout = Layout(src.shape[0], src.shape[1], src_lengths)
        h = self._hidden(src, layout)
        loss, n, dh = self._output_loss(
            self.output, h, layout.pack_ids(labels), label_smoothing, need_grad
        )
        del h
        if need_grad:
            self.src_embed.backward(self.encoder.backward(dh))
        return loss * n, n

    def loss_and_grad(
        self, batch: Any, *, label_smoothing: float = 0.0, dropout_seed: int = 0
    ) -> tuple[float, int]:
        """Per-token classification: batch.src, batch.src_lengths, batch.labels (B, S) with pad_id
        where no label applies. Returns (mean loss x n_labels, n_labels); gradients
        accumulate."""
        label_smoothing = _check_label_smoothing(label_smoothing)
        self.ctx.begin_pass(_check_seed("dropout_seed", dropout_seed))
        self.ctx.grad_mode = True
        try:
            return self._labels_loss(batch, label_smoothing, True)
        finally:
            self.ctx.grad_mode = False

    def evaluate_loss(self, batch: Any) -> tuple[float, int]:
        """(sum of token cross-entropies, n_labels); no dropout, smoothing or gradients."""
        with self.ctx.inference():
            return self._labels_loss(batch, 0.0, False)


__all__ = [
    "TransformerConfig",
    "Transformer",
    "TransformerLM",
    "TransformerEncoderModel",
    "DecoderState",
]
