"""Training: batches of token ids (data) and of labelled images (images), Adam/AdamW (optim),
learning-rate schedules (schedule) and the resumable, bit-reproducible training loop (trainer)."""

from .data import Batch, EpochBatcher, TokenBatcher, make_batch, make_lm_batch, synthetic_pairs
from .images import ImageBatch, ImageBatcher
from .optim import Adam, AdamW
from .schedule import Constant, Cosine, InverseSqrt, Noam, Schedule, schedule_from_dict
from .trainer import DataSource, TrainBatch, Trainer, latest_checkpoint

__all__ = [
    "Batch", "EpochBatcher", "TokenBatcher", "make_batch", "make_lm_batch", "synthetic_pairs",
    "ImageBatch", "ImageBatcher",
    "Adam", "AdamW",
    "Schedule", "Constant", "Cosine", "InverseSqrt", "Noam", "schedule_from_dict",
    "Trainer", "DataSource", "TrainBatch", "latest_checkpoint",
]
