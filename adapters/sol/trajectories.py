"""The SOL data format: reference trajectories (and physical parameters) in one ``.npz`` file.

Every SOL comparison reads its data from this format, whoever produced it: ``sol generate``
writes it for the built-in scenarios, a user writes it for their own solver (`save_trajectories`
or `Trajectories.save`), or plain ``numpy.savez`` with just the arrays. Format
``deepzero-oracle/sol-trajectories``, version 1; keys:

=====================  ==========================  =================================================
key                    shape                       meaning
=====================  ==========================  =================================================
``format``             scalar string (optional)    ``"deepzero-oracle/sol-trajectories"``
``format_version``     scalar int (optional)       ``1``; a file without it is read as version 1
``train_states``       ``[S, T+1, C, H, W]``       reference trajectories on the source grid
``test_states``        ``[S', T'+1, C, H, W]``     held-out trajectories (the test metric)
``train_params``       ``[S, K]`` (optional)       per-simulation physical parameters: sent to the
``test_params``        ``[S', K]`` (optional)      solver with every state, and given to the
                                                   corrector as K constant input fields
``train_fields``       ``[S, F, H, W]`` (opt.)     static input fields of the corrector instead of
``test_fields``        ``[S', F, H, W]`` (opt.)    the constant params (e.g. a forcing, an obstacle)
``correction_mask``    ``[C, H, W]`` (optional)    multiplies every correction (0 where the corrector
                                                   must not act, e.g. inside walls)
``metadata``           scalar string (optional)    JSON object: ``channels`` (C names),
                                                   ``param_names`` (K names), ``dt``, ``periodic``
                                                   (the domain wraps around: the corrector pads
                                                   circularly), and anything else (built-ins add
                                                   ``scenario`` and ``size``)
=====================  ==========================  =================================================

A file made by hand needs only ``train_states`` and ``test_states`` (plus the optional arrays):
``np.savez("mine.npz", train_states=..., test_states=..., train_params=..., test_params=...)``.
``save_trajectories`` also writes ``format`` and ``format_version``, so that a later version of
the format is refused with a clear message rather than misread.

States are float64 (any real dtype is accepted and converted), finite, and ``states[:, t+1]`` is the
reference one solver step of ``dt`` after ``states[:, t]``. With K = 0 (no params) the solver receives
the state only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from deepzero_oracle.runs import atomic_write

__all__ = ["FORMAT", "FORMAT_VERSION", "Trajectories", "load_trajectories", "save_trajectories"]

FORMAT = "deepzero-oracle/sol-trajectories"
FORMAT_VERSION = 1

_ARRAYS = ("train_states", "test_states", "train_params", "test_params", "train_fields", "test_fields",
           "correction_mask")
_KEYS = ("format", "format_version", "metadata", *_ARRAYS)
_REQUIRED = ("train_states", "test_states")
_SHAPES = {"train_states": "[S, T+1, C, H, W]", "test_states": "[S', T'+1, C, H, W]", "train_params": "[S, K]",
           "test_params": "[S', K]", "train_fields": "[S, F, H, W]", "test_fields": "[S', F, H, W]",
           "correction_mask": "[C, H, W]"}


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectories:
    """Reference trajectories of one SOL comparison, validated on construction.

    Attributes:
        train_states: ``[S, T+1, C, H, W]`` float64.
        test_states: ``[S', T'+1, C, H, W]`` float64.
        train_params / test_params: ``[S, K]`` / ``[S', K]`` float64 (K = 0 when the file has none).
        train_fields / test_fields: ``[S, F, H, W]`` / ``[S', F, H, W]`` or None (then the corrector
            sees the params as constant fields: `corrector_fields`).
        correction_mask: ``[C, H, W]`` or None.
        metadata: dict (JSON).
        source: where it was read from ("" if built in memory), for messages.
    Raises:
        ValueError: naming the key and what is wrong with it (rank, sizes, NaN/Inf, dtype).
    """

    train_states: np.ndarray
    test_states: np.ndarray
    train_params: np.ndarray | None = None
    test_params: np.ndarray | None = None
    train_fields: np.ndarray | None = None
    test_fields: np.ndarray | None = None
    correction_mask: np.ndarray | None = None
    metadata: dict = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        where = self.source or "trajectories"
        arrays = {k: _real_array(getattr(self, k), k, where) for k in _ARRAYS if getattr(self, k) is not None}
        for k in ("train_states", "test_states"):
            if k not in arrays:
                raise ValueError(f"{where}: {k} {_SHAPES[k]} is required")
        _check_shapes(arrays, where)
        for split in ("train", "test"):  # no params: K = 0, the solver gets the state only
            if f"{split}_params" not in arrays:
                arrays[f"{split}_params"] = np.zeros((arrays[f"{split}_states"].shape[0], 0))
        for k, v in arrays.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "metadata", _check_metadata(self.metadata, self, where))

    # ------------------------------------------------------------------ sizes
    @property
    def channels(self) -> int:
        """C, state channels."""
        return int(self.train_states.shape[2])

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the states."""
        return tuple(int(n) for n in self.train_states.shape[3:])

    @property
    def n_params(self) -> int:
        """K, physical parameters per simulation (0: the solver receives the state only)."""
        return int(self.train_params.shape[1])

    @property
    def periodic(self) -> bool:
        """Whether the domain wraps around (``metadata["periodic"]``, default False)."""
        return bool(self.metadata.get("periodic", False))

    @property
    def label(self) -> str:
        """A short name for reports: the built-in scenario and size, else the file name."""
        if "scenario" in self.metadata:
            return f"{self.metadata['scenario']} ({self.metadata.get('size', '?')})"
        return Path(self.source).name if self.source else "trajectories"

    def check_unroll(self, unroll: int) -> "Trajectories":
        """Raise ValueError if the training trajectories are too short for windows of ``unroll``
        solver steps (T >= unroll is needed); returns self."""
        steps, unroll = self.train_states.shape[1] - 1, int(unroll)
        if unroll < 1:
            raise ValueError(f"unroll must be at least 1 solver step, got {unroll}")
        if unroll > steps:
            raise ValueError(f"{self.source or 'trajectories'}: unroll {unroll} needs training trajectories of "
                             f"T >= {unroll} steps ({unroll + 1} states), but train_states has T = {steps}: "
                             f"lower --unroll or write longer trajectories")
        return self

    def corrector_fields(self, split: str) -> np.ndarray:
        """The corrector's static inputs of ``split`` ("train"/"test"): ``[S, F, H, W]`` float64,
        the file's fields or else the params as K constant fields."""
        fields = getattr(self, f"{split}_fields")
        if fields is not None:
            return fields
        params = getattr(self, f"{split}_params")
        return np.broadcast_to(params[:, :, None, None], params.shape + self.grid).copy()

    def digest(self) -> str:
        """A content hash (sha256, hex) of every array and the metadata: the data's identity in
        run settings (independent of file name and compression)."""
        h = hashlib.sha256(FORMAT.encode())
        for k in _ARRAYS:
            a = getattr(self, k)
            if a is None or a.size == 0 and k.endswith("_params"):
                continue
            h.update(f"{k}{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps(self.metadata, sort_keys=True).encode())
        return h.hexdigest()

    def save(self, path) -> Path:
        """Write this file atomically (see `save_trajectories`)."""
        return save_trajectories(path, self)

    @classmethod
    def load(cls, path, *, unroll: int | None = None) -> "Trajectories":
        """Read and validate a file (see `load_trajectories`)."""
        return load_trajectories(path, unroll=unroll)


def save_trajectories(path, trajectories: Trajectories) -> Path:
    """Write ``trajectories`` as a format-1 ``.npz`` (compressed, atomically: a crash leaves the old
    file or the new one). Absent optional arrays and K = 0 params are not written. Returns the path."""
    out = {"format": np.array(FORMAT), "format_version": np.array(FORMAT_VERSION),
           "metadata": np.array(json.dumps(trajectories.metadata, sort_keys=True))}
    for k in _ARRAYS:
        a = getattr(trajectories, k)
        if a is not None and not (k.endswith("_params") and a.shape[1] == 0):
            out[k] = a
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **out))


