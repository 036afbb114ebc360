"""Black-box defense (installed as ``deepzero_oracle.adapters.defense``): ZO-trained denoisers
in front of a classifier that can only be queried, and randomized-smoothing certification.

From Python (docs/DEFENSE.md, "From Python"): open your classifier (`open_classifier`: a
callable ``fn(images [N, C, H, W] ndarray) -> scores [N, classes]``, a served model's spec, or
``"local"``), train a front with `train_defense` and a `DefenseConfig`, then certify it with
`certify` (= `certify_front`) or smooth any classifier yourself with `Smooth`.

Modules (the names below are also importable from this package; modules load on first use):
- ``methods``: `DefenseConfig` (the recipe), `METHODS` (fo-ds, zo-ds, zo-ae-ds), `OBJECTIVES`,
  `train_defense` (every stage through the engine's Trainer), `load_front`, `build_front`,
  `smoothed_pipeline` (``f(front(x))`` as a black box), `certify_front` (also as `certify`).
- ``classifier``: `Classifier` (a black box checked against the data: logits out),
  `open_classifier`.
- ``smoothing``: Cohen et al.'s CERTIFY / PREDICT (`Smooth`, `Certificate`, `ABSTAIN`).
- ``certify_log``: per-image logs, resumable certification (`certify_dataset`, `CertifyRun`,
  `read_log`, `certified_accuracy`).
- ``denoiser``: the white-box fronts (`Denoiser`).
- the images: `Dataset`, `load_data`, `read_npz` (from ``deepzero_oracle.apps.datasets``).
- ``cli``: ``deepzero-oracle defense train|certify|report|compare``.
"""

_EXPORTS = {
    "DefenseConfig": "methods", "METHODS": "methods", "OBJECTIVES": "methods", "train_defense": "methods",
    "load_front": "methods", "build_front": "methods", "smoothed_pipeline": "methods",
    "certify_front": "methods", "CountingBlackBox": "methods",
    "Classifier": "classifier", "open_classifier": "classifier",
    "Smooth": "smoothing", "Certificate": "smoothing", "ABSTAIN": "smoothing",
    "CertifyRun": "certify_log", "certify_dataset": "certify_log", "read_log": "certify_log",
    "certified_accuracy": "certify_log",
    "Denoiser": "denoiser",
    "Dataset": "deepzero_oracle.apps.datasets", "load_data": "deepzero_oracle.apps.datasets",
    "read_npz": "deepzero_oracle.apps.datasets",
}
#: other names of exported objects
_ALIASES = {"certify": ("methods", "certify_front")}


def __getattr__(name):
    if name in _EXPORTS or name in _ALIASES:
        import importlib

        module, attr = _ALIASES.get(name, (_EXPORTS.get(name), name))
        full = module if module.startswith("deepzero_oracle.") else f"{__name__}.{module}"
        return getattr(importlib.import_module(full), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = sorted([*_EXPORTS, *_ALIASES])
