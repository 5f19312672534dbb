"""Basic modules: Linear, token embedding with sinusoidal positions, LayerNorm, FeedForward,
dropout.

Dimension legend: B batch, L sequence length (S source, T target), C d_model, F d_ff, V vocabulary.
Each module has an explicit `forward` and a `backward` that mirrors it (llm.c style). Modules that
must remember activations for their backward keep them on themselves during a forward run with
`ctx.cache` set, and drop them in backward; parameter gradients accumulate (+=) into `Param.grad`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import numpy as np

from .. import ops
from .params import Param, ParamStore, embedding_init, ones_init, xavier_uniform_init, zeros_init

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


class Context:
    """State shared by every module of one model.

    `training` (dropout active) and `cache` (forwards keep what their backward needs) come from the
    model's mode, except inside `inference()`, which turns both off for the calling thread only:
    the decoding methods run there, so several Python threads can decode with one model at once
    while no module state is written.
    Dropout masks come from `ops.dropout`'s counter-based generator; each dropout call of a forward
    pass gets its own seed, derived from `dropout_seed` and the call's index within the pass, so a
    pass is reproduced exactly by its seed whatever happened before.
    """

    def __init__(self) -> None:
        self.train_mode = True
        self.grad_mode = False
        self.dropout_seed = 0
        self.dropout_calls = 0
        self._local = threading.local()

    def _inferring(self) -> bool:
        return getattr(self._local, "inferring", False)

    @property
    def training(self) -> bool:
        return self.train_mode and not self._inferring()

    @property
    def cache(self) -> bool:
        return self.grad_mode and not self._inferring()

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        before = self._inferring()
        self._local.inferring = True
        try:
            yield
        finally:
            self._local.inferring = before

    def begin_pass(self, dropout_seed: int) -> None:
        self.dropout_seed = int(dropout_seed)
        self.dropout_calls = 0

    @contextlib.contextmanager
    def forward_pass(self, dropout_seed: int, grad: bool) -> Iterator[None]:
        """One forward pass of the model: dropout masks numbered from dropout_seed, and with grad
        the modules keep what their backward needs (until the pass ends, whatever happens)."""
        self.begin_pass(dropout_seed)
        self.grad_mode = grad
        try:
            yield
        finally:
            self.grad_mode = False

    def next_dropout_seed(self) -> int:
        """splitmix64 of (dropout_seed, call index): well-spread seeds for consecutive calls."""
        self.dropout_calls += 1
        z = (
            self.dropout_seed * 0x9E3779B97F4A7C15 + self.dropout_calls * 0xD1B54A32D192ED03
        ) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (z ^ (z >> 31)) & _MASK63


class Dropout:
    """Inverted dropout; keeps only its mask's seed (the kernel regenerates the mask)."""

    def __init__(self, p: float, ctx: Context) -> None:
        self.p = float(p)
        self.ctx = ctx
        self.seed: int | None = None

    def active(self) -> bool:
        return self.ctx.training and self.p > 0.0

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.active():
            if self.ctx.cache:
                self.seed = None
            return x
        self.seed = self.ctx.next_dropout_seed()
        return ops.dropout(x, self.p, seed=self.seed)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self.seed is None:
            return dy
        return ops.dropout_backward(dy, self.p, seed=self.seed)


# Products with fewer rows read W in place (M <= 3 is bound by reading W once, packed or not).
PACKED_MIN_ROWS = 4
PACK_MIN_ROW_STEPS = 256  # see worth_packing
_packed = threading.local()


def worth_packing(rows: int, steps: int) -> bool:
    """Whether decoding `rows` rows for about `steps` positions should pack the step weights:
    packing costs about a few steps' worth of memory traffic and makes each step with 4 or more
    rows 10-30 % faster, so it pays from a few hundred row-steps on."""
    return rows >= PACKED_MIN_ROWS and rows * steps >= PACK_MIN_ROW_STEPS


