"""What the importers share: JSON reading with errors that name the file, and writing an output
directory atomically (a temporary sibling renamed into place, so OUT is never half written)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from ..io import CheckpointError, fsync_dir


def model_dir(directory: Any, what: str) -> pathlib.Path:
    """The checked input directory of an importer."""
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"directory: {root} is not a directory ({what})")
    return root


def read_json(path: pathlib.Path, required: bool = True) -> Any:
    """The parsed JSON file, None when it is absent and not required; CheckpointError naming
    the file when it is missing (and required), unreadable or not JSON."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None


def write_directory(out: Any, fill: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Runs fill(tmp) on a fresh temporary directory next to out, then renames it to out.
    out must not exist, or be an empty directory (never overwritten: no user data is lost).
    On any error the temporary directory is removed and out is left as it was."""
    if not isinstance(out, str | os.PathLike):
        raise TypeError(f"out: expected a path, got {type(out).__name__}")
    target = pathlib.Path(out).absolute()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"out: {target} already exists (choose a new directory)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(
        tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    )
    try:
        fill(tmp)
        for sub in sorted(tmp.rglob("*"), reverse=True):
            if sub.is_dir():
                fsync_dir(sub)
        if target.is_dir():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    fsync_dir(target.parent)
    return target
