"""int8 inference for the token models: every Linear of the encoder and decoder, the output
projection included, and the token embeddings as `ops.QuantizedWeight` (symmetric per-row int8
with float32 scales, CTranslate2's ``int8``); activations are quantized per row before each
product. Attention, layer norm, softmax, biases and the position table stay float32.

Why the embeddings are int8 too: measured on the base config (32k vocabularies, d_model 512,
embeddings tied to the output projection), float32 embeddings held 131 MB of the 190 MB an int8
model then kept resident (0.65x of the float32 model's 294 MB). A gather reads one row per
token, so int8 tables cost no speed; a table tied to the output projection is one
QuantizedWeight read by both (rows are gathered straight from its panels), so it is stored once.
With int8 embeddings the loaded base model holds 82 MB resident (0.28x of float32; the figures
come from `bench/bench_int8.py --configs base --memory-only`).

A quantized model is for inference: those weights leave the float parameter buffer (only their
int8 panels stay), `parameters()` lists the float parameters that remain, `save` stores the int8
rows and scales (``<name>.weight`` int8, ``<name>.weight_scale`` float32) and training raises.
Load a checkpoint with ``compute_type="float32"`` to train or fine-tune.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import ops
from ..nn.layers import Embedding, Linear

COMPUTE_TYPES = ("float32", "int8")
SCALE_SUFFIX = "_scale"


def check_compute_type(value: Any) -> str | None:
    """The compute type: "float32", "int8" or None (as stored); TypeError / ValueError naming
    compute_type otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"compute_type: expected a str, got {type(value).__name__}")
    if value not in COMPUTE_TYPES:
        raise ValueError(f"compute_type: expected one of {COMPUTE_TYPES}, got {value!r}")
    return value


def _modules(root: Any) -> list[Any]:
    """Every pytransformer.nn module reachable from root's attributes and lists, once each."""
    seen: dict[int, Any] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list | tuple):
            stack.extend(obj)
            continue
        if id(obj) in seen or not type(obj).__module__.startswith("pytransformer.nn"):
            continue
        seen[id(obj)] = obj
        stack.extend(vars(obj).values() if hasattr(obj, "__dict__") else ())
    return list(seen.values())


def model_linears(model: Any) -> list[Linear]:
    """The Linear layers int8 inference runs: the encoder's, the decoder's and the output's."""
    names = ("encoder", "decoder", "output")
    roots = [getattr(model, name) for name in names if hasattr(model, name)]
    return [m for m in _modules(roots) if isinstance(m, Linear)]


def model_embeddings(model: Any) -> list[Embedding]:
    """The token embeddings of the model."""
    return [m for m in _modules(list(vars(model).values())) if isinstance(m, Embedding)]


def quantized_params(model: Any) -> dict[str, tuple[Any, list[Any]]]:
    """{parameter name: (Param, the Linear and Embedding modules reading it)}: what int8
    inference stores as int8 (a tied weight is one entry read by several modules)."""
    groups: dict[str, tuple[Any, list[Any]]] = {}
    for m in [*model_linears(model), *model_embeddings(model)]:
        groups.setdefault(m.weight.name, (m.weight, []))[1].append(m)
    return groups


def compute_type(model: Any) -> str:
    """"int8" once `quantize_model` ran on the model, else "float32"."""
    return getattr(model, "compute_type", "float32")


def quantize_model(
    model: Any, weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> Any:
    """Switches model to int8 inference in place and returns it.

    weights: int8 rows and scales by parameter name (from an int8 checkpoint), used as they
    are; the other Linear and embedding weights are quantized from their float values. Those
    weights then leave the float parameter buffer. A model already in int8 is returned as is.
    """
    if compute_type(model) == "int8":
        return model
    weights = weights or {}
    groups = quantized_params(model)
    for name, (param, modules) in groups.items():
        given = weights.get(name)
        qw = ops.QuantizedWeight(*given) if given else ops.QuantizedWeight.from_float(param.data)
        for m in modules:
            m.quantized = qw
    _release(model, set(groups))
    model.compute_type = "int8"
    return model


def _release(model: Any, names: set[str]) -> None:
    """Drops the parameters `names` from the model's buffers: the remaining ones move to new,
    smaller buffers; a dropped Param's views become read-only NaN so any float use shows."""
    store = model.store
    names = {n for n in names if n in store.params}
    kept = {n: p.data.copy() for n, p in store.params.items() if n not in names}
    for n in names:
        p = store.params.pop(n)
        p.data = p.grad = np.broadcast_to(np.float32(np.nan), p.shape)
    store.flat_data = store.flat_grad = None
    store.allocate(None)
    for n, p in store.params.items():
        p.data[...] = kept[n]


def quantized_tensors(model: Any) -> dict[str, np.ndarray]:
    """What `save` adds for an int8 model: ``<weight name>`` (int8 rows) and
    ``<weight name>_scale`` (float32) of every weight that left the float buffer."""
    if compute_type(model) != "int8":
        return {}
    out: dict[str, np.ndarray] = {}
    for name, (_, modules) in quantized_params(model).items():
        if name not in model.store.params:
            out[name] = modules[0].quantized.int8_rows()
            out[name + SCALE_SUFFIX] = modules[0].quantized.scale
    return out


def split_int8(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """(float tensors, {name: (int8 rows, scales)}) of a checkpoint's tensors. An int8 tensor
    needs its ``_scale`` beside it: (rows,) float32, positive and finite."""
    floats, int8 = {}, {}
    for name, a in tensors.items():
        if a.dtype == np.int8:
            scale = tensors.get(name + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"state[{name!r}]: int8 weight without {name + SCALE_SUFFIX!r}")
            if a.ndim != 2 or scale.shape != (a.shape[0],) or scale.dtype != np.float32:
                raise ValueError(
                    f"state[{name!r}]: int8 weight {a.shape} needs a float32 scale of shape "
                    f"({a.shape[0] if a.ndim else '?'},), got {scale.dtype} {scale.shape}"
                )
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(
                    f"state[{name + SCALE_SUFFIX!r}]: scales must be positive and finite"
                )
            int8[name] = (a, scale)
    scales = {name + SCALE_SUFFIX for name in int8}
    for name, a in tensors.items():
        if name not in int8 and name not in scales:
            floats[name] = a
    return floats, int8


def load_weights(model: Any, tensors: dict[str, np.ndarray], compute: str | None) -> None:
    """Fills a freshly built model from a checkpoint's tensors (float32, or int8 with scales) for
    the compute type: int8 rows are kept as they are for "int8" and dequantized for "float32";
    None keeps the checkpoint's own type (int8 when it holds int8 weights)."""
    floats, int8 = split_int8(tensors)
    if compute is None:
        compute = "int8" if int8 else "float32"
    if compute == "float32" or not int8:
        for name, (q, scale) in int8.items():
            floats[name] = ops.dequantize_int8(q, scale)
        model.load_state_dict(floats)
        if compute == "int8":
            quantize_model(model)
        return
    shapes = {name: param.shape for name, (param, _) in quantized_params(model).items()}
    for name, (q, _) in int8.items():
        if name not in shapes:
            raise ValueError(
                f"state[{name!r}]: int8 tensor that is no Linear or embedding weight of the model"
            )
        if q.shape != shapes[name]:
            raise ValueError(
                f"state[{name!r}]: shape {q.shape} does not match the model's {shapes[name]}"
            )
    _release(model, set(int8))
    model.load_state_dict(floats)
    quantize_model(model, int8)
