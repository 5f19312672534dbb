"""Batches of labelled images for the Vision Transformer, in the data-source shape the Trainer
takes (`next_batch`, `epoch`, `state_dict` / `load_state_dict`; see trainer.DataSource).

Dimension legend: N images in the data set, B in a batch, K channels, H x W pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import check_bool, check_int
from .data import EpochBatcher

__all__ = ["ImageBatch", "ImageBatcher"]


@dataclass
class ImageBatch:
    """images (B, K, H, W) float32, labels (B,) int64, indices (B,) int64: the images' positions
    in their data set (or None). ``n_targets`` = B: the loss averages over images."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_targets(self) -> int:
        return self.size


def check_image_set(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """A floating (N, K, H, W) array and N non-negative integer labels, as float32 / int64."""
    if not isinstance(images, np.ndarray) or images.dtype.kind != "f":
        what = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise TypeError(f"images: expected a floating numpy array, got {what}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, K, H, W) array, got {images.shape}")
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        what = labels.dtype if isinstance(labels, np.ndarray) else type(labels).__name__
        raise TypeError(f"labels: expected a numpy integer array, got {what}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels: expected shape ({images.shape[0]},), got {labels.shape}")
    if labels.min() < 0:
        raise IndexError(f"labels: negative label {int(labels.min())}")
    return np.ascontiguousarray(images, np.float32), labels.astype(np.int64)


class ImageBatcher(EpochBatcher):
    """Batches of ``batch_size`` images (the last of an epoch smaller, unless ``drop_last``).

    One epoch visits every image once (but the few ``drop_last`` leaves out), in an order shuffled
    (when ``shuffle``) by the generator seeded by ``seed``; the iteration state is resumable
    exactly (``state_dict`` / ``load_state_dict``, see EpochBatcher).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.images, self.labels = check_image_set(images, labels)
        self.batch_size = check_int("batch_size", batch_size, 1, self.labels.size)
        self.seed = check_int("seed", seed, 0)
        self.shuffle = check_bool("shuffle", shuffle)
        self.drop_last = check_bool("drop_last", drop_last)
        self._begin(self.seed)

    def _plan(self) -> list[np.ndarray]:
        n = self.labels.size
        order = self._rng.permutation(n) if self.shuffle else np.arange(n)
        stop = n - n % self.batch_size if self.drop_last else n
        return [order[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def _identity(self) -> dict[str, Any]:
        return {"n_images": int(self.labels.size), "batch_size": self.batch_size}

    def batch(self, indices: np.ndarray) -> ImageBatch:
        """The ImageBatch of the given data-set positions."""
        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1 or indices.size == 0:
            raise ValueError("indices: expected a non-empty 1-D array of data-set positions")
        if indices.min() < 0 or indices.max() >= self.labels.size:
            raise IndexError(f"indices: out of range [0, {self.labels.size})")
        return ImageBatch(self.images[indices], self.labels[indices], indices)
