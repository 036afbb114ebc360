"""One sparse CGE step of a ResNet on random 3x32x32 images: our engine against the faithful
loop and DeepZero's released ``cge`` (``run_sparse``; ``deepzero-oracle bench --model resnet20``),
and where the engine's time goes per layer kind (``run_profile``; ``--profile``).

The step's coordinates come from a 90%-sparse mask with ZO-GraSP layer ratios. Each batch size
is measured in a child process of its own, so its peak resident memory is that measurement's;
the child retains freed memory as the command line does (``timing.in_child_process``).
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle.allocator import freed_memory_retained
from deepzero_oracle.estimators.rge import RGE
from deepzero_oracle.fastpath import default_working_set
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.pruning import random_mask, ratios_from_scores, zo_grasp_scores

from deepzero_oracle.common.models import build_model

from .timing import (ReferenceLoop, ReleasedCGE, counted_flops, in_child_process, matmul_gflops, peak_rss_mb, timed,
                     write_report)


class SparseStep:
    """The setup of one sparse CGE step of model ``name`` on ``batch`` random 3x32x32 images:
    the learner (train mode, or eval mode with frozen BatchNorm statistics when ``eval_mode``),
    the data, an oracle bound to it, theta, and the step's coordinates per parameter tensor
    (``kept``, a 90%-sparse mask at ``sparsity`` with ZO-GraSP layer ratios from
    ``grasp_queries`` shared RGE directions on 64 of the images). ``pick(coords, n)``: n of
    ``coords`` at random, sorted."""

    def __init__(self, name: str, batch: int, *, sparsity: float = 0.9, grasp_queries: int = 16,
                 mu: float = 5e-3, seed: int = 0, eval_mode: bool = False):
        torch.manual_seed(seed)
        self.gen = gen = torch.Generator().manual_seed(seed)
        self.mu, self.mode = mu, "eval" if eval_mode else "train"
        self.learner = build_model(name, (3, 32, 32), 10)
        self.learner.train(not eval_mode)
        self.x, self.y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        if eval_mode:  # frozen statistics, as a pretrained network has: those of this batch
            self.learner.train()
            for m in self.learner.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = None  # cumulative average: one forward sets them
            with torch.no_grad():
                self.learner(self.x)
            self.learner.eval()
        self.oracle = oracle = ModuleOracle(self.learner, F.cross_entropy).bind(self.x[:64], self.y[:64])
        self.theta = theta = oracle.theta()
        scores = zo_grasp_scores(oracle, theta, RGE(q=grasp_queries, mu=mu), gen)
        mask = random_mask(oracle.slots, ratios_from_scores(oracle.slots, scores, sparsity), gen)
        # warm-up and the fast path's one-time self-check (on a few rows: it runs the generic path)
        oracle.bind(self.x[:8], self.y[:8]).coordinate_losses(theta, torch.tensor([0, 1]), mu)
        oracle.bind(self.x, self.y)
        self.kept = [mask[s.offset:s.stop].nonzero().reshape(-1) + s.offset for s in oracle.slots]
        self.counts = [len(k) for k in self.kept]

    def pick(self, coords: torch.Tensor, n: int) -> torch.Tensor:
        return coords[torch.randperm(len(coords), generator=self.gen)[:n]].sort().values

    def engine_losses(self, coords: torch.Tensor) -> torch.Tensor:
        return self.oracle.coordinate_losses(self.theta, coords, self.mu)


def sparse_step_bench(name: str, batch: int, *, sparsity: float = 0.9, engine_coords: int = 64,
                      loop_coords: int = 2, released_coords: int = 12, grasp_queries: int = 16,
                      mu: float = 5e-3, seed: int = 0, eval_mode: bool = False) -> dict:
    """One sparse CGE step of model ``name`` (train mode; eval mode, frozen BatchNorm
    statistics, when ``eval_mode``) on ``batch`` random 3x32x32 images: engine vs the faithful
    loop (``ReferenceLoop``) vs the released ``cge`` (``ReleasedCGE``).

    Layer ratios come from ZO-GraSP (``grasp_queries`` shared RGE directions on 64 images) at
    ``sparsity``; a random mask with those ratios picks the step's coordinates. Per parameter
    tensor the engine is timed on up to ``engine_coords`` of them and the loop on up to
    ``loop_coords``; the released ``cge`` costs the same for every coordinate, so it is timed on
    ``released_coords`` drawn from the whole mask. Seconds per step are projected as
    ``sum over tensors of kept / rate``, plus one forward (the loss at theta). FLOPs are
    multiply-adds of matmuls and convolutions (``FlopCounterMode``); the necessary FLOPs of a
    step are the engine's. ``run_sparse`` runs it in a child process that retains freed memory
    as the command line does (``DEEPZERO_ORACLE_MALLOC=default``: glibc's default); the result
    says which. Returns a dict (see ``markdown_sparse``).
    """
    retained = freed_memory_retained()
    setup = SparseStep(name, batch, sparsity=sparsity, grasp_queries=grasp_queries, mu=mu, seed=seed,
                       eval_mode=eval_mode)
    learner, x, y, oracle, theta = setup.learner, setup.x, setup.y, setup.oracle, setup.theta
    kept, counts, pick = setup.kept, setup.counts, setup.pick

    with torch.no_grad():
        learner(x)
        forward_s = statistics.median(timed(lambda: learner(x))[1] for _ in range(3))
    rss = {"setup": peak_rss_mb()}

    def per_tensor_seconds(losses_of, per_tensor):
        seconds, samples, values = 0.0, [], []
        for coords, n in zip(kept, counts):
            if n == 0:
                continue
            sample = pick(coords, per_tensor)
            losses, t = timed(lambda: losses_of(sample))
            seconds += n * t / len(sample)
            samples.append(sample)
            values.append(losses)
        return seconds, torch.cat(samples), torch.cat(values)

    engine_s, _, _ = per_tensor_seconds(lambda c: oracle.coordinate_losses(theta, c, mu), engine_coords)
    rss["engine"] = peak_rss_mb()
    loop = ReferenceLoop(copy.deepcopy(learner), F.cross_entropy, x, y)
    loop_s, loop_sample, loop_losses = per_tensor_seconds(lambda c: loop.losses(c, mu), loop_coords)
    rss["loop"] = peak_rss_mb()
    released = ReleasedCGE(learner, F.cross_entropy, x, y)
    released_sample = pick(torch.cat(kept), released_coords)
    released_losses, t = timed(lambda: released.losses(released_sample, mu))
    released_s = sum(counts) * t / len(released_sample)
    rss["released"] = peak_rss_mb()
    # the same coordinates through the engine: the three must agree (float32 rounding)
    compared = torch.cat([loop_sample, released_sample])
    engine_losses = oracle.coordinate_losses(theta, compared, mu)
    loss0 = float(oracle.loss(theta))
    diff = ((engine_losses - torch.cat([loop_losses, released_losses])) / mu).abs().max()

    def step_flops(losses_of, per_tensor):
        return sum(n * counted_flops(lambda: losses_of(pick(coords, per_tensor))) / min(n, per_tensor)
                   for coords, n in zip(kept, counts) if n)

    necessary = step_flops(lambda c: oracle.coordinate_losses(theta, c, mu), 2)
    forward_flops = counted_flops(lambda: learner(x))
    flops = {"engine": necessary, "loop": step_flops(lambda c: loop.losses(c, mu), 1),
             "released": sum(counts) * forward_flops}
    peak = matmul_gflops()
    methods = {}
    for method, seconds in (("engine", engine_s), ("loop", loop_s), ("released", released_s)):
        step = seconds + forward_s
        methods[method] = {
            "coords_per_s": sum(counts) / seconds,
            "seconds_per_step": step,
            "gflops_per_step": flops[method] / 1e9,
            "necessary_gflops_per_s": necessary / step / 1e9,
            "flop_efficiency": necessary / step / 1e9 / peak,
            "peak_rss_mb_after": rss[method],
        }
    return {
        "model": name, "batch": batch, "parameters": oracle.dim, "mode": setup.mode,
        "sparsity": sparsity, "coordinates_per_step": sum(counts),
        "threads": torch.get_num_threads(), "retained_freed_memory": retained,
        "working_set_bytes": default_working_set(),
        "samples": {"engine_per_tensor": engine_coords, "loop_per_tensor": loop_coords,
                    "released_total": len(released_sample), "grasp_queries": grasp_queries},
        "forward_s": forward_s, "flops_per_forward": forward_flops, "matmul_gflops": peak,
        "speedup_vs_loop": methods["loop"]["seconds_per_step"] / methods["engine"]["seconds_per_step"],
        "speedup_vs_released": methods["released"]["seconds_per_step"] / methods["engine"]["seconds_per_step"],
        "coords_per_forward": methods["engine"]["coords_per_s"] * forward_s,
        "max_abs_diff": float(diff), "loss": loss0,
        "peak_rss_mb": peak_rss_mb(),
        "methods": methods,
    }


LABEL = "fastpath: "
MATMUL_OPS = {"aten::conv2d", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}


def profile_sparse_step(name: str, batch: int, *, engine_coords: int = 8, sparsity: float = 0.9,
                        grasp_queries: int = 16, mu: float = 5e-3, seed: int = 0,
                        eval_mode: bool = False) -> dict:
    """Where the engine's time in one sparse CGE step goes, per layer kind (``torch.profiler``).

    The step is set up as in ``sparse_step_bench``. Per parameter tensor, up to
    ``engine_coords`` of the step's coordinates are answered once to warm up, then once under
    the profiler; each operator's own time (and its matmul/convolution FLOPs) goes to the layer
    kind whose label encloses it (``GraphForward.layer_kind``; "moved weight" for the one-weight
    delta, "other" outside the labels: chunking and the loss), scaled by the tensor's share of
    the step (kept / sampled). Returns ``{"rows": [{"kind", "seconds_per_step", "share",
    "gflop_per_step", "gflops", "ops": {op: seconds}}], ...}`` (see ``markdown_profile``).
    """
    from torch.profiler import ProfilerActivity, profile

    retained = freed_memory_retained()
    step = SparseStep(name, batch, sparsity=sparsity, grasp_queries=grasp_queries, mu=mu, seed=seed,
                      eval_mode=eval_mode)
    kinds: dict[str, dict] = {}
    wall = 0.0
    for coords, n in zip(step.kept, step.counts):
        if n == 0:
            continue
        sample = step.pick(coords, engine_coords)
        step.engine_losses(sample)  # warm-up: compiled kernels, helper values
        scale = n / len(sample)
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            _, t = timed(lambda: step.engine_losses(sample))
        wall += scale * t
        for evt in prof.events():
            label = evt
            while label is not None and not label.name.startswith(LABEL):
                label = label.cpu_parent
            kind = kinds.setdefault("other" if label is None else label.name[len(LABEL):],
                                    {"seconds": 0.0, "flops": 0.0, "ops": {}})
            own = scale * evt.self_cpu_time_total / 1e6
            kind["seconds"] += own
            if not evt.name.startswith(LABEL):
                kind["ops"][evt.name] = kind["ops"].get(evt.name, 0.0) + own
            if evt.name in MATMUL_OPS:
                kind["flops"] += scale * (evt.flops or 0)
    total = sum(k["seconds"] for k in kinds.values())
    peak = matmul_gflops()
    rows = [{"kind": kind, "seconds_per_step": v["seconds"], "share": v["seconds"] / total,
             "gflop_per_step": v["flops"] / 1e9, "gflops": v["flops"] / 1e9 / v["seconds"] if v["seconds"] else 0.0,
             "ops": dict(sorted(v["ops"].items(), key=lambda kv: -kv[1])[:4])}
            for kind, v in sorted(kinds.items(), key=lambda kv: -kv[1]["seconds"])]
    return {"model": name, "batch": batch, "mode": step.mode, "coordinates_per_step": sum(step.counts),
            "sampled_per_tensor": engine_coords, "profiled_seconds_per_step": total,
            "wall_seconds_per_step_under_profiler": wall, "matmul_gflops": peak,
            "threads": torch.get_num_threads(), "retained_freed_memory": retained, "rows": rows}


def markdown_profile(results: list[dict]) -> str:
    """``profile_sparse_step`` results as markdown: one table per model, batch and mode."""
    lines = []
    for r in results:
        lines += [f"{r['model']}, batch {r['batch']}, {r['mode']} mode: {r['profiled_seconds_per_step']:.0f} s "
                  f"per step in operators (matmul {r['matmul_gflops']:.0f} GFLOP/s)", "",
                  "| layer kind | s/step | share | conv/matmul GFLOP/step | GFLOP/s (share of matmul) "
                  "| top operators |",
                  "|---|---:|---:|---:|---:|---|"]
        for row in r["rows"]:
            rate = (f"{row['gflops']:.1f} ({100 * row['gflops'] / r['matmul_gflops']:.0f}%)"
                    if row["gflop_per_step"] else "-")
            ops = ", ".join(f"{op.removeprefix('aten::')} {100 * t / max(row['seconds_per_step'], 1e-12):.0f}%"
                            for op, t in list(row["ops"].items())[:3])
            lines.append(f"| {row['kind']} | {row['seconds_per_step']:.1f} | {100 * row['share']:.1f}% | "
                         f"{row['gflop_per_step']:,.0f} | {rate} | {ops} |")
        lines.append("")
    return "\n".join(lines)


def run_profile(model: str, batches: list[int], out_dir="runs/bench", **options) -> dict:
    """``profile_sparse_step`` for each batch size, each in a child process; writes
    ``profile-<model>[-eval].json`` and ``.md`` under ``out_dir``."""
    results = [in_child_process(profile_sparse_step, model, b, **options) for b in batches]
    report = {"benchmark": "sparse CGE step profile", "results": results}
    write_report(report, markdown_profile(results), out_dir, f"profile-{model}", options)
    return report


def markdown_sparse(results: list[dict]) -> str:
    """``sparse_step_bench`` results as markdown: one row per model, batch and method."""
    lines = ["| model | batch | coords/step | method | coords/s | s/step | engine's speedup over it | "
             "GFLOPs/step | necessary GFLOP/s (share of matmul) | peak RSS MiB so far |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for method, m in r["methods"].items():
            speedup = m["seconds_per_step"] / r["methods"]["engine"]["seconds_per_step"]
            lines.append(f"| {r['model']} | {r['batch']} | {r['coordinates_per_step']:,} | {method} | "
                         f"{m['coords_per_s']:.2f} | {m['seconds_per_step']:.0f} | "
                         f"{'-' if method == 'engine' else f'{speedup:.1f}x'} | {m['gflops_per_step']:,.0f} | "
                         f"{m['necessary_gflops_per_s']:.2f} ({100 * m['flop_efficiency']:.1f}%) | "
                         f"{m['peak_rss_mb_after']:.0f} |")
    lines += ["", "| model | batch | speedup vs loop | speedup vs released | coords_per_forward | "
              "max abs diff | peak RSS MiB | matmul GFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['batch']} | {r['speedup_vs_loop']:.1f}x | "
                     f"{r['speedup_vs_released']:.0f}x | {r['coords_per_forward']:.3g} | "
                     f"{r['max_abs_diff']:.1e} | {r['peak_rss_mb']:.0f} | {r['matmul_gflops']:.1f} |")
    return "\n".join(lines)


def run_sparse(model: str, batches: list[int], out_dir="runs/bench", **options) -> dict:
    """``sparse_step_bench`` for each batch size, each in a child process; writes
    ``engine-<model>.json`` and ``.md`` under ``out_dir``."""
    results = [in_child_process(sparse_step_bench, model, b, **options) for b in batches]
    report = {"benchmark": "sparse CGE step", "results": results}
    report.update({k: results[-1][k] for k in ("speedup_vs_loop", "speedup_vs_released", "coords_per_forward",
                                               "max_abs_diff", "peak_rss_mb")})
    write_report(report, markdown_sparse(results), out_dir, f"engine-{model}", options)
    return report


__all__ = ["SparseStep", "markdown_profile", "markdown_sparse", "profile_sparse_step", "run_profile", "run_sparse",
           "sparse_step_bench"]
