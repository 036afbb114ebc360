"""``deepzero-oracle defense train | certify | report | compare``: the black-box defense from the shell.

``register(subparsers)`` adds the commands (the ``deepzero-oracle`` entry point does). Each
command parses its flags and calls one function, which does the work and is also importable:

- ``train``: :func:`~.training.train_folder` (the front, ``run.json``, per-stage checkpoints);
- ``certify``: :func:`~.certification.certify_folder` (``certify.tsv``, ``certify.json``);
- ``report``: :func:`~.report.report_folder` (``report.md``, the plot);
- ``compare``: :func:`~.compare.compare_methods` (``OUT/seed-S/METHOD``, then the pooled report).

Images come from ``--data`` (an ``.npz`` or an image folder, ``deepzero_oracle.common.datasets``)
or ``--dataset`` (an example); the classifier from ``--classifier`` (``local`` or a black-box
spec, :func:`.classifier.open_classifier`). Both are read and checked before anything on disk
changes; ``certify`` defaults to the run's data and classifier.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepzero_oracle.common.options import (add_command, add_deprecated_alias, add_executor, add_json,
                                            add_max_queries, add_quiet, add_run_folder, add_timeout, budget_message,
                                            int_list, progress_of)
from deepzero_oracle.errors import EXIT_BUDGET

__all__ = ["register"]


def _train(args) -> int:
    from deepzero_oracle.adapters.defense.training import train_folder

    info = train_folder(_config(args, args.method, args.seed), args.out, classifier_path=args.classifier_path,
                        timeout=args.timeout, executor=args.executor, restart=args.restart,
                        progress=progress_of(args), max_queries=args.max_queries)
    if info.get("stopped_reason"):
        if args.json:
            print(json.dumps(info))
        print(budget_message("defense train", info["stopped_reason"], info["queries"], args.out), file=sys.stderr)
        return EXIT_BUDGET
    _say("defense train", info, Path(args.out), args.json)
    return 0


def _certify(args) -> int:
    from deepzero_oracle.adapters.defense.certification import certify_folder

    summary = certify_folder(args.out, args.method, data=args.data, classifier=args.classifier, sigma=args.sigma,
                             n0=args.n0, n=args.n, alpha=args.alpha, max_examples=args.max_examples,
                             batch_size=args.batch_size, seed=args.seed, classifier_path=args.classifier_path,
                             timeout=args.timeout, executor=args.executor, restart=args.restart,
                             progress=progress_of(args))
    _say("defense certify", summary, Path(args.out), args.json)
    return 0


def _report(args) -> int:
    from deepzero_oracle.adapters.defense.report import report_folder

    _say_report(report_folder(args.out, args.runs, markdown=args.markdown, plot=args.plot), args.json)
    return 0


def _compare(args) -> int:
    from deepzero_oracle.adapters.defense.compare import compare_methods

    def step(command: str, summary: dict, folder: Path) -> None:  # the steps' lines go to stderr
        _say(command, summary, folder, args.json, file=sys.stderr)

    methods = [m.strip() for m in args.methods.split(",")]
    report = compare_methods(args.out, methods, int_list(args.seeds, "--seeds"), _config(args, "zo-ds", 0),
                             n0=args.n0, n=args.n, alpha=args.alpha, max_examples=args.max_examples,
                             batch_size=args.certify_batch_size, classifier_path=args.classifier_path,
                             timeout=args.timeout, executor=args.executor, restart=args.restart,
                             progress=progress_of(args), on_step=step)
    _say_report(report, args.json)
    return 0


def _config(args, method: str, seed: int):
    """The ``DefenseConfig`` of ``train``'s and ``compare``'s recipe flags (checked when trained)."""
    from deepzero_oracle.adapters.defense.training import DefenseConfig

    return DefenseConfig(method=method, dataset=args.data, classifier=args.classifier, sigma=args.sigma,
                         objective=args.objective, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs,
                         ae_epochs=args.ae_epochs, batch_size=args.batch_size, lr=args.lr, width=args.width,
                         depth=args.depth, latent=args.latent, sparsity=args.sparsity, pruner=args.pruner,
                         redraw_every=args.redraw_every, mu=args.mu, max_train=args.max_train, seed=seed)


# ----------------------------------------------------------------------------------------------
# What the commands print: a summary line (or its JSON) on stdout, what was written on stderr
# ----------------------------------------------------------------------------------------------


def _say(command: str, summary: dict, out: Path, as_json: bool, file=None) -> None:
    """Print a finished ``defense train`` / ``defense certify`` step (to ``file``, default stdout)."""
    if command == "defense train":
        brief = {k: summary[k] for k in ("method", "queries", "blackbox_images", "seconds",
                                         "pipeline_clean_accuracy", "denoiser_parameters")}
        text = (f"defense train: {summary['method']}: clean accuracy through the front "
                f"{summary['pipeline_clean_accuracy']:.3f}, {summary['queries']:,} queries, "
                f"{summary['blackbox_images']:,} black-box images, {summary['seconds']:.1f} s")
        wrote = f"wrote {out}/run.json, front.pt and stage checkpoints"
    else:
        brief = summary
        at = summary.get("certified_accuracy") or {}
        accuracy = ", ".join(f"{float(v):.3f} at r={r}" for r, v in at.items()) or "n/a"
        text = (f"defense certify: {summary['method']} on {summary['examples']} {summary['dataset']} images at "
                f"sigma={summary['sigma']:g}: certified accuracy {accuracy}; {summary['queries']:,} noisy samples")
        wrote = f"wrote {out}/certify.tsv and certify.json"
    print(json.dumps(brief) if as_json else text, file=file or sys.stdout)
    print(wrote, file=sys.stderr)


def _say_report(report, as_json: bool) -> None:
    """Print a report: its JSON table or its markdown, then where it was written (stderr)."""
    print(json.dumps(report.table, indent=2) if as_json else report.markdown)
    print(f"wrote {report.markdown_path} and {report.plot_path}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The flags
# ----------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, classifier_default: str | None, data_default: str | None) -> None:
    from deepzero_oracle.common.datasets import DATASETS

    p.add_argument("--classifier", default=classifier_default, metavar="SPEC",
                   help="the classifier, answering logits or probabilities [N, classes]: local (the adapter's "
                        "own CNN, example datasets only), MODULE:FUNCTION (in this process, NumPy arrays in; "
                        "a torch nn.Module also allows fo-ds), grpc://HOST:PORT[/MODEL], kserve://HOST:PORT/MODEL "
                        "or kserve+http://HOST:PORT/MODEL (grpcs://, kserves://, kserve+https:// for TLS; "
                        "the CA from $DEEPZERO_ORACLE_TLS_CA)"
                        + ("" if classifier_default else " (default: the run's, else local)"))
    p.add_argument("--classifier-path", default=None,
                   help="saved local classifier (default runs/defense/classifier-<dataset>.pt, trained on first use)")
    images = p.add_mutually_exclusive_group()
    images.add_argument("--data", dest="data", default=data_default, metavar="FILE.npz|DIR",
                        help="your images: an .npz with x_train [N, C, H, W] floats in [0, 1], y_train [N] "
                             "integer labels, x_test, y_test (optional scalar classes), or a folder with one "
                             "subfolder of PNG/JPEG images per class: DIR/train/<class>/ and DIR/test/<class>/, "
                             "else DIR/<class>/ split 80/20 (stratified, seeded)"
                             + ("" if data_default else "; default: the run's"))
    images.add_argument("--dataset", dest="data", choices=DATASETS,
                        help="an example dataset (offline), short for --data NAME")
    add_timeout(p, 60.0, "classifier call")
    add_json(p)
    add_quiet(p)


def _recipe_flags(p: argparse.ArgumentParser) -> None:
    """The training recipe's flags (``defense train`` and ``defense compare``)."""
    from deepzero_oracle.adapters.defense.training import OBJECTIVES, DefenseConfig

    d = DefenseConfig()
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective, help="denoiser objective")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of the main objective")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="MSE epochs before stab with mse+stab (default: --epochs)")
    p.add_argument("--ae-epochs", type=int, default=d.ae_epochs, help="zo-ae-ds autoencoder pre-training")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per training step")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--width", type=int, default=d.width, help="denoiser channels")
    p.add_argument("--depth", type=int, default=d.depth, help="denoiser conv layers")
    p.add_argument("--latent", type=int, default=None, help="zo-ae-ds latent size (default ~pixels/16)")
    p.add_argument("--sparsity", type=float, default=d.sparsity, help="zo-ds gradient sparsity")
    p.add_argument("--pruner", choices=("zo-grasp", "uniform"), default=d.pruner, help="zo-ds layer ratios")
    p.add_argument("--redraw-every", type=int, default=d.redraw_every,
                   help="epochs between redraws of zo-ds's sparse coordinates")
    p.add_argument("--mu", type=float, default=d.mu, help="CGE finite-difference step")
    p.add_argument("--max-train", type=int, default=None, help="use only this many training images")


