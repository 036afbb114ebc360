"""The ``bench`` subcommand: parses its flags and calls one benchmark (``coordinates.run``,
``resnet.run_sparse`` or ``resnet.run_profile``, or the quality-per-query benchmark)."""

from __future__ import annotations

import json
import sys

from deepzero_oracle.argtypes import bounded

from deepzero_oracle.common.options import add_command, add_json, int_list

from .coordinates import markdown, run
from .resnet import markdown_profile, markdown_sparse, run_profile, run_sparse


def _bench(args) -> int:
    if args.queries:  # quality per query: the engine's estimators against CMA-ES and NGOpt
        from deepzero_oracle.apps.queries import bench_queries, markdown as queries_markdown

        summary = bench_queries(args.out, tasks=args.tasks.split(","), seeds=int_list(args.seeds, "--seeds"),
                                methods=args.methods.split(",") if args.methods else None,
                                budget_scale=args.budget_scale, progress=False if args.json else None)
        print(json.dumps(summary, indent=1) if args.json else queries_markdown(summary))
        print(f"wrote {args.out}/queries/queries.md, queries.json, queries.png", file=sys.stderr)
        return 0
    if args.model == "mnist":
        if args.profile or args.eval_mode:
            raise SystemExit("bench: --profile and --eval-mode are for --model resnet8/resnet20 (the MNIST models "
                             "have no BatchNorm); drop them or pick a resnet model")
        if len(args.batch_size) != 1:
            raise SystemExit("bench: the MNIST benchmark takes one --batch-size; several are for --model resnet*")
        report = run(batch=args.batch_size[0], loop_coords=args.loop_coords, engine_coords=args.engine_coords,
                     ablation_coords=args.ablation_coords, tiny=args.tiny, out_dir=args.out)
        text, written = markdown(report["results"]), "engine.json, engine.md"
    elif args.profile:
        report = run_profile(args.model, args.batch_size, out_dir=args.out, sparsity=args.sparsity,
                             engine_coords=args.engine_coords or 8, grasp_queries=args.grasp_queries,
                             eval_mode=args.eval_mode)
        text = markdown_profile(report["results"])
        written = f"profile-{args.model}{'-eval' if args.eval_mode else ''}.json, .md"
    else:
        report = run_sparse(args.model, args.batch_size, out_dir=args.out, sparsity=args.sparsity,
                            engine_coords=args.engine_coords or 64, loop_coords=args.loop_coords,
                            released_coords=args.released_coords, grasp_queries=args.grasp_queries,
                            eval_mode=args.eval_mode)
        suffix = "-eval" if args.eval_mode else ""
        text, written = markdown_sparse(report["results"]), f"engine-{args.model}{suffix}.json, .md"
    print(json.dumps(report, indent=2) if args.json else text)
    print(f"wrote {args.out}/{written}", file=sys.stderr)
    return 0


def register(subparsers):
    """Add the ``bench`` subcommand."""
    p = add_command(subparsers, "bench", "coordinate-estimate throughput: engine vs the per-coordinate loop")
    p.add_argument("--model", choices=("mnist", "resnet8", "resnet20"), default="mnist",
                   help="mnist: the MNIST-5k CNN and MLP, all coordinates; resnet8/resnet20: one sparse "
                        "CGE step on random 3x32x32 images, also against the released cge")
    p.add_argument("--batch-size", type=int, nargs="+", default=[256],
                   help="images per query (resnet models: one measurement per value)")
    p.add_argument("--loop-coords", type=int, default=24,
                   help="coordinates per parameter tensor timed for the loop (0: all; mnist only); "
                        "resnet models: give a small number, e.g. 2")
    p.add_argument("--engine-coords", type=int, default=0,
                   help="coordinates per parameter tensor timed for the engine's per-tensor rates "
                        "(0: all for mnist, 64 for resnet models)")
    p.add_argument("--released-coords", type=int, default=12,
                   help="resnet models: coordinates timed for the released cge, drawn from the whole mask")
    p.add_argument("--sparsity", type=float, default=0.9, help="resnet models: share of coordinates left out")
    p.add_argument("--grasp-queries", type=int, default=16,
                   help="resnet models: RGE directions of the ZO-GraSP scores that set the layer ratios")
    p.add_argument("--ablation-coords", type=int, default=128,
                   help="coordinates per parameter tensor timed for every ablation configuration (0: all)")
    p.add_argument("--eval-mode", action="store_true",
                   help="resnet models: eval mode, BatchNorm with frozen statistics (fine-tuning a pretrained "
                        "network); default train mode, each copy normalised with its own batch statistics")
    p.add_argument("--profile", action="store_true",
                   help="resnet models: instead of the comparison, profile the engine's step per layer kind "
                        "(torch.profiler; --engine-coords coordinates per tensor, default 8); writes "
                        "profile-<model>.json and .md")
    p.add_argument("--tiny", action="store_true", help="small inputs (what the test suite runs)")
    p.add_argument("--queries", action="store_true",
                   help="quality per query instead: every ZO estimator against CMA-ES and NGOpt at equal query "
                        "budgets, over seeds (needs the [peers] extra; records kept in OUT/queries, a rerun "
                        "continues)")
    p.add_argument("--tasks", default="burgers,own-solver,digits,mnist", help="--queries: tasks, comma-separated")
    p.add_argument("--seeds", default="0,1,2,3,4", help="--queries: seeds, comma-separated")
    p.add_argument("--methods", default=None, help="--queries: methods, comma-separated (default: all)")
    p.add_argument("--budget-scale", dest="budget_scale", type=bounded(float, 0, 10, low_open=True), default=1.0,
                   help="--queries: multiplies every task's query budget (0.1 for a quick look)")
    p.add_argument("--out", default="runs/bench", help="where engine.json and engine.md go")
    add_json(p)
    p.set_defaults(func=_bench)
    return p


__all__ = ["register"]
