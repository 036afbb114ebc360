"""Black-box defense (installed as ``deepzero_oracle.adapters.defense``): ZO-trained denoisers
in front of a classifier that can only be queried, and randomized-smoothing certification.

From Python (docs/DEFENSE.md, "From Python"): open your classifier (`open_classifier`: a
callable ``fn(images [N, C, H, W] ndarray) -> scores [N, classes]``, a served model's spec, or
``"local"``), train a front with `train_defense` and a `DefenseConfig`, then certify it with
`certify` (= `certify_front`) or smooth any classifier yourself with `Smooth`.

Modules (the names below are also importable from this package; modules load on first use):
- ``training``: `DefenseConfig` (the recipe), `METHODS` (fo-ds, zo-ds, zo-ae-ds), `OBJECTIVES`,
  `train_defense` (every stage through the engine's Trainer), `train_folder` (``defense train``).
- ``fronts``: `build_front`, `load_front`, `save_front`, `smoothed_pipeline` (``f(front(x))`` as a
  black box).
- ``oracles``: `CountingBlackBox`, ZO-AE-DS's `ZOAEOracle` and `LatentOracle`.
- ``certification``: per-image logs, resumable certification (`certify_dataset`, `CertifyRun`,
  `read_log`, `certified_accuracy`), `certify_front` (also as `certify`), `certify_folder`
  (``defense certify``).
- ``report``: intervals, paired tests, tables and plots; `report_folder` (``defense report``).
- ``compare``: `compare_methods` (``defense compare``: methods x seeds, trained, certified, reported).
- ``classifier``: `Classifier` (a black box checked against the data: logits out),
  `open_classifier`.
- ``smoothing``: Cohen et al.'s CERTIFY / PREDICT (`Smooth`, `Certificate`, `ABSTAIN`).
- ``denoiser``: the white-box fronts (`Denoiser`).
- the images: `Dataset`, `load_data`, `read_npz` (from ``deepzero_oracle.common.datasets``).
- ``cli``: ``deepzero-oracle defense train|certify|report|compare`` (flags in, one call out).
"""

_EXPORTS = {
    "DefenseConfig": "training", "METHODS": "training", "OBJECTIVES": "training", "train_defense": "training",
    "train_folder": "training",
    "load_front": "fronts", "build_front": "fronts", "save_front": "fronts", "smoothed_pipeline": "fronts",
    "CountingBlackBox": "oracles", "ZOAEOracle": "oracles", "LatentOracle": "oracles",
    "Classifier": "classifier", "open_classifier": "classifier",
    "Smooth": "smoothing", "Certificate": "smoothing", "ABSTAIN": "smoothing",
    "CertifyRun": "certification", "certify_dataset": "certification", "read_log": "certification",
    "certified_accuracy": "certification", "certify_front": "certification", "certify_folder": "certification",
    "report_folder": "report", "compare_methods": "compare",
    "Denoiser": "denoiser",
    "Dataset": "deepzero_oracle.common.datasets", "load_data": "deepzero_oracle.common.datasets",
    "read_npz": "deepzero_oracle.common.datasets",
}
#: other names of exported objects
_ALIASES = {"certify": ("certification", "certify_front")}


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
