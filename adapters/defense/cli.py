"""``deepzero-oracle defense train | certify | report | compare``: the black-box defense from the shell.

``register(subparsers)`` adds the commands (the ``deepzero-oracle`` entry point does). A run
folder (``--out``) holds one method's trained front (``run.json``, ``front.pt``, per-stage
Trainer checkpoints) and, after ``certify``, its per-example log ``certify.tsv`` and
``certify.json``; ``report`` reads the run folders under its ``--out`` and writes its table there.

Images come from ``--data`` (an ``.npz`` or an image folder, ``deepzero_oracle.apps.datasets``)
or ``--dataset`` (an example); the classifier from ``--classifier`` (``local`` or a black-box
spec, :func:`.classifier.open_classifier`). Both are read and checked before anything on disk
changes; ``certify`` defaults to the run's data and classifier. ``compare`` runs train and
certify for several methods and seeds (``OUT/seed-S/METHOD``), then the pooled report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from deepzero_oracle.apps.options import (add_command, add_deprecated_alias, add_executor, add_json, add_max_queries,
                                          add_quiet, add_run_folder, add_timeout, budget_message, given_flags,
                                          int_list, progress_flags, progress_of, run_subcommand)
from deepzero_oracle.errors import EXIT_BUDGET
from deepzero_oracle.atomic import write_json, write_text
from deepzero_oracle.parallel import open_executor

__all__ = ["register", "report", "pooled_report", "CERTIFY_METHODS"]

log = logging.getLogger(__name__)

CERTIFY_METHODS = ("none", "fo-ds", "zo-ds", "zo-ae-ds")
_ORDER = {m: i for i, m in enumerate(CERTIFY_METHODS)}


def _data(value: str):
    from deepzero_oracle.apps.datasets import DATASETS, load_data

    data = load_data(value)
    return data, value if value in DATASETS else data.name  # files by absolute path: certify finds them


def _classifier(args, spec: str, data):
    from deepzero_oracle.adapters.defense.classifier import open_classifier

    return open_classifier(spec, data, path=args.classifier_path, timeout=args.timeout, progress=progress_of(args))


def _train(args) -> int:
    from deepzero_oracle.adapters.defense.methods import DefenseConfig, train_defense

    # Everything is checked (settings, data, classifier) before anything on disk changes.
    data, dataset = _data(args.data)
    config = DefenseConfig(method=args.method, dataset=dataset, classifier=args.classifier, sigma=args.sigma,
                           objective=args.objective, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs,
                           ae_epochs=args.ae_epochs, batch_size=args.batch_size, lr=args.lr, width=args.width,
                           depth=args.depth, latent=args.latent, sparsity=args.sparsity, pruner=args.pruner,
                           redraw_every=args.redraw_every, mu=args.mu, max_train=args.max_train,
                           seed=args.seed).check()
    with open_executor(args.executor) as pool, _classifier(args, args.classifier, data) as classifier:
        if args.method == "fo-ds" and classifier.whitebox is None:
            raise ValueError(f"fo-ds back-propagates through the classifier, but {args.classifier} can only be "
                             "queried; fo-ds needs --classifier local or MODULE:ATTR naming a torch nn.Module "
                             "(zo-ds and zo-ae-ds work on any classifier)")
        out = Path(args.out)
        info = train_defense(config, classifier, out, data=data, whitebox=classifier.whitebox,
                             classifier_info=classifier.describe(), restart=args.restart, progress=progress_of(args),
                             executor=pool, max_queries=args.max_queries)
    if info.get("stopped_reason"):
        if args.json:
            print(json.dumps(info))
        print(budget_message("defense train", info["stopped_reason"], info["queries"], out), file=sys.stderr)
        return EXIT_BUDGET
    summary = {k: info[k] for k in ("method", "queries", "blackbox_images", "seconds",
                                    "pipeline_clean_accuracy", "denoiser_parameters")}
    print(json.dumps(summary) if args.json else
          f"defense train: {info['method']}: clean accuracy through the front "
          f"{info['pipeline_clean_accuracy']:.3f}, {info['queries']:,} queries, "
          f"{info['blackbox_images']:,} black-box images, {info['seconds']:.1f} s")
    print(f"wrote {out}/run.json, front.pt and stage checkpoints", file=sys.stderr)
    return 0


def _certify(args) -> int:
    from deepzero_oracle.adapters.defense.methods import certify_front, load_front
    from deepzero_oracle.apps.datasets import data_fingerprint

    out = Path(args.out)
    front, training = None, {"queries": 0, "blackbox_images": 0}
    if args.method == "none":
        if args.data is None or args.sigma is None:
            raise ValueError("--method none needs --data (or --dataset) and --sigma (there is no trained run to "
                             "read them from)")
        (data, dataset), sigma, spec = _data(args.data), args.sigma, args.classifier or "local"
    else:
        if not (out / "run.json").exists():
            raise FileNotFoundError(
                f"{out}/run.json not found: run `defense train --method {args.method} --out {out}` first")
        front, config = load_front(out)
        if config.method != args.method:
            raise ValueError(f"{out} holds a {config.method} run, not {args.method}")
        training = json.loads((out / "run.json").read_text())
        data, dataset = _data(args.data or config.dataset)
        trained_on = training.get("data_sha256")
        if trained_on is not None and trained_on != data_fingerprint(data):
            raise ValueError(f"{out} was trained on other images than {args.data or config.dataset} holds now "
                             f"(fingerprint {trained_on} then, {data_fingerprint(data)} now); certify it on the "
                             "images it was trained on")
        spec = args.classifier or config.classifier
        if spec != config.classifier:
            log.warning("certifying with --classifier %s; the front was trained against %s", spec, config.classifier)
        sigma = args.sigma if args.sigma is not None else config.sigma
        if sigma != config.sigma:
            log.warning("certifying at sigma=%s a front trained at sigma=%s", sigma, config.sigma)
    # What the log's rows depend on beyond the sampling settings: resuming must not mix models.
    model = {"method": args.method, "classifier": spec,
             "front_sha256": hashlib.sha256((out / "front.pt").read_bytes()).hexdigest() if front else None}
    with open_executor(args.executor) as pool, _classifier(args, spec, data) as classifier:
        run = certify_front(front, classifier, data, sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                            max_examples=args.max_examples, batch_size=args.batch_size, seed=args.seed,
                            log_path=out / "certify.tsv", progress=progress_of(args), resume=not args.restart,
                            settings=model, executor=pool)
    summary = {"method": args.method, "dataset": dataset, **run.summary(),
               "training_queries": int(training["queries"]),
               "training_blackbox_images": int(training["blackbox_images"])}
    write_json(out / "certify.json", summary)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"defense certify: {args.method} on {summary['examples']} {dataset} images at sigma={sigma:g}: "
              f"certified accuracy {_accuracy_line(summary)}; {summary['queries']:,} noisy samples")
    print(f"wrote {out}/certify.tsv and certify.json", file=sys.stderr)
    return 0


def _accuracy_line(summary: dict) -> str:
    at = summary.get("certified_accuracy") or {}
    return ", ".join(f"{float(v):.3f} at r={r}" for r, v in at.items()) or "n/a"


def _runs(root: Path, runs: list[str] | None) -> list[Path]:
    dirs = [Path(r) for r in runs] if runs else sorted(p.parent for p in root.glob("*/certify.json"))
    missing = [str(d) for d in dirs if not (d / "certify.json").exists() or not (d / "certify.tsv").exists()]
    if missing:
        raise FileNotFoundError(f"no certify.json/certify.tsv in {', '.join(missing)}: run `defense certify` there")
    if not dirs:
        raise FileNotFoundError(f"no certified runs under {root} (looked for */certify.json)")
    return dirs


def report(dirs: list[Path], radii=(0.0, 0.25, 0.5, 0.75)) -> tuple[dict, str, dict]:
    """Collect certified runs.

    Args:
        dirs: run folders holding ``certify.tsv`` and ``certify.json``.
        radii: the table's radii.
    Returns:
        ``(table_json, markdown, logs)``: ``{name: {"0.0": acc, ..., "queries": n, "n_images",
        "ci95": {r: [lo, hi]}, "vs": {other: {r: {"p", "a_only", "b_only", "n"}}}}}`` (accuracy in
        [0, 1] with its exact 95% interval, queries = training queries, exact McNemar tests
        against every method certified on the same images; adapters/defense/report.py), the
        markdown text, and ``{name: log path}``. ``name`` is the method, or ``method (folder)``
        when two folders hold the same method.
    """
    from deepzero_oracle.adapters.defense.report import summarize, summary_markdown

    infos = [(d, json.loads((d / "certify.json").read_text())) for d in dirs]
    infos.sort(key=lambda t: (_ORDER.get(t[1]["method"], 99), str(t[0])))
    counts: dict[str, int] = {}
    for _, info in infos:
        counts[info["method"]] = counts.get(info["method"], 0) + 1
    logs, queries, extra = {}, {}, []
    for d, info in infos:
        name = info["method"] if counts[info["method"]] == 1 else f"{info['method']} ({d.name})"
        logs[name] = d / "certify.tsv"
        queries[name] = int(info["training_queries"])
        extra.append(f"| {name} | {info['training_blackbox_images']:,} | {info['sigma']:g} | {info['n']:,} | "
                     f"{info['alpha']:g} | {info['samples_per_second']:,.0f} |")
    table = summarize(logs, radii, queries)
    md = "Certified accuracy (%) by L2 radius with exact 95% intervals over the test images; queries = oracle queries spent in training.\n\n"
    md += summary_markdown(table, radii)
    md += ("\n| method | training black-box images | sigma | n | alpha | certify samples/s |\n"
           "|---|---:|---:|---:|---:|---:|\n" + "\n".join(extra) + "\n")
    return table, md, logs


def pooled_report(seed_dirs: dict[int, list[Path]], radii=(0.0, 0.25, 0.5, 0.75)) -> tuple[dict, str, dict]:
    """Report a comparison run once per seed: each seed as :func:`report` does, then all seeds
    pooled (every seed's images counted, paired tests pairing the same (seed, image)).

    Args:
        seed_dirs: ``{seed: run folders}`` (e.g. ``ROOT/seed-S/METHOD``).
    Returns:
        ``({"seeds": {seed: table}, "pooled": table}, markdown, {name: pooled rows})``; tables as
        :func:`report`'s, the pooled ``queries`` being the mean over seeds. Methods missing from
        some seed are left out of the pool (and named in the markdown).
    """
    from deepzero_oracle.adapters.defense.report import pool_seeds, summarize, summary_markdown

    per_seed = {seed: report(dirs, radii) for seed, dirs in seed_dirs.items()}
    logs = pool_seeds({seed: logs for seed, (_, _, logs) in per_seed.items()})
    queries = {name: round(sum(t[name]["queries"] for t, _, _ in per_seed.values()) / len(per_seed))
               for name in logs}
    table = summarize(logs, radii, queries)
    seeds = ", ".join(map(str, seed_dirs))
    md = (f"Pooled over seeds {seeds}: certified accuracy (%) with exact 95% intervals over every seed's test "
          "images; paired tests pair the same image under the same seed; queries = mean training queries per "
          "seed.\n\n" + summary_markdown(table, radii))
    left_out = sorted({n for t, _, _ in per_seed.values() for n in t} - set(logs))
    if left_out:
        md += f"\nNot pooled (not certified under every seed): {', '.join(left_out)}.\n"
    for seed, (_, seed_md, _) in per_seed.items():
        md += f"\n## Seed {seed}\n\n{seed_md}"
    return {"seeds": {str(s): t for s, (t, _, _) in per_seed.items()}, "pooled": table}, md, logs


def _seed_folders(root: Path) -> dict[int, list[Path]]:
    """``{S: run folders}`` for ``root/seed-S/*/certify.json``, when ``root`` holds no run itself."""
    if any(root.glob("*/certify.json")):
        return {}
    found = {}
    for folder in sorted(root.glob("seed-*")):
        if folder.is_dir() and folder.name[5:].isdigit() and any(folder.glob("*/certify.json")):
            found[int(folder.name[5:])] = _runs(folder, None)
    return dict(sorted(found.items()))


def _report(args) -> int:
    from deepzero_oracle.adapters.defense.report import plot_with_bands

    root = Path(args.out)
    seeds = {} if args.runs else _seed_folders(root)
    if seeds:
        table, md, logs = pooled_report(seeds)
    else:
        table, md, logs = report(_runs(root, args.runs))
    out_md = write_text(Path(args.markdown) if args.markdown else root / "report.md", md)
    plot = Path(args.plot) if args.plot else root / "certified_accuracy.png"
    plot_with_bands(logs, plot)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(md)
    print(f"wrote {out_md} and {plot}", file=sys.stderr)
    return 0


def _compare(args) -> int:
    """For each seed S and method M: ``defense train`` (not for none) and ``defense certify`` in
    ``OUT/seed-S/M``, both seeded with S; then the per-seed and pooled report in ``OUT``. Each
    step continues what its folder holds, so an interrupted comparison resumes where it stopped."""
    seeds = int_list(args.seeds, "--seeds")
    methods = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in methods if m not in CERTIFY_METHODS]
    if bad or not methods:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(CERTIFY_METHODS)}")
    out = Path(args.out)
    common = ["--data", args.data, "--classifier", args.classifier,
              *(["--classifier-path", args.classifier_path] if args.classifier_path else []),
              "--timeout", str(args.timeout), *progress_flags(args), *(["--restart"] if args.restart else [])]
    certify = ["--n0", str(args.n0), "--n", str(args.n), "--alpha", str(args.alpha), "--max-examples",
               str(args.max_examples), "--batch-size", str(args.certify_batch_size), "--executor", args.executor]
    for seed in seeds:
        for method in methods:
            folder = str(out / f"seed-{seed}" / method)
            if method == "none":
                run_subcommand(register, ["defense", "certify", "--method", "none", "--sigma", str(args.sigma),
                                          "--seed", str(seed), "--out", folder, *certify, *common])
                continue
            run_subcommand(register, ["defense", "train", "--method", method, "--seed", str(seed), "--out", folder,
                                      "--sigma", str(args.sigma), "--executor", args.executor,
                                      *given_flags(args, _recipe_flags), *common])
            run_subcommand(register, ["defense", "certify", "--method", method, "--seed", str(seed), "--out", folder,
                                      *certify, *common])
    args.runs, args.markdown, args.plot = None, None, None
    return _report(args)


def _common(p: argparse.ArgumentParser, *, classifier_default: str | None, data_default: str | None) -> None:
    from deepzero_oracle.apps.datasets import DATASETS

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
    from deepzero_oracle.adapters.defense.methods import OBJECTIVES, DefenseConfig

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
    from deepzero_oracle.adapters.defense.methods import METHODS, DefenseConfig

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