def _certify_flags(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """CERTIFY's sampling flags (``defense certify`` and ``defense compare``)."""
    p.add_argument("--n0", type=int, default=100, help="noisy samples that choose the top class")
    p.add_argument("--n", type=int, default=100_000, help="noisy samples that bound its probability")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    p.add_argument("--max-examples", type=int, default=100, help="first test images certified")
    p.add_argument(batch_flag, type=int, default=1000, help="noisy samples per black-box call")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``defense`` with ``train``, ``certify``, ``report`` and ``compare`` to an argparse subparsers object.

    Returns the ``defense`` parser. Each leaf sets ``func(args) -> exit code``.
    """
    from deepzero_oracle.adapters.defense.certification import CERTIFY_METHODS
    from deepzero_oracle.adapters.defense.training import METHODS, DefenseConfig

    d = DefenseConfig()
    defense = add_command(subparsers, "defense",
                          "robustify a black-box classifier: ZO-trained denoiser + certification")
    sub = defense.add_subparsers(dest="defense_command", required=True, metavar="COMMAND")

    train = add_command(sub, "train", "train a denoiser in front of the black-box classifier")
    train.add_argument("--method", choices=METHODS, required=True, help="how the stability gradient is found")
    _common(train, classifier_default=d.classifier, data_default=d.dataset)
    train.add_argument("--sigma", type=float, default=d.sigma, help="noise level (0.12, 0.25, 0.5)")
    _recipe_flags(train)
    train.add_argument("--seed", type=int, default=d.seed, help="seeds init, noise, masks and batches")
    add_max_queries(train, "oracle queries (the stability stage's, plus the clean labels' and ZO-GraSP's)")
    add_executor(train, "zo-ds's stability queries")
    add_run_folder(train)
    train.set_defaults(func=_train)

    cert = add_command(sub, "certify", "randomized-smoothing CERTIFY of a trained run (or of no denoiser)")
    cert.add_argument("--method", choices=CERTIFY_METHODS, required=True, help="the run's method, or none")
    _common(cert, classifier_default=None, data_default=None)
    cert.add_argument("--sigma", type=float, default=None, help="default: the run's training sigma")
    _certify_flags(cert)
    cert.add_argument("--seed", type=int, default=0, help="seeds the per-image noise")
    cert.add_argument("--out", required=True,
                      help="run folder: writes certify.tsv and certify.json; an interrupted certify.tsv "
                           "there is continued (same settings)")
    cert.add_argument("--restart", action="store_true", help="certify from the first image again")
    add_executor(cert, "the images are certified (a few per worker at a time, each with its own seeded noise)")
    cert.set_defaults(func=_certify)

    rep = add_command(sub, "report", "certified accuracy at r = 0, 0.25, 0.5, 0.75 per method, plus plots")
    rep.add_argument("--out", default="runs/defense",
                     help="folder whose */certify.json runs are reported, and where report.md and "
                          "certified_accuracy.png go; a folder of seed-S/ folders (one comparison per seed) is "
                          "reported per seed and pooled")
    add_deprecated_alias(rep, "--root", "--out", "out")
    rep.add_argument("--runs", nargs="*", default=None, help="explicit run folders instead of OUT/*")
    add_json(rep)
    rep.add_argument("--markdown", default=None, help="markdown output (default OUT/report.md)")
    rep.add_argument("--plot", default=None, help="plot output (default OUT/certified_accuracy.png)")
    rep.set_defaults(func=_report)

    cmp_ = add_command(sub, "compare", "train and certify several methods over several seeds, then report "
                                       "each seed and all pooled (OUT/seed-S/METHOD, OUT/report.md)")
    add_run_folder(cmp_, "comparison")
    cmp_.add_argument("--methods", default=",".join(CERTIFY_METHODS),
                      help="methods, comma-separated (none: the classifier smoothed alone)")
    cmp_.add_argument("--seeds", default="0", help="seeds, comma-separated: each seeds training and certification")
    _common(cmp_, classifier_default=d.classifier, data_default=d.dataset)
    cmp_.add_argument("--sigma", type=float, default=d.sigma, help="noise level, training and certification")
    _recipe_flags(cmp_)
    _certify_flags(cmp_, "--certify-batch-size")
    add_executor(cmp_, "zo-ds's stability queries and the certified images")
    cmp_.set_defaults(func=_compare)
    return defense
