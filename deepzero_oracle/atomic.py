"""Writing files so that a crash never leaves a half-written one: write beside, then rename.

Every checkpoint, settings file and cache the project writes goes through ``atomic_write``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX file systems: readers see the old file or the new one,
    never a partial one. The parent folder is created if needed. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{''.join(path.suffixes)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_torch(obj, path) -> Path:
    """``torch.save(obj)`` atomically (checkpoints: tensors and plain data only)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path, text: str) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path, obj, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


__all__ = ["atomic_write", "save_torch", "write_json", "write_text"]
