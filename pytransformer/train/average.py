"""Checkpoint averaging: the element-wise mean of the parameters of several checkpoints of one run
(the paper's base models average the last 5, written 10 minutes apart).

The mean is taken in float64 (summed one checkpoint at a time, so memory holds two models, not
N) and rounded once to each parameter's dtype. The result is a model directory (config.json +
model.safetensors, loadable with ``Transformer.load``), written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import numpy as np

from .. import io
from .trainer import _step_dirs

__all__ = ["average_checkpoints", "last_checkpoints"]

_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


def last_checkpoints(root: str | os.PathLike, n: int) -> list[str]:
    """The newest ``n`` complete checkpoint directories under a checkpoint root, oldest first
    (fewer when there are fewer)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    return [path for _, path in _step_dirs(os.fspath(root))[-n:]]


def _read_model_dir(path: str) -> tuple[str, dict, dict[str, str]]:
    """(config text, tensors, metadata) of a checkpoint or model directory."""
    config_path, weights_path = os.path.join(path, _CONFIG), os.path.join(path, _WEIGHTS)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise io.CheckpointError(f"{p}: missing (not a checkpoint or model directory)")
    with open(config_path, encoding="utf-8") as f:
        config = f.read()
    try:
        json.loads(config)
    except json.JSONDecodeError as exc:
        raise io.CheckpointError(f"{config_path}: corrupt ({exc})") from None
    tensors, meta = io.load_safetensors(weights_path, require_checksum=True)
    return config, tensors, meta


def average_checkpoints(
    paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike
) -> str:
    """Writes the float64 mean of the parameters of the checkpoint (or model) directories
    ``paths`` to the model directory ``out_dir``; returns it.

    Every checkpoint must hold the same model class, config, parameter names and shapes
    (CheckpointError otherwise). ``out_dir`` may not exist yet, be empty, or be a model directory
    (it is replaced); anything else is refused rather than overwritten."""
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths: expected a list of checkpoint directories, got one path")
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("paths: no checkpoints to average")
    out_dir = os.fspath(out_dir)
    _check_target(out_dir)
    config, first, meta = _read_model_dir(paths[0])
    total = {name: a.astype(np.float64) for name, a in first.items()}
    dtypes = {name: a.dtype for name, a in first.items()}
    for path in paths[1:]:
        cfg, tensors, other_meta = _read_model_dir(path)
        _check_same(paths[0], path, json.loads(config), json.loads(cfg), first, tensors)
        if other_meta.get("model_class") != meta.get("model_class"):
            raise io.CheckpointError(
                f"{path}: holds a {other_meta.get('model_class')}, {paths[0]} a "
                f"{meta.get('model_class')}"
            )
        for name, a in tensors.items():
            total[name] += a
    mean = {name: (t / len(paths)).astype(dtypes[name]) for name, t in total.items()}
    meta = {k: v for k, v in meta.items() if k != "sha256"}  # save_safetensors writes a new one
    meta = {**meta, "averaged_from": json.dumps([os.path.abspath(p) for p in paths])}
    _write_model_dir(out_dir, config, mean, meta)
    return out_dir


def _check_same(ref: str, path: str, cfg_a: dict, cfg_b: dict, a: dict, b: dict) -> None:
    if cfg_a != cfg_b:
        diff = sorted(k for k in set(cfg_a) | set(cfg_b) if cfg_a.get(k) != cfg_b.get(k))
        raise io.CheckpointError(f"{path}: its config differs from {ref}'s in {diff}")
    if a.keys() != b.keys():
        raise io.CheckpointError(f"{path}: its parameter names differ from {ref}'s")
    for name in a:
        if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            raise io.CheckpointError(
                f"{path}: {name} is {b[name].dtype}{list(b[name].shape)}, in {ref} "
                f"{a[name].dtype}{list(a[name].shape)}"
            )


def _check_target(out_dir: str) -> None:
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir} exists and is not a directory")
    names = set(os.listdir(out_dir))
    if names and not names <= {_CONFIG, _WEIGHTS}:
        raise ValueError(
            f"out_dir: {out_dir} holds other files than a model's ({sorted(names)[:3]}...); "
            "give a new or empty directory"
        )


def _write_model_dir(out_dir: str, config: str, tensors: dict, meta: dict[str, str]) -> None:
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.avg-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    old = None
    try:
        os.makedirs(tmp)
        io.save_safetensors(os.path.join(tmp, _WEIGHTS), tensors, metadata=meta)
        io.atomic_write_text(os.path.join(tmp, _CONFIG), config)
        io.fsync_dir(tmp)
        if os.path.exists(out_dir):
            old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        io.fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
