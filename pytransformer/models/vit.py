"""The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words"): an image cut
into p x p patches, each patch flattened and projected to a token, a learned class token in
front, learned position embeddings added, the pre-norm encoder stack of nn.blocks over those
tokens, and a classification head on the class token's final hidden state.

Positions are learned, not sinusoidal: the paper found 2-D-aware position codes no better than
a learned 1-D table, the table here is tiny ((1 + patches) x d_model), and a learned table gives
the class token a position of its own instead of pretending it sits at a pixel.

Dimension legend: B images, K channels, S image side, p patch side, n = S / p patches per side,
P = n * n patches, L = 1 + P tokens, C d_model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..checks import check_float, check_ids, check_int
from ..nn.attention import attention_probs
from ..nn.blocks import Encoder
from ..nn.layers import Dropout, Linear
from ..nn.layout import Layout
from ..nn.params import Init
from .base import Model, batch_field
from .config import JsonConfig, check_layer_settings

_PREDICT_ROWS = 1024  # images per inference pass in predict and class_attention
_BATCH = "pytransformer.train.ImageBatch"


@dataclasses.dataclass
class ViTConfig(JsonConfig):
    """Hyper-parameters of a VisionTransformer for square images of `image_size` pixels with
    `channels` channels, cut into patches of `patch_size` pixels (which must divide image_size),
    classified into `num_classes` classes. The defaults are a small model for the CPU; the encoder
    is always pre-norm (the ViT paper's), ending in a final LayerNorm."""

    image_size: int
    patch_size: int
    num_classes: int
    channels: int = 1
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 128
    num_layers: int = 4
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02  # of the class token and the position table, as in the paper

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "d_model", "num_heads", "d_ff",
                     "num_layers"):  # fmt: skip
            setattr(self, name, check_int(name, getattr(self, name), 1))
        self.num_classes = check_int("num_classes", self.num_classes, 2)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size: {self.patch_size} does not divide image_size {self.image_size} "
                "(the image must cut into whole patches)"
            )
        check_layer_settings(self)
        self.init_std = check_float("init_std", self.init_std, positive=True)

    # What nn.blocks.Encoder reads from a config.
    @property
    def num_encoder_layers(self) -> int:
        return self.num_layers

    @property
    def norm_first(self) -> bool:
        return True

    @property
    def grid(self) -> int:
        """Patches per side (n)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x p x p."""
        return self.channels * self.patch_size**2


