"""The encoder-decoder Transformer of "Attention Is All You Need".

Dimension legend: B batch, S source length, T target length, C d_model, H heads, D = C/H, V vocab.

Training: `loss, n = model.loss_and_grad(batch, label_smoothing=0.1, dropout_seed=k)` runs the
forward pass, the fused label-smoothed cross-entropy over the non-pad targets and the explicit
backward; gradients (of the mean loss) accumulate into `gradients()`; `loss` is that mean times
n. Dropout applies in train mode (`model.train()`, the default) with masks derived only from
dropout_seed. `evaluate_loss(batch)` is the no-dropout, no-smoothing, no-gradient counterpart.
Padding costs nothing: position-wise layers run on the packed real tokens only (see
`nn.layout.Layout`); attention reads them back in (B, L) layout.

Decoding: `memory = model.encode(src, src_lengths)`, `state = model.init_decoder_state(memory,
src_lengths, max_steps)`, then `logits, attn = model.decode_step(state, tokens)` per position and
`state.reorder(rows)` to follow beams or drop finished rows (the state's caches grow with the
steps; `vocab_subset=ids` restricts the output projection to a shortlist, e.g. from
`decode.vmap.VocabMap`); `translate` runs the searches of `pytransformer.decode` over those.
These never write module state, so several threads may decode with one model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checks import check_lengths
from ..decode import api as decode_api
from ..nn.blocks import Decoder, Encoder
from ..nn.layout import Layout
from ..nn.params import embedding_init
from .base import Model, batch_field, dense_rows, target_layout
from .config import TransformerConfig, check_same_vocabularies, check_source_pad
from .state import (
    DecoderState,
    attention_capture,
    check_max_steps,
    check_vocab_subset,
    decode_step,
    new_state,
)


class Transformer(Model):
    """The encoder-decoder Transformer.

    Parameter names: `src_embed.weight`, `tgt_embed.weight` (also the output projection when
    tie_embeddings="decoder"), `embed.weight` (all three when "all", both embeddings when
    "embeddings"), `output.weight` (when "none" or "embeddings"), `output.bias` (when
    output_bias), `encoder.layers.{i}.*`, `decoder.layers.{i}.*`,
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
        check_source_pad(cfg)
        C = cfg.d_model
        if cfg.tie_embeddings in ("all", "embeddings"):
            check_same_vocabularies(cfg)
            shared = self.store.add("embed.weight", (cfg.src_vocab_size, C), embedding_init)
            src_w = tgt_w = shared
            out_w = shared if cfg.tie_embeddings == "all" else None
        else:
            src_w = self.store.add("src_embed.weight", (cfg.src_vocab_size, C), embedding_init)
            tgt_w = self.store.add("tgt_embed.weight", (cfg.tgt_vocab_size, C), embedding_init)
            out_w = tgt_w if cfg.tie_embeddings == "decoder" else None
        self.src_embed = self._make_embedding("src_embed", cfg.src_vocab_size, src_w)
        self.tgt_embed = self._make_embedding("tgt_embed", cfg.tgt_vocab_size, tgt_w)
        self.encoder = Encoder(
            self.store, "encoder", cfg, self.ctx, window=cfg.encoder_attention_window
        )
        self.decoder = Decoder(
            self.store, "decoder", cfg, self.ctx, window=cfg.decoder_attention_window
        )
        self.output = self._make_output(cfg.tgt_vocab_size, out_w)
        self._finish(seed)

    # -- checks -----------------------------------------------------------------------------------
    def _check_tgt(self, name: str, tgt: Any, batch: int) -> np.ndarray:
        tgt = self._check_tokens(name, tgt, self.config.tgt_vocab_size)
        if tgt.shape[0] != batch:
            raise ValueError(f"{name}: batch size {tgt.shape[0]} does not match src's {batch}")
        return tgt

    def _check_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        src, src_lengths = self._check_src(
            batch_field(batch, "src"), batch_field(batch, "src_lengths")
        )
        tgt_in = self._check_tgt("tgt_in", batch_field(batch, "tgt_in"), src.shape[0])
        tgt_out = self._check_tgt("tgt_out", batch_field(batch, "tgt_out"), src.shape[0])
        self._check_pair("tgt_out", tgt_out, "tgt_in", tgt_in)
        return src, src_lengths, tgt_in, tgt_out

    # -- training ---------------------------------------------------------------------------------
    def _hidden(
        self, src: np.ndarray, src_lengths: np.ndarray, tgt_in: np.ndarray, tgt_layout: Layout
    ) -> tuple[np.ndarray, Any]:
        """Packed decoder output (N_t, C) and its backward."""
        src_layout = Layout(src.shape[0], src.shape[1], src_lengths)
        memory = self.encoder.forward(self._embed(self.src_embed, src, src_layout), src_layout)
        x = self._embed(self.tgt_embed, tgt_in, tgt_layout)
        h = self.decoder.forward(x, tgt_layout, memory, src_layout)

        def backward(dh: np.ndarray) -> None:
            dmemory = np.zeros_like(memory)
            self.tgt_embed.backward(self.decoder.backward(dh, dmemory))
            self.src_embed.backward(self.encoder.backward(dmemory))

        return h, backward

    def forward(
        self, src: np.ndarray, src_lengths: np.ndarray, tgt_in: np.ndarray, *, dropout_seed: int = 0
    ) -> np.ndarray:
        """Logits (B, T, V) for teacher-forced targets. src (B, S) ids (padding: any id in range),
        src_lengths (B,), tgt_in (B, T). In train mode keeps what `backward` needs (and applies
        dropout, its masks from dropout_seed)."""
        src, src_lengths = self._check_src(src, src_lengths)
        tgt_in = self._check_tgt("tgt_in", tgt_in, src.shape[0])
        shape = tgt_in.shape + (self.config.tgt_vocab_size,)
        logits = self._logits(
            dropout_seed,
            lambda: self._hidden(src, src_lengths, tgt_in, Layout(*tgt_in.shape)),
            shape,
            dense_rows,
        )
        return logits.reshape(shape)

    def loss_and_grad(
        self, batch: Any, *, label_smoothing: float = 0.1, dropout_seed: int = 0
    ) -> tuple[float, int]:
        """Forward, label-smoothed cross-entropy over the non-pad targets of batch.tgt_out,
        backward. Gradients (of the mean loss over those tokens) accumulate into `gradients()`.
        Dropout is applied in train mode, its masks derived only from dropout_seed.
        Returns (mean loss x n_tokens, n_tokens)."""
        src, src_lengths, tgt_in, tgt_out = self._check_batch(batch)
        layout = target_layout(tgt_out, self.config.pad_id)
        return self._loss_and_grad(
            dropout_seed,
            label_smoothing,
            lambda: self._hidden(src, src_lengths, tgt_in, layout),
            layout.pack_ids(tgt_out),
        )

    def evaluate_loss(self, batch: Any) -> tuple[float, int]:
        """(sum of token cross-entropies, n_tokens) over the non-pad targets; no dropout, no label
        smoothing, no gradients."""
        src, src_lengths, tgt_in, tgt_out = self._check_batch(batch)
        layout = target_layout(tgt_out, self.config.pad_id)
        return self._evaluate_loss(
            lambda: self._hidden(src, src_lengths, tgt_in, layout), layout.pack_ids(tgt_out)
        )

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
        vocab_subset: np.ndarray | None = None,
    ) -> DecoderState:
        """Projects the memory to each decoder layer's cross-attention K/V once and makes the
        self-attention caches (which grow with the steps, up to max_steps positions).
        pack_weights: give the state packed copies of the weights every step reads
        (`ops.PackedWeight`; about the decoder's size in extra memory while the state lives,
        each step 10-30 % faster with 4+ rows); None decides by
        `nn.layers.worth_packing(B, max_steps)`. vocab_subset: sorted unique target ids
        (int array holding eos_id, e.g. `decode.vmap.VocabMap.subset`): each step computes the
        output projection for those rows only and gives -inf logits to every other token."""
        cfg = self.config
        if not isinstance(memory, np.ndarray) or memory.dtype != np.float32:
            raise TypeError("memory: expected a float32 numpy array (from encode())")
        if memory.ndim != 3 or memory.shape[2] != cfg.d_model or 0 in memory.shape:
            raise ValueError(
                f"memory: expected shape (B>0, S>0, {cfg.d_model}), got {memory.shape}"
            )
        B, S, _ = memory.shape
        src_lengths = check_lengths("src_lengths", src_lengths, B, S)
        max_steps = check_max_steps(max_steps, cfg.max_len)
        vocab_subset = check_vocab_subset(vocab_subset, cfg.tgt_vocab_size, cfg.eos_id)
        layout = Layout(B, S, src_lengths.copy())
        packed = layout.pack(np.ascontiguousarray(memory))
        with self.ctx.inference():
            cross = [
                layer.cross_attn.project_memory(packed, layout) for layer in self.decoder.layers
            ]
        return new_state(self, B, max_steps, pack_weights, (cross, layout), vocab_subset)

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
        from the last), (B, S) averaged over heads, or (B, H, S) with attention_heads. The
        logits are the model's own: `translate` masks config.suppress_ids itself."""
        if not need_attention:
            return decode_step(self, state, tokens, None), None
        capture = attention_capture(attention_layer, attention_heads, len(self.decoder.layers))
        logits = decode_step(self, state, tokens, capture)
        return logits, capture.probs[:, :, 0] if capture.per_head else capture.probs[:, 0]

    def translate(self, sources: Any, **kwargs: Any) -> Any:
        """Decodes a list of source id sequences: see `pytransformer.decode.translate`."""
        return decode_api.translate(self, sources, **kwargs)

