"""The encoder-only variant: a per-token classification head over the encoder."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checks import check_ids
from ..nn.blocks import Encoder
from ..nn.layout import Layout
from .base import Model, batch_field
from .config import TransformerConfig, check_same_vocabularies, check_source_pad


class TransformerEncoderModel(Model):
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
        check_source_pad(cfg)
        self.src_embed = self._make_embedding("src_embed", cfg.src_vocab_size, None)
        self.encoder = Encoder(
            self.store, "encoder", cfg, self.ctx, window=cfg.encoder_attention_window
        )
        tied = None
        if cfg.tie_embeddings == "all":
            check_same_vocabularies(cfg)
            tied = self.src_embed.weight
        self.output = self._make_output(cfg.tgt_vocab_size, tied)
        self._finish(seed)

    def _hidden(self, src: np.ndarray, layout: Layout) -> tuple[np.ndarray, Any]:
        h = self.encoder.forward(self._embed(self.src_embed, src, layout), layout)
        return h, lambda dh: self.src_embed.backward(self.encoder.backward(dh))

    def encode(self, src: np.ndarray, src_lengths: np.ndarray) -> np.ndarray:
        """Final hidden states (B, S, C), zeros past each length; no dropout, no gradients."""
        src, src_lengths = self._check_src(src, src_lengths)
        layout = Layout(src.shape[0], src.shape[1], src_lengths)
        with self.ctx.inference():
            return layout.pad(self._hidden(src, layout)[0])

    def forward(
        self, src: np.ndarray, src_lengths: np.ndarray, *, dropout_seed: int = 0
    ) -> np.ndarray:
        """Per-token logits (B, S, tgt_vocab_size), zeros past each length; in train mode keeps
        what `backward` needs (whose dlogits past each length are ignored)."""
        src, src_lengths = self._check_src(src, src_lengths)
        layout = Layout(src.shape[0], src.shape[1], src_lengths)
        shape = (layout.B, layout.L, self.config.tgt_vocab_size)
        logits = self._logits(dropout_seed, lambda: self._hidden(src, layout), shape, layout.pack)
        return layout.pad(logits)

    def _check_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray, Layout]:
        """batch.src, its labels (B, S) and the layout of its lengths."""
        src, src_lengths = self._check_src(
            batch_field(batch, "src"), batch_field(batch, "src_lengths")
        )
        labels = check_ids("labels", batch_field(batch, "labels"), self.config.tgt_vocab_size, 2)
        self._check_pair("labels", labels, "src", src)
        return src, labels, Layout(src.shape[0], src.shape[1], src_lengths)

    def loss_and_grad(
        self, batch: Any, *, label_smoothing: float = 0.0, dropout_seed: int = 0
    ) -> tuple[float, int]:
        """Per-token classification: batch.src, batch.src_lengths, batch.labels (B, S) with pad_id
        where no label applies. Returns (mean loss x n_labels, n_labels); gradients
        accumulate."""
        src, labels, layout = self._check_batch(batch)
        return self._loss_and_grad(
            dropout_seed, label_smoothing, lambda: self._hidden(src, layout),
            layout.pack_ids(labels),
        )

    def evaluate_loss(self, batch: Any) -> tuple[float, int]:
        """(sum of token cross-entropies, n_labels); no dropout, smoothing or gradients."""
        src, labels, layout = self._check_batch(batch)
        return self._evaluate_loss(lambda: self._hidden(src, layout), layout.pack_ids(labels))
