"""``defense compare``: several methods over several seeds, trained, certified and reported at once.

For each seed S and method M the run folder is ``OUT/seed-S/M``: the front is trained there
with seed S (:func:`~.training.train_folder`; not for ``none``, the classifier smoothed alone),
then certified with seed S (:func:`~.certification.certify_folder`). Then ``OUT`` is reported per
seed and pooled over the seeds (:func:`~.report.report_folder`). Each step continues what its
folder holds, so an interrupted comparison resumes where it stopped when run again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from deepzero_oracle.adapters.defense.certification import CERTIFY_METHODS, certify_folder
from deepzero_oracle.adapters.defense.report import Report, report_folder
from deepzero_oracle.adapters.defense.training import DefenseConfig, train_folder

__all__ = ["compare_methods"]


def compare_methods(out: str | Path, methods: Sequence[str], seeds: Sequence[int], config: DefenseConfig, *,
            n0: int = 100, n: int = 100_000, alpha: float = 0.001, max_examples: int = 100,
            batch_size: int = 1000, classifier_path: str | None = None, timeout: float = 60.0,
            executor: str = "inline", restart: bool = False, progress: bool | None = None,
            on_step: Callable[[str, dict, Path], None] | None = None) -> Report:
    """Train and certify every method under every seed in ``out/seed-S/METHOD``, then report ``out``.

    Args:
        out: the comparison folder.
        methods: names of :data:`~.certification.CERTIFY_METHODS` (``none``: no denoiser).
        seeds: each seeds one run of every method, its training and its certification.
        config: the training recipe; its ``dataset``, ``classifier`` and ``sigma`` also serve the
            certification, its ``method`` and ``seed`` are replaced for each run.
        n0: CERTIFY's selection samples (``certify_folder``'s, as the four below).
        n: CERTIFY's estimation samples.
        alpha: failure probability of each certificate.
        max_examples: how many test images are certified.
        batch_size: noisy samples per black-box call when certifying.
        classifier_path: the saved ``local`` classifier (``open_classifier``'s ``path``).
        timeout: seconds each call to a remote classifier may take.
        executor: an ``open_executor`` spec: where zo-ds's stability queries and the certified
            images run.
        restart: start every step over instead of continuing what its folder holds.
        progress: tqdm bars (None: when stderr is a terminal).
        on_step: called as ``on_step(command, summary, folder)`` after each step, with
            ``command`` ``"defense train"`` (summary: ``run.json``) or ``"defense certify"``
            (summary: ``certify.json``).
    Returns:
        ``report_folder(out)``: the per-seed and pooled table, its markdown, and where they went.
    """
    bad = [m for m in methods if m not in CERTIFY_METHODS]
    if bad or not methods:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(CERTIFY_METHODS)}")
    common = dict(classifier_path=classifier_path, timeout=timeout, executor=executor, restart=restart,
                  progress=progress)
    for seed in seeds:
        for method in methods:
            folder = Path(out) / f"seed-{seed}" / method
            if method != "none":
                info = train_folder(dataclasses.replace(config, method=method, seed=seed), folder, **common)
                if on_step is not None:
                    on_step("defense train", info, folder)
            summary = certify_folder(folder, method, data=config.dataset, classifier=config.classifier,
                                     sigma=config.sigma if method == "none" else None, n0=n0, n=n, alpha=alpha,
                                     max_examples=max_examples, batch_size=batch_size, seed=seed, **common)
            if on_step is not None:
                on_step("defense certify", summary, folder)
    return report_folder(out)