def project(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    quantized: ops.QuantizedWeight | None = None,
    packed: ops.PackedWeight | None = None,
    activation: str | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """x (..., in) @ weight (out, in).T + bias by the kernel a `Linear` takes: the int8 product
    when quantized is given, the packed copy when given and x has PACKED_MIN_ROWS rows or more
    (below that the plain small-M paths are faster), else the plain product. Written into `out`
    when given (C-contiguous, the result's shape)."""
    if quantized is not None:
        y = ops.qlinear(x, quantized, bias=bias, activation=activation)
        if out is None:
            return y
        out[...] = y
        return out
    if packed is not None and x.size >= PACKED_MIN_ROWS * x.shape[-1]:
        return ops.matmul(x, packed, bias=bias, activation=activation, out=out)
    return ops.matmul(x, weight, trans_b=True, bias=bias, activation=activation, out=out)


@contextlib.contextmanager
def packed_weights(weights: dict[int, ops.PackedWeight] | None) -> Iterator[None]:
    """Within the block, this thread's `Linear.forward` calls use the packed copy in `weights`
    (keyed by id(Linear)) when the input has enough rows. Other threads are not affected."""
    before = getattr(_packed, "weights", None)
    _packed.weights = weights
    try:
        yield
    finally:
        _packed.weights = before


class Linear:
    """y = x @ W^T + b with W (out, in). Stateless: callers pass the input back to `backward`."""

    def __init__(
        self,
        store: ParamStore,
        name: str,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight: Param | None = None,
    ) -> None:
        self.weight = (
            weight
            if weight is not None
            else store.add(f"{name}.weight", (out_features, in_features), xavier_uniform_init)
        )
        self.bias = store.add(f"{name}.bias", (out_features,), zeros_init) if bias else None
        # Set by models.quantize for int8 inference: forward then runs the int8 product.
        self.quantized: ops.QuantizedWeight | None = None

    def forward(
        self, x: np.ndarray, activation: str | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """x (..., in) -> (..., out); activation "relu"/"gelu" is fused into the GEMM epilogue.
        With `out` (C-contiguous, the result's shape) the result is written there."""
        b = self.bias.data if self.bias is not None else None
        packed = getattr(_packed, "weights", None)
        return project(x, self.weight.data, b, quantized=self.quantized,
                       packed=packed.get(id(self)) if packed else None, activation=activation,
                       out=out)

    def pack(self) -> ops.PackedWeight:
        """The weight packed for `packed_weights` (a snapshot: it does not follow later updates);
        an int8 layer's weight is packed already."""
        if self.quantized is not None:
            return self.quantized
        return ops.PackedWeight(self.weight.data)

    def backward(
        self,
        dy: np.ndarray,
        x: np.ndarray,
        *,
        dx_out: np.ndarray | None = None,
    ) -> np.ndarray:
        """dy (..., out), x (..., in) the forward input. Accumulates dW, db; returns dx (..., in)
        (or adds it into dx_out when given)."""
        if self.quantized is not None:
            raise RuntimeError(
                "an int8 model runs inference only: load it with compute_type='float32' to train"
            )
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        ops.matmul(dy2, x2, trans_a=True, out=self.weight.grad, accumulate=True)
        if self.bias is not None:
            ops.add_column_sums(self.bias.grad, dy2)
        if dx_out is not None:
            ops.matmul(
                dy2, self.weight.data, out=dx_out.reshape(-1, dx_out.shape[-1]), accumulate=True
            )
            return dx_out
        return ops.matmul(dy, self.weight.data)


def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """(max_len, C): PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(same angle)."""
    return position_table("interleaved", max_len, d_model)


def position_table(kind: str, max_len: int, d_model: int) -> np.ndarray:
    """(max_len, C) float32 sinusoidal positions of one of three layouts, angle(pos, i) =
    pos * rate_i for the h = ceil(C/2) rates i < h:

    "interleaved" (the paper): PE[pos, 2i] = sin, PE[pos, 2i+1] = cos, rate_i = 10000^(-2i/C);
    "halves" (Marian, fairseq): PE[pos, :h] = sin, PE[pos, h:] = cos, the same rates;
    "tensor2tensor" (CTranslate2's table when a model stores none, from OpenNMT-tf): halves,
    with rate_i = 10000^(-i/(C/2 - 1)), and row p holding position p + 1 (those count from 1).
    """
    pos = np.arange(max_len, dtype=np.float64)[:, None] + (kind == "tensor2tensor")
    half = (d_model + 1) // 2
    i = np.arange(half, dtype=np.float64)
    if kind == "tensor2tensor":
        rates = np.exp(-math.log(10000.0) * i / max(d_model // 2 - 1, 1))
    elif kind in ("interleaved", "halves"):
        rates = np.power(10000.0, -2.0 * i / d_model)
    else:
        raise ValueError(f"positional_encoding: unknown kind {kind!r}")
    angle = pos * rates
    pe = np.empty((max_len, d_model), np.float64)
    if kind == "interleaved":
        pe[:, 0::2] = np.sin(angle)
        pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
    else:
        pe[:, :half] = np.sin(angle)
        pe[:, half:] = np.cos(angle[:, : d_model - half])
    return pe.astype(np.float32)


class Embedding:
    """Token embedding x scale (default sqrt(C)) plus sinusoidal positions, then dropout."""

    def __init__(
        self,
        store: ParamStore,
        name: str,
        vocab_size: int,
        d_model: int,
        positions: np.ndarray,
        dropout: float,
        ctx: Context,
        weight: Param | None = None,
        scale: float | None = None,
    ) -> None:
        self.weight = (
            weight
            if weight is not None
            else store.add(f"{name}.weight", (vocab_size, d_model), embedding_init)
        )
        self.positions = positions
        self.scale = math.sqrt(d_model) if scale is None else float(scale)
        self.dropout = Dropout(dropout, ctx)
        self.ctx = ctx
        self.ids: np.ndarray | None = None
        # Set by models.quantize for int8 inference: rows are then gathered from the int8 table.
        self.quantized: ops.QuantizedWeight | None = None

    def forward(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids (...) -> x (N, C) with N = ids.size; positions: the position-table rows for ids,
        broadcastable to ids.shape + (C,) (see Layout.positional)."""
        if self.quantized is not None:
            x = self.quantized.dequantize_rows(ids, scale=self.scale)
        else:
            x = ops.embedding(self.weight.data, ids, scale=self.scale)
        x += positions
        if self.ctx.cache:
            self.ids = ids
        return self.dropout.forward(x.reshape(-1, x.shape[-1]))

    def backward(self, dx: np.ndarray) -> None:
        if self.quantized is not None:
            raise RuntimeError(
                "an int8 model runs inference only: load it with compute_type='float32' to train"
            )
        dx = self.dropout.backward(dx)
        ids, self.ids = self.ids, None
        ops.embedding_backward(
            dx.reshape(ids.shape + dx.shape[-1:]), ids, self.weight.grad, scale=self.scale
        )


class LayerNorm:
    """y = (x - mean) * rstd * gamma + beta over the last axis."""

    def __init__(
        self, store: ParamStore, name: str, d_model: int, eps: float, ctx: Context
    ) -> None:
        self.weight = store.add(f"{name}.weight", (d_model,), ones_init)
        self.bias = store.add(f"{name}.bias", (d_model,), zeros_init)
        self.eps = eps
        self.ctx = ctx
        self.saved: tuple | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.ctx.cache:
            return ops.layer_norm(x, self.weight.data, self.bias.data, self.eps)
        y, mean, rstd = ops.layer_norm(
            x, self.weight.data, self.bias.data, self.eps, return_stats=True
        )
        self.saved = (x, mean, rstd)
        return y

    def add_forward(self, x: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """y = LN(x + residual) in one pass (post-norm residual blocks)."""
        if not self.ctx.cache:
            return ops.add_layer_norm(x, residual, self.weight.data, self.bias.data, self.eps)
        y, s, mean, rstd = ops.add_layer_norm(
            x, residual, self.weight.data, self.bias.data, self.eps, return_stats=True
        )
        self.saved = (s, mean, rstd)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy -> dx (d of the normalised input, i.e. of x + residual after add_forward)."""
        x, mean, rstd = self.saved
        self.saved = None
        dx, dgamma, dbeta = ops.layer_norm_backward(dy, x, self.weight.data, mean, rstd)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return dx


class FeedForward:
    """FFN(x) = act(x W1^T + b1) W2^T + b2; ReLU and GELU are fused into the first GEMM's
    epilogue, swish (SiLU, x * sigmoid(x)) is a kernel of its own after it."""

    def __init__(
        self, store: ParamStore, name: str, d_model: int, d_ff: int, activation: str, ctx: Context
    ) -> None:
        self.fc1 = Linear(store, f"{name}.fc1", d_model, d_ff)
        self.fc2 = Linear(store, f"{name}.fc2", d_ff, d_model)
        self.activation = activation
        self.ctx = ctx
        self.saved: tuple | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.activation == "swish":
            a = self.fc1.forward(x)
            if self.ctx.cache:
                h = swish(a)  # the backward needs the pre-activation a
            else:
                h, a = ops.swish(a, out=a), None
        elif self.activation == "gelu" and self.ctx.cache:
            # GELU's derivative needs the pre-activation, so keep it beside the activation.
            a = self.fc1.forward(x)
            h = ops.gelu(a)
        else:
            a = None
            h = self.fc1.forward(x, activation=self.activation)
        if self.ctx.cache:
            self.saved = (x, a, h)
        return self.fc2.forward(h)

    def backward(self, dy: np.ndarray, dx_out: np.ndarray | None = None) -> np.ndarray:
        """dy (N, C) -> dx (N, C), added into dx_out when given."""
        x, a, h = self.saved
        self.saved = None
        dh = self.fc2.backward(dy, h)
        if self.activation == "relu":
            dh = ops.relu_backward(dh, h)
        elif self.activation == "swish":
            dh = swish_backward(dh, a)
        else:
            dh = ops.gelu_backward(dh, a)
        del a, h
        return self.fc1.backward(dh, x, dx_out=dx_out)


def swish(a: np.ndarray) -> np.ndarray:
    """SiLU: a * sigmoid(a) (a fresh float32 array; the native kernel)."""
    return ops.swish(a)


def swish_backward(dy: np.ndarray, a: np.ndarray) -> np.ndarray:
    """dy * swish'(a) = dy * sigmoid(a) * (1 + a * (1 - sigmoid(a)))."""
    return ops.swish_backward(dy, a)