def _normal_init(std: float) -> Init:
    def init(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(std)
        return w

    return init


class VisionTransformer(Model):
    """Image classifier: patches -> tokens -> pre-norm encoder -> head on the class token.

    Images are float (B, channels, image_size, image_size) arrays; labels int (B,) in
    [0, num_classes). Parameters: `patch_embed.weight` (C, channels*p*p) and `.bias`,
    `cls_token` (C,), `pos_embed` (1 + P, C) (row 0 is the class token's), `encoder.layers.{i}.*`,
    `encoder.norm.*` (the final LayerNorm), `head.weight` (num_classes, C) and `head.bias`.
    """

    config_class = ViTConfig

    def __init__(self, config: ViTConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        cfg = config
        self.patch_embed = Linear(self.store, "patch_embed", cfg.patch_dim, cfg.d_model)
        init = _normal_init(cfg.init_std)
        self.cls_token = self.store.add("cls_token", (cfg.d_model,), init)
        self.pos_embed = self.store.add("pos_embed", (1 + cfg.num_patches, cfg.d_model), init)
        self.embed_dropout = Dropout(cfg.dropout, self.ctx)
        self.encoder = Encoder(self.store, "encoder", cfg, self.ctx)
        self.output = Linear(self.store, "head", cfg.d_model, cfg.num_classes)
        self._finish(seed)

    # -- the computation --------------------------------------------------------------------------
    def patches(self, images: np.ndarray) -> np.ndarray:
        """(B, K, S, S) -> (B * P, K * p * p): patches in row-major grid order, each flattened
        channel by channel, then row by row."""
        cfg = self.config
        B, n, p = images.shape[0], cfg.grid, cfg.patch_size
        x = images.reshape(B, cfg.channels, n, p, n, p).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(x).reshape(B * cfg.num_patches, cfg.patch_dim)

    def _tokens(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's input rows (B * L, C), and the patches their backward needs."""
        B, C, L = images.shape[0], self.config.d_model, 1 + self.config.num_patches
        patches = self.patches(images)
        x = np.empty((B, L, C), np.float32)
        x[:, 0] = self.cls_token.data
        x[:, 1:] = self.patch_embed.forward(patches).reshape(B, L - 1, C)
        x += self.pos_embed.data
        return self.embed_dropout.forward(x.reshape(B * L, C)), patches

    def _tokens_backward(self, dx: np.ndarray, patches: np.ndarray) -> None:
        C, L = self.config.d_model, 1 + self.config.num_patches
        dx = self.embed_dropout.backward(dx).reshape(-1, L, C)
        self.pos_embed.grad += dx.sum(axis=0)
        self.cls_token.grad += dx[:, 0].sum(axis=0)
        dpatch = np.ascontiguousarray(dx[:, 1:]).reshape(-1, C)
        self.patch_embed.backward(dpatch, patches)  # its dx (d of the pixels) is not needed

    def _hidden(self, images: np.ndarray) -> tuple[np.ndarray, Any]:
        """The class token's final hidden state (B, C) and its backward."""
        B, C, L = images.shape[0], self.config.d_model, 1 + self.config.num_patches
        x, patches = self._tokens(images)
        h = self.encoder.forward(x, Layout(B, L)).reshape(B, L, C)

        def backward(dh: np.ndarray) -> None:
            # Only the class token reaches the head: the other rows get no gradient from it.
            dtokens = np.zeros((B, L, C), np.float32)
            dtokens[:, 0] = dh
            self._tokens_backward(self.encoder.backward(dtokens.reshape(B * L, C)), patches)

        return np.ascontiguousarray(h[:, 0]), backward

    def _target_rows(self, targets: np.ndarray) -> np.ndarray:
        return np.arange(targets.size)  # every label counts: class 0 is no padding

    # -- entry points -----------------------------------------------------------------------------
    def forward(self, images: np.ndarray, *, dropout_seed: int = 0) -> np.ndarray:
        """Logits (B, num_classes); in train mode keeps what `backward` needs."""
        images = self._check_images(images)
        shape = (images.shape[0], self.config.num_classes)
        return self._logits(dropout_seed, lambda: self._hidden(images), shape, lambda d: d)

    def loss_and_grad(
        self, batch: Any, *, label_smoothing: float = 0.0, dropout_seed: int = 0
    ) -> tuple[float, int]:
        """batch.images (B, K, S, S), batch.labels (B,). Returns (mean loss x B, B) of the
        label-smoothed cross-entropy; gradients accumulate."""
        images, labels = self._check_batch(batch)
        return self._loss_and_grad(
            dropout_seed, label_smoothing, lambda: self._hidden(images), labels
        )

    def evaluate_loss(self, batch: Any) -> tuple[float, int]:
        """(sum of the images' cross-entropies, B); no dropout, smoothing or gradients."""
        images, labels = self._check_batch(batch)
        return self._evaluate_loss(lambda: self._hidden(images), labels)

    def predict(self, images: np.ndarray, *, return_logits: bool = False) -> np.ndarray:
        """The most likely class of each image, int64 (B,) (or the logits (B, num_classes) with
        return_logits); no dropout, no gradients, whatever the mode."""
        images = self._check_images(images)
        out = []
        with self.ctx.inference():
            for start in range(0, images.shape[0], _PREDICT_ROWS):
                h, _ = self._hidden(images[start : start + _PREDICT_ROWS])
                out.append(self.output.forward(h))
        logits = np.concatenate(out)
        return logits if return_logits else logits.argmax(axis=1).astype(np.int64)

    def class_attention(self, images: np.ndarray, layer: int | None = None) -> np.ndarray:
        """How the class token attends to the patches: (B, layers, heads, n, n), the softmax
        weights of its query over the patch keys in each layer and head, laid out on the patch
        grid (each head's weights sum to 1 minus what the class token gives itself). With
        `layer`, only that layer: (B, heads, n, n). No dropout, no gradients."""
        images = self._check_images(images)
        n = len(self.encoder.layers)
        chosen = None if layer is None else check_int("layer", layer, -n, n - 1)
        parts = []
        with self.ctx.inference():
            for start in range(0, images.shape[0], _PREDICT_ROWS):
                parts.append(self._class_attention(images[start : start + _PREDICT_ROWS]))
        probs = np.concatenate(parts)
        return probs if chosen is None else probs[:, chosen]

    def _class_attention(self, images: np.ndarray) -> np.ndarray:
        cfg = self.config
        B, L = images.shape[0], 1 + cfg.num_patches
        H, D = cfg.num_heads, cfg.d_model // cfg.num_heads
        layout = Layout(B, L)
        x, _ = self._tokens(images)
        out = []
        for layer in self.encoder.layers:
            # The query and keys the layer's attention sees: its pre-norm, then the projection.
            qkv = layer.self_attn.qkv.forward(layer.attn_block.norm.forward(x))
            qkv = qkv.reshape(B, L, 3, H, D)
            p = attention_probs(qkv[:, :1, 0], qkv[:, :, 1], None, average_heads=False)
            out.append(p[:, :, 0, 1:].reshape(B, H, cfg.grid, cfg.grid))
            x = layer.forward(x, layout)
        return np.stack(out, axis=1)

    # -- checks -----------------------------------------------------------------------------------
    def _check_images(self, images: Any) -> np.ndarray:
        """Floating (B, channels, image_size, image_size), finite; returned float32 C-order."""
        cfg = self.config
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images: expected a numpy float array, got {type(images).__name__}")
        if images.dtype.kind != "f":
            raise TypeError(f"images: expected a floating array, got dtype {images.dtype}")
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or images.shape[1:] != want:
            raise ValueError(
                f"images: expected shape (B, {', '.join(map(str, want))}), got {images.shape}"
            )
        if images.shape[0] == 0:
            raise ValueError("images: empty batch")
        images = np.ascontiguousarray(images, dtype=np.float32)
        if not np.isfinite(images).all():
            raise ValueError("images: holds NaN or infinite values")
        return images

    def _check_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        images = self._check_images(batch_field(batch, "images", _BATCH))
        labels = check_ids(
            "labels", batch_field(batch, "labels", _BATCH), self.config.num_classes, 1
        )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels: {labels.shape[0]} labels for {images.shape[0]} images")
        return images, labels
