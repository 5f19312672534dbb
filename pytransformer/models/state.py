"""Incremental decoding: the per-row caches (`DecoderState`), the packed copy of the weights a
step reads, and the step itself, shared by `Transformer` and `TransformerLM`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import ops
from .._native import _C
from ..checks import check_bool, check_ids, check_int, check_layer_index
from ..nn.attention import AttentionCapture
from ..nn.layers import PACKED_MIN_ROWS, packed_weights, project, worth_packing
from ..nn.layout import Layout

# Self-attention caches start with room for this many positions and double when a step needs
# more: memory follows the longest hypothesis, not max_steps (a batch of 256 rows preallocated for
# 256 steps held ~400 MB for a 30 MB model), and the copies add up to less than one more cache.
INITIAL_CAPACITY = 16

# Steps run the native decoder step (`_C.DecoderStepPlan`: every layer in one call, the same
# kernels on the same operands, so the same bits) where the model allows; False keeps the
# layer-by-layer Python step (tests compare the two).
NATIVE_STEP = True


class DecoderState:
    """Caches of incremental decoding for a batch of rows that all sit at the same position.

    kv_caches: per decoder layer (B, capacity, 2, H, D) — self-attention keys [:, :, 0] and values
    [:, :, 1]; positions < `step` are filled. Views of head-major memory (`head_major_cache`),
    as are cross_kvs; steps read any strides, so caches of another layout work too.
    capacity <= max_steps grows (doubling, see `reserve`) as the steps need it.
    cross_kvs: per layer (G, S, 2, H, D), the encoder memory's projected keys/values (None for
    a decoder-only LM) for G = B / g sources, where row r decodes source row r // g: the beams of
    a sentence sit in g consecutive rows and share one copy, read once per step.
    `memory_layout` describes those G rows; `src_lengths` is per row.
    `src_rows` records which original source each row decodes, so `reorder` copies cross K/V only
    for a new set of sources (reordering beams within a sentence copies nothing).
    packed_weights: {id(Linear): PackedWeight} of the layers each step runs, packed when the
    state was made (so they do not follow later changes to the weights), or None.
    vocab_subset: the sorted target ids each step scores (None: all); `output_rows` holds the
    output projection's rows for them.
    native: the `native_plan` the steps run (None: the Python layers), made with the state, so
    its steps read the weight arrays the model held then.
    """

    def __init__(
        self,
        kv_caches: list[np.ndarray],
        cross_kvs: list[np.ndarray] | None,
        memory_layout: Layout | None,
        max_steps: int,
        packed_weights: dict | None = None,
        output_rows: OutputRows | None = None,
        native: Any = None,
    ) -> None:
        self.kv_caches = kv_caches
        self.native = native
        self._native_packed = packed_weights  # what `native` was made with
        self.packed_weights = packed_weights
        self.cross_kvs = cross_kvs
        self.memory_layout = memory_layout
        self.max_steps = max_steps
        self.step = 0
        self.src_rows = np.arange(kv_caches[0].shape[0], dtype=np.int64)
        self._cross_sources = self.src_rows  # the original source of each cross_kvs row
        self.output_rows = output_rows

    def native_step(self, model: Any) -> Any:
        """The native plan, remade when `packed_weights` was replaced since (translate hands
        a batch's later states the packed copy its first state made), so that it takes the
        kernels the Python layers would take; None: the steps run the Python layers."""
        if self.native is not None and self._native_packed is not self.packed_weights:
            self.native = native_plan(model, self.packed_weights)
            self._native_packed = self.packed_weights
        return self.native

    @property
    def vocab_subset(self) -> np.ndarray | None:
        """The sorted target ids the steps score (None: the whole vocabulary)."""
        return self.output_rows.ids if self.output_rows is not None else None

    @property
    def capacity(self) -> int:
        """Positions the self-attention caches hold now (grows up to max_steps)."""
        return self.kv_caches[0].shape[1]

    def reserve(self, positions: int) -> None:
        """Makes room in the caches for `positions` positions (<= max_steps): doubles the
        capacity until it fits, copying the `step` filled positions into the new buffers."""
        positions = check_int("positions", positions, 1, self.max_steps)
        if positions <= self.capacity:
            return
        cap = self.capacity
        while cap < positions:
            cap *= 2
        cap = min(cap, self.max_steps)
        t = self.step
        # One layer at a time, each old buffer dropped once copied: the peak is the new caches
        # plus one layer's old one, not the old and new caches of every layer together.
        for i, c in enumerate(self.kv_caches):
            new = head_major_cache(c.shape[0], cap, c.shape[3], c.shape[4])
            new[:, :t] = c[:, :t]
            self.kv_caches[i] = new
            del c

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
        indices = self._check_indices(indices)
        B, B2 = self.batch_size, indices.size
        if B2 == B and np.array_equal(indices, np.arange(B)):
            return
        if B2 <= B:
            self._reorder_in_place(indices)
        else:  # more rows than the buffers hold (beams fanning out): new buffers
            t = self.step
            self.kv_caches = [
                _copy_rows(head_major_cache(B2, c.shape[1], c.shape[3], c.shape[4]), c, indices, t)
                for c in self.kv_caches
            ]
        new_rows = self.src_rows[indices]
        if self.cross_kvs is not None and not np.array_equal(new_rows, self.src_rows):
            self._regroup_cross(new_rows)
        self.src_rows = new_rows

    def _check_indices(self, indices: Any) -> np.ndarray:
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
        if indices.min() < 0 or indices.max() >= B:
            bad = int(indices[(indices < 0) | (indices >= B)][0])
            raise IndexError(f"indices: row {bad} is out of range [0, {B})")
        return indices.astype(np.int64, copy=False)

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
        self.cross_kvs = [head_major(kv, pick) for kv in self.cross_kvs]
        self.memory_layout = self.memory_layout.take(pick)
        self._cross_sources = sources

    def _reorder_in_place(self, indices: np.ndarray) -> None:
        """Moves only the rows that change (beam search keeps most beams in their rows); a source
        row that is itself overwritten is saved first. The caches become views of their first
        len(indices) rows."""
        _C.move_cache_rows(self.kv_caches, indices, self.step)
        self.kv_caches = [c[:indices.size] for c in self.kv_caches]


def head_major_cache(rows: int, positions: int, H: int, D: int) -> np.ndarray:
    """An uninitialised (rows, positions, 2, H, D) float32 cache whose memory is laid out
    (rows, 2, H, positions, D): each head's keys (and values) of a row are one contiguous run, so
    a decode step streams them front to back instead of reading D floats every 2 H D (a stride
    the prefetchers miss: one step of 32 rows read its caches ~1.4x faster this way)."""
    return np.empty((rows, 2, H, positions, D), np.float32).transpose(0, 3, 1, 2, 4)


def head_major(kv: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """kv (G, S, 2, H, D), or its rows `rows`, copied into the memory order of `head_major_cache`
    (plain fancy indexing would give the logical order)."""
    memory_order = kv.transpose(0, 2, 3, 1, 4)
    if rows is not None:
        memory_order = memory_order[rows]
    return np.ascontiguousarray(memory_order).transpose(0, 3, 1, 2, 4)


def _copy_rows(new: np.ndarray, old: np.ndarray, indices: np.ndarray, t: int) -> np.ndarray:
    """new[i, :t] = old[indices[i], :t], one contiguous block per row: np.take into a strided
    `out` was 13x slower here (40 ms vs 3 ms for a 128-row cache at t=32)."""
    for i, j in enumerate(indices.tolist()):
        new[i, :t] = old[j, :t]
    return new


def check_max_steps(max_steps: Any, max_len: int) -> int:
    return check_int("max_steps", max_steps, 1, max_len)


def new_state(
    model: Any,
    rows: int,
    max_steps: int,
    pack_weights: Any,
    cross: tuple[list[np.ndarray], Layout] | None = None,
    vocab_subset: np.ndarray | None = None,
) -> DecoderState:
    """Self-attention caches for `rows` rows (room for INITIAL_CAPACITY positions, growing to
    max_steps), the cross-attention K/V (with their layout) when the model has an encoder, the
    packed step weights when pack_weights says so (None: `worth_packing(rows, max_steps)`), and
    the output rows of vocab_subset (checked by `check_vocab_subset`) when given."""
    cfg = model.config
    H = cfg.num_heads
    capacity = min(INITIAL_CAPACITY, max_steps)
    caches = [head_major_cache(rows, capacity, H, cfg.d_model // H) for _ in model.decoder.layers]
    if pack_weights is None:
        pack_weights = worth_packing(rows, max_steps)
    pack = check_bool("pack_weights (a bool or None)", pack_weights)
    packed = None
    if pack:
        layers = list(model.decoder.step_linears())
        if vocab_subset is None:
            layers.append(model.output)
        packed = {id(layer): layer.pack() for layer in layers}
    rows_out = None
    if vocab_subset is not None:
        rows_out = OutputRows(model.output, vocab_subset, pack)
    kvs, layout = cross if cross is not None else (None, None)
    if kvs is not None:
        kvs = [head_major(kv) for kv in kvs]
    native = native_plan(model, packed) if NATIVE_STEP else None
    return DecoderState(caches, kvs, layout, max_steps, packed, rows_out, native)


def native_plan(model: Any, packed: dict | None) -> Any:
    """The native step of model.decoder with the kernels Linear.forward would pick (int8, or
    the packed copies in `packed` for inputs of PACKED_MIN_ROWS rows and more), or None where
    the step needs the Python layers: a swish FFN, or weights the native step does not take
    (not C-contiguous float32)."""
    cfg, layers = model.config, model.decoder.layers
    windows = {layer.self_attn.window for layer in layers}
    if cfg.activation not in ("relu", "gelu") or len(windows) != 1:
        return None
    specs = [_layer_spec(layer, packed) for layer in layers]
    final = model.decoder.norm
    try:
        return _C.DecoderStepPlan(
            specs, _norm_spec(final) if final is not None else None, cfg.norm_first,
            cfg.activation, cfg.d_model, cfg.num_heads, cfg.d_ff, windows.pop(), PACKED_MIN_ROWS,
            embedding=_embedding_spec(model.tgt_embed, model.positions),
            output=_linear_spec(model.output, packed),
        )
    except (TypeError, ValueError):  # a weight the native step cannot read: the Python step can
        return None


def _layer_spec(layer: Any, packed: dict | None) -> dict:
    spec = {
        "qkv": _linear_spec(layer.self_attn.qkv, packed),
        "self_out": _linear_spec(layer.self_attn.out, packed),
        "fc1": _linear_spec(layer.ffn.fc1, packed),
        "fc2": _linear_spec(layer.ffn.fc2, packed),
        "norm1": _norm_spec(layer.attn_block.norm),
        "norm3": _norm_spec(layer.ffn_block.norm),
    }
    if layer.cross_attn is not None:
        spec["cross_q"] = _linear_spec(layer.cross_attn.q, packed)
        spec["cross_out"] = _linear_spec(layer.cross_attn.out, packed)
        spec["norm2"] = _norm_spec(layer.cross_block.norm)
    return spec


def _linear_spec(linear: Any, packed: dict | None) -> tuple:
    bias = linear.bias.data if linear.bias is not None else None
    q = linear.quantized
    if q is not None:
        return (None, None, q.data, q.inv_scale, bias, q.out_features, q.in_features)
    w = linear.weight.data
    p = packed.get(id(linear)) if packed else None
    return (w, p.data if p is not None else None, None, None, bias, w.shape[0], w.shape[1])


def _embedding_spec(embed: Any, positions: np.ndarray) -> tuple:
    q = embed.quantized
    if q is not None:
        return (None, q.data, q.scale, positions, embed.scale, q.out_features)
    w = embed.weight.data
    return (w, None, None, positions, embed.scale, w.shape[0])


def _norm_spec(norm: Any) -> tuple:
    return (norm.weight.data, norm.bias.data, float(norm.eps))


def check_vocab_subset(vocab_subset: Any, vocab_size: int, eos_id: int) -> np.ndarray | None:
    """None, or a 1-D integer array of sorted unique target ids in [0, vocab_size) holding
    eos_id (a search must be able to end), returned as int64."""
    if vocab_subset is None:
        return None
    name = "vocab_subset"
    if not isinstance(vocab_subset, np.ndarray):
        kind = type(vocab_subset).__name__
        raise TypeError(f"{name}: expected a numpy integer array, got {kind}")
    if vocab_subset.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {vocab_subset.dtype}")
    if vocab_subset.ndim != 1 or vocab_subset.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {vocab_subset.shape}")
    ids = vocab_subset.astype(np.int64)
    if (ids < 0).any() or (ids >= vocab_size).any():
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise IndexError(f"{name}: id {bad} is out of range [0, {vocab_size})")
    if (np.diff(ids) <= 0).any():
        raise ValueError(f"{name}: ids must be sorted and unique (np.unique gives that)")
    if ids[np.searchsorted(ids, eos_id) % ids.size] != eos_id:
        raise ValueError(f"{name}: must contain the end-of-sequence id {eos_id}")
    return ids


class OutputRows:
    """The output projection restricted to the target ids `ids`: its weight rows and bias
    gathered once (and packed, or kept int8 for an int8 layer), so a step's product costs
    len(ids) / V of the full one. `logits` returns full-width rows, -inf outside ids, so the
    searches see an ordinary (B, V) row where the other tokens are impossible."""

    def __init__(self, output: Any, ids: np.ndarray, pack: bool) -> None:
        self.ids = ids
        q = output.quantized
        self.vocab_size = q.out_features if q is not None else output.weight.data.shape[0]
        self.bias = output.bias.data[ids] if output.bias is not None else None
        self.quantized = None
        self.weight = None
        self.packed = None
        if output.quantized is not None:
            qw = output.quantized
            self.quantized = ops.QuantizedWeight(_int8_rows(qw, ids), qw.scale[ids])
        else:
            self.weight = np.ascontiguousarray(output.weight.data[ids])
            self.packed = ops.PackedWeight(self.weight) if pack else None

    def logits(self, h: np.ndarray) -> np.ndarray:
        """h (B, C) -> (B, V) float32: the projection at `ids`, -inf elsewhere. Takes the same
        kernel (packed, unpacked or int8) `Linear.forward` takes for the full layer."""
        sub = project(h, self.weight, self.bias, quantized=self.quantized, packed=self.packed)
        out = np.full((h.shape[0], self.vocab_size), -np.inf, np.float32)
        out[:, self.ids] = sub
        return out


def _int8_rows(qw: ops.QuantizedWeight, ids: np.ndarray) -> np.ndarray:
    """Rows ids of an int8 weight, read from its 16-row panels (not the whole matrix)."""
    panels, pairs, _ = qw.data.shape
    lanes = qw.data.reshape(panels, pairs, 16, 2)[ids // 16, :, ids % 16]  # (K, pairs, 2)
    return np.ascontiguousarray(lanes.reshape(ids.size, pairs * 2)[:, : qw.in_features])


def attention_capture(layer: Any, heads: Any, num_layers: int) -> AttentionCapture:
    """The checked request for decoder layer `layer`'s cross-attention (per head with heads)."""
    layer = check_layer_index("attention_layer", layer, num_layers)
    return AttentionCapture(layer, check_bool("attention_heads", heads))


def decode_step(
    model: Any, state: DecoderState, tokens: Any, capture: AttentionCapture | None
) -> np.ndarray:
    """One incremental step of model.decoder: tokens (B,) at position state.step -> logits (B, V).
    capture: receives one layer's cross-attention."""
    if not isinstance(state, DecoderState):
        raise TypeError(f"state: expected a DecoderState, got {type(state).__name__}")
    if state.step >= state.max_steps:
        raise ValueError(f"state: all {state.max_steps} steps are used (max_steps)")
    native = state.native_step(model) if capture is None else None
    if native is not None:
        return _native_decode_step(native, state, tokens)
    tokens = check_ids("tokens", tokens, model.config.tgt_vocab_size, 1)
    _check_rows(tokens, state)
    pos = state.step
    state.reserve(pos + 1)
    with model.ctx.inference(), packed_weights(state.packed_weights):
        x = model.tgt_embed.forward(tokens[:, None], model.positions[pos : pos + 1])
        h = model.decoder.step(
            x, pos, state.kv_caches, state.cross_kvs, state.memory_layout, capture
        )
        if state.output_rows is not None:
            logits = state.output_rows.logits(h)
        else:
            logits = model.output.forward(h)
    state.step += 1
    return logits


def _check_rows(tokens: np.ndarray, state: DecoderState) -> None:
    if tokens.shape[0] != state.batch_size:
        raise ValueError(f"tokens: {tokens.shape[0]} rows, the state has {state.batch_size}")


def _native_decode_step(native: Any, state: DecoderState, tokens: Any) -> np.ndarray:
    """decode_step as one native call: the plan checks the tokens (the errors of check_ids) and
    embeds them, and projects them too unless the state scores a vocabulary subset."""
    if not isinstance(tokens, np.ndarray):
        raise TypeError(f"tokens: expected a numpy integer array, got {type(tokens).__name__}")
    if tokens.ndim == 1:
        _check_rows(tokens, state)
    pos = state.step
    state.reserve(pos + 1)
    ml = state.memory_layout
    lengths = ml.lengths if ml is not None else None
    rows = state.output_rows
    out = native.run_tokens(
        tokens, pos, state.kv_caches, state.cross_kvs, lengths, project=rows is None
    )
    state.step += 1
    return out if rows is None else rows.logits(out)
