"""A run folder: where one run keeps its settings, checkpoints, logs and results.

Every command that writes a run (``classify train``, the SOL and defense adapters, the
``Trainer``) goes through a :class:`RunFolder`, so resuming, refusing a resume with other
settings, ``--restart`` and crash-safe writes behave the same everywhere:

- **settings**: ``settings.json`` (or ``<name>.settings.json``) records what defines the run.
  Opening the folder again with other settings raises ``SettingsMismatch`` naming each
  difference (``lr: 0.1 in the run, 0.05 now``) and what to do (``--restart`` or another
  ``--out``); nothing on disk has changed by then.
- **restart**: removes the files the run wrote (the settings file and the names it declares),
  never anything else in the folder.
- **atomic writes**: every file is written beside its final name and renamed over it, so a
  crash (or Ctrl-C) leaves the old file or the new one, never half of one. The module-level
  ``atomic_write``, ``write_text``, ``write_json`` and ``save_torch`` do this for any path.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from deepzero_oracle.errors import SettingsMismatch

_SETTINGS_FILE = object()  # RunFolder.check's default: compare with the settings file

#: What a settings mismatch tells the user to do (command-line runs).
RESUME_HINT = "resume with the same settings, start over with --restart, or use another --out"


# -- atomic writes ------------------------------------------------------------------------------


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX file systems: readers see the old file or the new one,
    never a partial one; if ``write`` raises, the temporary file is removed and ``path`` is
    untouched. The parent folder is created if needed. Returns ``path``.
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


# -- settings -----------------------------------------------------------------------------------


def settings_differences(saved: Mapping | None, wanted: Mapping | None) -> list[str]:
    """Each setting whose value differs, as ``"key: <saved> in the run, <wanted> now"`` (sorted
    by key; a key missing on one side counts as None there). Empty if either side is None.
    Values compare as JSON gives them back: tuples equal lists, ``2.0`` equals ``2``."""
    if saved is None or wanted is None:
        return []
    keys = sorted(set(saved) | set(wanted))
    return [f"{k}: {saved.get(k)!r} in the run, {wanted.get(k)!r} now" for k in keys
            if _normal(saved.get(k)) != _normal(wanted.get(k))]


def check_settings(saved: Mapping | None, wanted: Mapping | None, where=None, *, hint: str = RESUME_HINT) -> None:
    """Raise ``SettingsMismatch`` naming every setting whose value differs between a run on
    disk (``saved``) and the one asked for (``wanted``), then ``hint`` (what to do). Nothing is
    compared if either is None. ``where`` names the run in the message."""
    changed = settings_differences(saved, wanted)
    if changed:
        raise SettingsMismatch(f"{where or 'the run folder'} holds a run with other settings "
                               f"({'; '.join(changed)}); {hint}")


def _normal(value):
    """Settings as JSON would give them back (tuples are lists, floats compare by value)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


# -- the folder ---------------------------------------------------------------------------------


class RunFolder:
    """One run's folder: its settings file, the resume check, ``--restart`` and atomic writes.

    Args:
        path: the folder (created on the first write).
        settings: a JSON-like dict of what defines the run; a resume must match it. None: no
            settings are kept or checked.
        name: the settings file is ``<name>.settings.json`` (several runs sharing a folder,
            e.g. ``certify.tsv`` beside ``certify.settings.json``); None: ``settings.json``.
        files: names (relative to ``path``, files or folders) the run writes besides its
            settings file; ``restart`` removes exactly these.
        hint: what a settings mismatch tells the user to do.

    Example::

        run = RunFolder("runs/a", {"lr": 0.1, "steps": 100}, files=["log.csv", "model.pt"])
        resumed = run.open(restart=False)   # writes runs/a/settings.json, or checks it
        run.write_json("result.json", {"loss": 0.25})   # atomically
        RunFolder("runs/a", {"lr": 0.05, "steps": 100}).open()
        # SettingsMismatch: runs/a holds a run with other settings (lr: 0.1 in the run,
        # 0.05 now); resume with the same settings, start over with --restart, or use another --out
    """

    def __init__(self, path, settings: Mapping | None = None, *, name: str | None = None,
                 files: Iterable[str] = (), hint: str = RESUME_HINT):
        self.path = Path(path)
        self.settings = None if settings is None else dict(settings)
        self.name = name
        self.files = tuple(files)
        self.hint = hint

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, name={self.name!r})"

    @property
    def settings_path(self) -> Path:
        """``path/settings.json``, or ``path/<name>.settings.json`` with a ``name``."""
        return self.path / (f"{self.name}.settings.json" if self.name else "settings.json")

    def saved_settings(self) -> dict | None:
        """The settings the folder's run was started with (None: no settings file)."""
        return json.loads(self.settings_path.read_text()) if self.settings_path.exists() else None

    def check(self, saved: Mapping | None = _SETTINGS_FILE, *, where=None) -> None:
        """Raise ``SettingsMismatch`` naming each difference between ``saved`` (default: what
        the settings file holds) and this run's settings; nothing to check when either is None.
        ``where`` names the run in the message (default: the folder)."""
        if saved is _SETTINGS_FILE:
            saved = self.saved_settings()
        check_settings(saved, self.settings, where or self.path, hint=self.hint)

    def check_checkpoint(self, name: str = "checkpoint.pt") -> None:
        """As ``check``, against the ``"settings"`` a torch checkpoint (``path/name``) was
        saved with (a ``Trainer`` checkpoint); nothing to check when it does not exist."""
        file = self.path / name
        if file.exists():
            check_settings(self.load_torch(name).get("settings"), self.settings, file, hint=self.hint)

    def open(self, *, restart: bool = False) -> bool:
        """Start or continue the run: with ``restart``, first remove what an earlier run wrote
        (``restart()``). Then check the settings file against this run's settings (raises
        ``SettingsMismatch`` before anything changes) or, for a new run, write it. Returns True
        when an earlier run was found (a resume)."""
        if restart:
            self.restart()
        saved = self.saved_settings()
        if saved is not None:
            self.check(saved)
            return True
        if self.settings is not None:
            self.write_json(self.settings_path.name, self.settings)
        return False

    def restart(self) -> None:
        """Remove the settings file and the declared ``files`` (folders whole); nothing else."""
        for rel in (self.settings_path.name, *self.files):
            target = self.path / rel
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    # -- files, written atomically --------------------------------------------------------------

    def file(self, name: str) -> Path:
        """``path/name``."""
        return self.path / name

    def write_json(self, name: str, obj: Any, *, indent: int | None = 2) -> Path:
        """Write ``obj`` as JSON to ``path/name``, atomically."""
        return write_json(self.path / name, obj, indent=indent)

    def read_json(self, name: str, default: Any = None) -> Any:
        """The JSON in ``path/name`` (``default`` when it does not exist)."""
        file = self.path / name
        return json.loads(file.read_text()) if file.exists() else default

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` to ``path/name``, atomically."""
        return write_text(self.path / name, text)

    def save_torch(self, name: str, obj) -> Path:
        """``torch.save(obj)`` to ``path/name``, atomically (tensors and plain data only)."""
        return save_torch(obj, self.path / name)

    def load_torch(self, name: str):
        """``torch.load`` of ``path/name`` with ``weights_only=True`` (nothing is unpickled)."""
        return torch.load(self.path / name, weights_only=True)


__all__ = ["RESUME_HINT", "RunFolder", "atomic_write", "check_settings", "save_torch", "settings_differences",
           "write_json", "write_text"]