def load_trajectories(path, *, unroll: int | None = None) -> Trajectories:
    """Read a SOL trajectories file and validate everything.

    Args:
        path: the ``.npz`` file.
        unroll: if given, also check the training trajectories are long enough (`check_unroll`).
    Returns:
        `Trajectories`.
    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ``.npz``, another ``format`` or a newer ``format_version`` (both keys are
            optional: without them the file is read as version 1), missing or unknown keys,
            wrong ranks, NaN/Inf, S mismatch between states and params, C/H/W, K or F mismatch between
            train and test, trajectories too short for ``unroll``. Each message names the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trajectories file {path}: write one with save_trajectories() "
                                f"(see adapters/sol/trajectories.py) or run `sol generate`")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:  # not a zip / .npy, or object arrays (pickles are never loaded)
        raise ValueError(f"{path}: not a readable .npz of plain arrays ({e}); write it with "
                         f"numpy.savez or save_trajectories()") from None
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; a SOL trajectories file holds "
                         f"{list(_REQUIRED)} and optionally {[k for k in _KEYS if k not in _REQUIRED]}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; the format's keys are {list(_KEYS)}")
    if "format" in raw and str(raw["format"]) != FORMAT:
        raise ValueError(f"{path}: format is {str(raw['format'])!r}, expected {FORMAT!r} (or leave the key out)")
    try:  # a file made by hand, without the key, is version 1: the arrays are all it needs
        version = int(raw["format_version"]) if "format_version" in raw else FORMAT_VERSION
    except (TypeError, ValueError):
        raise ValueError(f"{path}: format_version must be an integer, got {raw['format_version']!r}") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version} is not supported (this reader knows "
                         f"{FORMAT_VERSION}){'; upgrade deepzero-oracle' if version > FORMAT_VERSION else ''}")
    meta = {}
    if "metadata" in raw:
        try:
            meta = json.loads(str(raw["metadata"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata is not JSON ({e})") from None
    traj = Trajectories(**{k: raw[k] for k in _ARRAYS if k in raw}, metadata=meta, source=str(path))
    if unroll is not None:
        traj.check_unroll(unroll)
    return traj


# ---------------------------------------------------------------------- validation
def _real_array(a, key: str, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{where}: {key} must hold real numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{where}: {key} contains NaN or Inf (first at index {first}); the data must be finite")
    return a


def _check_shapes(arrays: dict, where: str) -> None:
    ranks = {"train_states": 5, "test_states": 5, "train_params": 2, "test_params": 2, "train_fields": 4,
             "test_fields": 4, "correction_mask": 3}
    for k, a in arrays.items():
        if a.ndim != ranks[k]:
            raise ValueError(f"{where}: {k} must be {_SHAPES[k]} (rank {ranks[k]}), got shape {a.shape}")
    for k in ("train_states", "test_states"):
        s, t1 = arrays[k].shape[:2]
        if s < 1 or t1 < 2 or min(arrays[k].shape[2:]) < 1:
            raise ValueError(f"{where}: {k} {_SHAPES[k]} needs S >= 1 simulations of T >= 1 steps (T + 1 >= 2 "
                             f"states) and C, H, W >= 1; got shape {arrays[k].shape}")
    chw = arrays["train_states"].shape[2:]
    if arrays["test_states"].shape[2:] != chw:
        raise ValueError(f"{where}: train_states and test_states must share C, H, W; got {chw} and "
                         f"{arrays['test_states'].shape[2:]}")
    for kind in ("params", "fields"):
        present = [f"{s}_{kind}" in arrays for s in ("train", "test")]
        if any(present) and not all(present):
            raise ValueError(f"{where}: train_{kind} and test_{kind} come together; the file has only "
                             f"{'train' if present[0] else 'test'}_{kind}")
        if not any(present):
            continue
        for split in ("train", "test"):
            a, s = arrays[f"{split}_{kind}"], arrays[f"{split}_states"].shape[0]
            if a.shape[0] != s:
                raise ValueError(f"{where}: {split}_{kind} has {a.shape[0]} rows but {split}_states has S = {s} "
                                 f"simulations; one row per simulation, in the same order")
            if kind == "fields" and a.shape[2:] != chw[1:]:
                raise ValueError(f"{where}: {split}_fields must be on the states' grid {chw[1:]}, got {a.shape[2:]}")
        if arrays[f"train_{kind}"].shape[1] != arrays[f"test_{kind}"].shape[1]:
            n = "K" if kind == "params" else "F"
            raise ValueError(f"{where}: train_{kind} and test_{kind} must have the same {n}; got "
                             f"{arrays[f'train_{kind}'].shape[1]} and {arrays[f'test_{kind}'].shape[1]}")
    if "correction_mask" in arrays and arrays["correction_mask"].shape != chw:
        raise ValueError(f"{where}: correction_mask must be [C, H, W] = {list(chw)}, got "
                         f"{list(arrays['correction_mask'].shape)}")


def _check_metadata(meta, traj: Trajectories, where: str) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata must be a JSON object (a dict), got {type(meta).__name__}")
    try:
        meta = json.loads(json.dumps(meta))  # a plain JSON copy: what the file will hold
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: metadata must be JSON-serializable ({e})") from None
    for key, n, what in (("channels", traj.channels, "C"), ("param_names", traj.n_params, "K")):
        names = meta.get(key)
        if names is not None and (not isinstance(names, list) or len(names) != n):
            raise ValueError(f"{where}: metadata[{key!r}] must list {n} names ({what} = {n}), got {names!r}")
    if "dt" in meta and not (isinstance(meta["dt"], (int, float)) and np.isfinite(meta["dt"]) and meta["dt"] > 0):
        raise ValueError(f"{where}: metadata['dt'] must be a positive number, got {meta['dt']!r}")
    if "periodic" in meta and not isinstance(meta["periodic"], bool):
        raise ValueError(f"{where}: metadata['periodic'] must be true or false, got {meta['periodic']!r}")
    return meta
