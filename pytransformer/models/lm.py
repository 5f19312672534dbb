"""The decoder-only variant: a causal language model over the target vocabulary."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checks import check_int
from ..decode import api as decode_api
from ..nn.blocks import Decoder
from ..nn.layout import Layout
from .base import Model, batch_field, dense_rows, target_layout
from .config import TransformerConfig
from .state import DecoderState, check_max_steps, decode_step, new_state


class TransformerLM(Model):
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
        self.decoder = Decoder(
            self.store, "decoder", cfg, self.ctx, cross=False, window=cfg.decoder_attention_window
        )
        # "embeddings" ties the two input embeddings; an LM has one, so its output is separate.
        tied = self.tgt_embed.weight if cfg.tie_embeddings not in ("none", "embeddings") else None
        self.output = self._make_output(cfg.tgt_vocab_size, tied)
        self._finish(seed)

    def _check_ids(self, name: str, ids: Any) -> np.ndarray:
        return self._check_tokens(name, ids, self.config.tgt_vocab_size)

    def _hidden(self, ids: np.ndarray, layout: Layout) -> tuple[np.ndarray, Any]:
        h = self.decoder.forward(self._embed(self.tgt_embed, ids, layout), layout)
        return h, lambda dh: self.tgt_embed.backward(self.decoder.backward(dh))

    def forward(self, ids: np.ndarray, *, dropout_seed: int = 0) -> np.ndarray:
        """Next-token logits (B, T, V) for ids (B, T) (padding, if any, at the end of rows)."""
        ids = self._check_ids("ids", ids)
        shape = ids.shape + (self.config.tgt_vocab_size,)
        logits = self._logits(
            dropout_seed, lambda: self._hidden(ids, Layout(*ids.shape)), shape, dense_rows
        )
        return logits.reshape(shape)

    def _check_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        tgt_in = self._check_ids("tgt_in", batch_field(batch, "tgt_in"))
        tgt_out = self._check_ids("tgt_out", batch_field(batch, "tgt_out"))
        self._check_pair("tgt_out", tgt_out, "tgt_in", tgt_in)
        return tgt_in, tgt_out

    def loss_and_grad(
        self, batch: Any, *, label_smoothing: float = 0.1, dropout_seed: int = 0
    ) -> tuple[float, int]:
        """As Transformer.loss_and_grad, on batch.tgt_in / batch.tgt_out (src fields unused)."""
        tgt_in, tgt_out = self._check_batch(batch)
        layout = target_layout(tgt_out, self.config.pad_id)
        return self._loss_and_grad(
            dropout_seed, label_smoothing, lambda: self._hidden(tgt_in, layout),
            layout.pack_ids(tgt_out),
        )

    def evaluate_loss(self, batch: Any) -> tuple[float, int]:
        """(sum of token cross-entropies, n_tokens) over non-pad targets; no dropout or
        smoothing."""
        tgt_in, tgt_out = self._check_batch(batch)
        layout = target_layout(tgt_out, self.config.pad_id)
        return self._evaluate_loss(lambda: self._hidden(tgt_in, layout), layout.pack_ids(tgt_out))

    def init_state(
        self, batch_size: int, max_steps: int, *, pack_weights: bool | None = None
    ) -> DecoderState:
        """Empty self-attention caches for batch_size rows and max_steps positions
        (pack_weights: as in `Transformer.init_decoder_state`)."""
        batch_size = check_int("batch_size", batch_size, 1)
        max_steps = check_max_steps(max_steps, self.config.max_len)
        return new_state(self, batch_size, max_steps, pack_weights)

    def decode_step(
        self, state: DecoderState, tokens: np.ndarray, *, need_attention: bool = False
    ) -> tuple[np.ndarray, None]:
        """Feeds tokens (B,) at position state.step; returns (logits (B, V), None)."""
        return decode_step(self, state, tokens, None), None

    def generate(self, prompts: Any, **kwargs: Any) -> Any:
        """Continues each prompt: see `pytransformer.decode.generate`."""
        return decode_api.generate(self, prompts, **kwargs)
