"""Training: batches of token ids (data), Adam/AdamW (optim), learning-rate schedules
(schedule) and the resumable, bit-reproducible training loop (trainer)."""

from .data import Batch, TokenBatcher, make_batch, make_lm_batch, synthetic_pairs
from .optim import Adam, AdamW
from .schedule import Constant, Cosine, InverseSqrt, Noam, Schedule, schedule_from_dict
from .trainer import Trainer, latest_checkpoint

__all__ = [
    "Batch", "TokenBatcher", "make_batch", "make_lm_batch", "synthetic_pairs",
    "Adam", "AdamW",
    "Schedule", "Constant", "Cosine", "InverseSqrt", "Noam", "schedule_from_dict",
    "Trainer", "latest_checkpoint",
]
