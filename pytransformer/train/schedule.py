"""Learning-rate schedules: callables from the 1-based update step to a learning rate.

Each is a small frozen dataclass (so it can be logged and stored in a checkpoint with
``to_dict`` / ``schedule_from_dict``). Step 1 is the first update.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..checks import check_float, check_int

__all__ = [
    "Schedule",
    "Noam",
    "Constant",
    "InverseSqrt",
    "Cosine",
    "schedule_from_dict",
]


def _check_step(step: int) -> int:
    return check_int("step", step, 1)


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    check_float(name, value, 0.0, positive=not allow_zero)


class Schedule:
    """Base class: ``schedule(step) -> lr``."""

    name = "schedule"

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        """{"name": ..., **parameters}; ``schedule_from_dict`` rebuilds it."""
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class Noam(Schedule):
    """The paper's warm-up: factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).

    Linear growth for ``warmup`` steps, then decay proportional to step^-0.5; the peak, at step
    ``warmup``, is factor · (d_model · warmup)^-0.5. The paper uses warmup 4000, factor 1.
    """

    d_model: int
    warmup: int = 4000
    factor: float = 1.0
    name = "noam"

    def __post_init__(self):
        _positive("d_model", self.d_model)
        _positive("warmup", self.warmup)
        _positive("factor", self.factor)

    def __call__(self, step: int) -> float:
        s = _check_step(step)
        return self.factor * self.d_model**-0.5 * min(s**-0.5, s * self.warmup**-1.5)


@dataclass(frozen=True)
class Constant(Schedule):
    """A constant ``lr`` (after an optional linear warm-up from lr/warmup at step 1)."""

    lr: float
    warmup: int = 0
    name = "constant"

    def __post_init__(self):
        _positive("lr", self.lr)
        _positive("warmup", self.warmup, allow_zero=True)

    def __call__(self, step: int) -> float:
        s = _check_step(step)
        return self.lr * min(1.0, s / self.warmup) if self.warmup else self.lr


@dataclass(frozen=True)
class InverseSqrt(Schedule):
    """Linear warm-up to ``peak_lr`` at step ``warmup``, then peak_lr · sqrt(warmup / step)."""

    peak_lr: float
    warmup: int = 4000
    name = "inverse_sqrt"

    def __post_init__(self):
        _positive("peak_lr", self.peak_lr)
        _positive("warmup", self.warmup)

    def __call__(self, step: int) -> float:
        s = _check_step(step)
        if s < self.warmup:
            return self.peak_lr * s / self.warmup
        return self.peak_lr * math.sqrt(self.warmup / s)


@dataclass(frozen=True)
class Cosine(Schedule):
    """Linear warm-up to ``peak_lr`` at step ``warmup``, then a half cosine down to ``min_lr`` at
    ``total_steps``, and ``min_lr`` after."""

    peak_lr: float
    total_steps: int
    warmup: int = 0
    min_lr: float = 0.0
    name = "cosine"

    def __post_init__(self):
        _positive("peak_lr", self.peak_lr)
        _positive("total_steps", self.total_steps)
        _positive("warmup", self.warmup, allow_zero=True)
        _positive("min_lr", self.min_lr, allow_zero=True)
        if self.warmup >= self.total_steps:
            raise ValueError(f"warmup: must be < total_steps={self.total_steps}, got {self.warmup}")
        if self.min_lr > self.peak_lr:
            raise ValueError(f"min_lr: must be <= peak_lr={self.peak_lr}, got {self.min_lr}")

    def __call__(self, step: int) -> float:
        s = _check_step(step)
        if s < self.warmup:
            return self.peak_lr * s / self.warmup
        progress = min(1.0, (s - self.warmup) / (self.total_steps - self.warmup))
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (
            1.0 + math.cos(math.pi * progress)
        )


_BY_NAME = {cls.name: cls for cls in (Noam, Constant, InverseSqrt, Cosine)}


def schedule_from_dict(d: dict) -> Schedule:
    """Rebuilds a schedule from ``to_dict()`` output, e.g. {"name": "noam", "d_model": 512}."""
    if not isinstance(d, dict) or d.get("name") not in _BY_NAME:
        raise ValueError(f"schedule: expected a dict with name in {sorted(_BY_NAME)}, got {d!r}")
    cls = _BY_NAME[d["name"]]
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known - {"name"}
    if unknown:
        raise ValueError(f"schedule: unknown parameters {sorted(unknown)} for {d['name']!r}")
    return cls(**{k: v for k, v in d.items() if k != "name"})
