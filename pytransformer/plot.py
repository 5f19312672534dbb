"""Pictures: the training curve from a training log, a cross-attention heatmap, and the Vision
Transformer's class-token attention over image patches.

Needs matplotlib (the ``demo`` or ``vision`` extra); drawn with the Agg backend, so no display is
required.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from .checks import check_int
from .io import split_lines


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'pytransformer[demo]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines training log."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"log: {path} does not exist")
    records = []
    for n, line in enumerate(split_lines(path.read_text(encoding="utf-8")), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"log: {path} line {n} is not JSON ({exc})") from None
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_training_curve(log_path: str | os.PathLike, out_png: str | os.PathLike) -> str:
    """Train and validation loss (left axis) and learning rate (right axis) against step; when
    the log has validation BLEU (``valid_bleu``), a second panel of it against training time."""
    records = read_log(log_path)
    steps, train = _series(records, "train_loss")
    if not steps:
        raise ValueError(f"log: {log_path} has no training records")
    plt = _pyplot()
    bleu = [(r["elapsed_s"] / 60.0, r["valid_bleu"]) for r in records
            if "valid_bleu" in r and "elapsed_s" in r]  # fmt: skip
    if bleu:
        fig, (ax, bleu_ax) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=120)
        bleu_ax.plot([t for t, _ in bleu], [b for _, b in bleu], "o-", color="tab:green")
        bleu_ax.set_xlabel("training time (minutes)")
        bleu_ax.set_ylabel("validation BLEU (greedy)")
        bleu_ax.grid(alpha=0.3)
        bleu_ax.set_title("validation BLEU against time")
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, train, label="train loss (label-smoothed)", color="tab:blue")
    vsteps, valid = _series(records, "valid_loss")
    if vsteps:
        ax.plot(vsteps, valid, "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("update step")
    ax.set_ylabel("loss per target token (nats)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lsteps, lr = _series(records, "lr")
    lr_ax.plot(lsteps, lr, "--", color="tab:gray", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right")
    ax.set_title("pytransformer training curve")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return os.fspath(out_png)


def plot_attention(
    translator: Any,
    sentence: str,
    out_png: str | os.PathLike,
    *,
    layer: int = -1,
    head: int | None = None,
    **options: Any,
) -> str:
    """Heatmap of the cross-attention of the best translation of ``sentence``: target tokens
    down, source tokens across. layer: the decoder layer (negative: from the last); head: one
    head's weights (None: the average over heads)."""
    if head is not None:  # checked before the translation is worked out
        heads = translator.model.config.num_heads
        check_int("head", head, 0, heads - 1)
    src_tokens, tgt_tokens, attn, translation = translator.attention(
        sentence, attention_layer=layer, attention_heads=head is not None, **options
    )
    which = ("last decoder layer" if layer == -1 else f"decoder layer {layer}") + (
        ", mean of heads" if head is None else f", head {head}"
    )
    if head is not None:
        attn = attn[head]
    plt = _pyplot()
    width = max(4.0, 0.45 * len(src_tokens) + 2)
    height = max(3.0, 0.4 * len(tgt_tokens) + 2)
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    image = ax.imshow(attn[:, : len(src_tokens)], cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=60, ha="right")
    ax.set_yticks(range(len(tgt_tokens)), tgt_tokens)
    ax.set_xlabel("source tokens")
    ax.set_ylabel("generated target tokens")
    ax.set_title(f"cross-attention ({which})\n{sentence!r}\n→ {translation!r}", fontsize=9)
    fig.colorbar(image, ax=ax, label="attention weight")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return os.fspath(out_png)


def plot_class_attention(
    images: np.ndarray,
    attention: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    out_png: str | os.PathLike,
) -> str:
    """One row per image: the image (H, W), then for each encoder layer the class token's
    attention over the patch grid, averaged over heads (VisionTransformer.class_attention gives
    attention (n_images, layers, heads, grid, grid)). Each map is scaled to its own maximum: the
    pattern matters, and the weight the class token keeps for itself is left out."""
    if attention.ndim != 5 or attention.shape[0] != images.shape[0] or images.ndim != 3:
        raise ValueError(
            f"attention: expected (n_images, layers, heads, grid, grid) for {images.shape[0]} "
            f"images (H, W), got {attention.shape} for images {images.shape}"
        )
    maps = attention.mean(axis=2)
    rows, layers = maps.shape[:2]
    plt = _pyplot()
    fig, axes = plt.subplots(
        rows, layers + 1, figsize=(1.6 * (layers + 1), 1.6 * rows), dpi=120, squeeze=False
    )
    for r in range(rows):
        axes[r, 0].imshow(images[r], cmap="gray_r")
        axes[r, 0].set_title(f"label {labels[r]}, says {predicted[r]}", fontsize=7)
        for k in range(layers):
            axes[r, k + 1].imshow(maps[r, k], cmap="viridis", vmin=0.0)
            if r == 0:
                axes[r, k + 1].set_title(f"layer {k}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("class token's attention over the patches (mean of heads)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return os.fspath(out_png)
