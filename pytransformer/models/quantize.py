"""int8 inference for the token models: every Linear of the encoder and decoder, the output
projection included, as an `ops.QuantizedWeight` (symmetric per-output-row int8 with float32
scales, CTranslate2's ``int8``), activations quantized per row before each product. Attention,
layer norm, softmax and the embeddings stay float32.

Why the embeddings stay float32: a gather reads one row per token, so int8 tables would save
memory but no time, and a tied output projection gets its own int8 copy anyway. The memory cost
is in bench/bench_int8.py (resident memory of a loaded base model, int8 against float32).

A quantized model is for inference: its Linear weights leave the float parameter buffer (only
their int8 panels stay), `parameters()` lists the float parameters that remain, `save` stores the
int8 rows and scales (``<name>.weight`` int8, ``<name>.weight_scale`` float32) and training it
raises. Load a checkpoint with ``compute_type="float32"`` to train or fine-tune.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import ops
from ..nn.layers import Embedding, Linear

COMPUTE_TYPES = ("float32", "int8")
SCALE_SUFFIX = "_scale"


def check_compute_type(value: Any) -> str:
    """The compute type: "float32" or "int8" (TypeError / ValueError naming compute_type)."""
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


def compute_type(model: Any) -> str:
    """"int8" once `quantize_model` ran on the model, else "float32"."""
    return getattr(model, "compute_type", "float32")


def quantize_model(
    model: Any, weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> Any:
    """Switches model to int8 inference in place and returns it.

    weights: int8 rows and scales by weight name (from an int8 checkpoint), used as they are;
    the other Linear weights are quantized from their float values. Linear weights not shared
    with an embedding leave the parameter buffer. A model already in int8 is returned as is.
    """
    if compute_type(model) == "int8":
        return model
    weights = weights or {}
    linears = model_linears(model)
    for layer in linears:
        given = weights.get(layer.weight.name)
        if given:
            layer.quantized = ops.QuantizedWeight(*given)
        else:
            layer.quantized = ops.QuantizedWeight.from_float(layer.weight.data)
    _release(model, {layer.weight.name for layer in linears})
    model.compute_type = "int8"
    return model


def _embedding_params(model: Any) -> set[str]:
    return {m.weight.name for m in _modules(list(vars(model).values())) if isinstance(m, Embedding)}


def _release(model: Any, names: set[str]) -> None:
    """Drops the parameters `names` (but those an embedding reads) from the model's buffers: the
    remaining ones move to new, smaller buffers; a dropped Param's views become read-only NaN so
    any float use of it shows."""
    store = model.store
    names = {n for n in names if n in store.params} - _embedding_params(model)
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
    ``<weight name>_scale`` (float32) of every Linear whose float weight was released."""
    if compute_type(model) != "int8":
        return {}
    out: dict[str, np.ndarray] = {}
    for layer in model_linears(model):
        name = layer.weight.name
        if name not in model.store.params:
            out[name] = layer.quantized.int8_rows()
            out[name + SCALE_SUFFIX] = layer.quantized.scale
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


def load_weights(model: Any, tensors: dict[str, np.ndarray], compute: str) -> None:
    """Fills a freshly built model from a checkpoint's tensors (float32, or int8 with scales) for
    the compute type: int8 rows are kept as they are for "int8" and dequantized for "float32"."""
    floats, int8 = split_int8(tensors)
    if compute == "float32" or not int8:
        for name, (q, scale) in int8.items():
            floats[name] = ops.dequantize_int8(q, scale)
        model.load_state_dict(floats)
        if compute == "int8":
            quantize_model(model)
        return
    shapes = {layer.weight.name: layer.weight.shape for layer in model_linears(model)}
    for name, (q, _) in int8.items():
        if name not in shapes:
            raise ValueError(f"state[{name!r}]: int8 tensor that is no Linear weight of the model")
        if q.shape != shapes[name]:
            raise ValueError(
                f"state[{name!r}]: shape {q.shape} does not match the model's {shapes[name]}"
            )
    _release(model, set(int8))
    model.load_state_dict(floats)
    quantize_model(model, int8)
