"""Training: batches of token ids (data) and of labelled images (images), binarized corpora in
memory-mapped shards (shards), Adam/AdamW (optim), learning-rate schedules (schedule), the
resumable, bit-reproducible training loop with budgets (trainer), checkpoint averaging (average),
CPU recipes (presets) and the allocator setting training runs with (allocator)."""

from .allocator import reuse_freed_memory
from .average import average_checkpoints, last_checkpoints
from .data import Batch, EpochBatcher, TokenBatcher, make_batch, make_lm_batch, synthetic_pairs
from .images import ImageBatch, ImageBatcher
from .optim import Adam, AdamW
from .presets import PRESETS, Preset, get_preset, parameter_count
from .schedule import Constant, Cosine, InverseSqrt, Noam, Schedule, schedule_from_dict
from .shards import DataDir, DataError, ShardBatcher, ShardedSplit, ShardWriter, open_data
from .trainer import DataSource, TrainBatch, Trainer, latest_checkpoint

__all__ = [
    "Batch", "EpochBatcher", "TokenBatcher", "make_batch", "make_lm_batch", "synthetic_pairs",
    "ImageBatch", "ImageBatcher",
    "Adam", "AdamW",
    "Schedule", "Constant", "Cosine", "InverseSqrt", "Noam", "schedule_from_dict",
    "Trainer", "DataSource", "TrainBatch", "latest_checkpoint",
    "ShardWriter", "ShardBatcher", "ShardedSplit", "DataDir", "DataError", "open_data",
    "average_checkpoints", "last_checkpoints",
    "PRESETS", "Preset", "get_preset", "parameter_count",
    "reuse_freed_memory",
]
