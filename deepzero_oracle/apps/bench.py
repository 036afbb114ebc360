"""Coordinate-estimate throughput: our engine against the reference method, side by side.

The reference method (DeepZero's implementation) loops over coordinates in Python: perturb one
weight in place, run the layers from the perturbed one on from cached features, restore. We
time it and our ``ModuleOracle`` on the same coordinates, batch and dtype, in one run, and
report ratios (absolute times mean little on a shared machine).

Per parameter tensor, each method is timed on a sample of coordinates; the time for all
coordinates is the sum over tensors of ``numel / rate`` (``--loop-coords 0`` times the loop on
every coordinate instead). The engine is also timed directly on all coordinates.

``--model resnet8|resnet20`` benchmarks a sparse CGE step instead (``sparse_step_bench``): random
3x32x32 images, a 90%-sparse coordinate mask with ZO-GraSP layer ratios, and a second baseline,
DeepZero's released non-distributed ``cge`` (``ReleasedCGE``). Each batch size is measured in
a child process of its own, so its peak resident memory is that measurement's.
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from deepzero_oracle.allocator import retain_freed_memory
from deepzero_oracle.argtypes import bounded
from deepzero_oracle.runs import write_json, write_text
from deepzero_oracle.estimators.rge import RGE
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.pruning import random_mask, ratios_from_scores, zo_grasp_scores

from deepzero_oracle.common.datasets import load_dataset
from deepzero_oracle.common.models import build_model, cnn, mlp
from deepzero_oracle.common.options import add_command, add_json, int_list

ABLATIONS = {
    "engine": {},
    "no fused kernels": {"fused_kernels": False},
    "no delta propagation": {"delta_propagation": False},
    "no one-weight delta": {"one_weight_delta": False, "delta_propagation": False},
    "no feature reuse": {"fast": False},
}


class ReferenceLoop:
    """DeepZero's per-coordinate CGE loop on an ``nn.Sequential`` learner, feature reuse included.

    ``losses(coords, mu) -> [C]``: loss with ``theta + mu e_i`` for each coordinate i.
    """

    def __init__(self, learner: nn.Sequential, loss_fn, x, y):
        self.layers, self.loss_fn, self.y = list(learner), loss_fn, y
        self.owner = []  # (layer index, parameter) in theta order
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                self.owner.append((i, p))
        self.locate = CoordinateLocator([p.numel() for _, p in self.owner])
        with torch.no_grad():  # the input of every layer, once
            self.inputs, h = [], x
            for layer in self.layers:
                self.inputs.append(h)
                h = layer(h)

    def losses(self, coords: torch.Tensor, mu: float) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for c in coords.tolist():
                k, local = self.locate(c)
                layer_index, p = self.owner[k]
                flat = p.data.view(-1)
                flat[local] += mu
                h = self.inputs[layer_index]
                for layer in self.layers[layer_index:]:
                    h = layer(h)
                out.append(self.loss_fn(h, self.y))
                flat[local] -= mu
        return torch.stack(out)


class CoordinateLocator:
    """``locate(c) -> (k, local)``: coordinate c of theta is entry ``local`` of tensor k, for
    tensors of ``sizes`` laid out one after the other."""

    def __init__(self, sizes: list[int]):
        sizes_t = torch.tensor(sizes)
        self.starts = torch.cumsum(sizes_t, 0) - sizes_t

    def __call__(self, c: int) -> tuple[int, int]:
        k = int(torch.searchsorted(self.starts, torch.tensor(c), right=True)) - 1
        return k, c - int(self.starts[k])


class ReleasedCGE:
    """DeepZero's released non-distributed ``cge``, as written there, in our words: per
    coordinate, a deep copy of the whole parameter dict, the one entry moved, the copy loaded
    into the model with ``load_state_dict`` and a full forward. No feature reuse, no batching.

    Runs on its own deep copy of ``learner`` (its train-mode forwards move running statistics).
    ``losses(coords, mu) -> [C]``: loss with ``theta + mu e_i`` for each coordinate i.
    """

    def __init__(self, learner: nn.Module, loss_fn, x, y):
        self.model, self.loss_fn, self.x, self.y = copy.deepcopy(learner), loss_fn, x, y
        self.params = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}
        self.names = list(self.params)
        self.locate = CoordinateLocator([v.numel() for v in self.params.values()])

    def losses(self, coords: torch.Tensor, mu: float) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for c in coords.tolist():
                k, local = self.locate(c)
                perturbed = copy.deepcopy(self.params)
                perturbed[self.names[k]].view(-1)[local] += mu
                self.model.load_state_dict(perturbed, strict=False)
                out.append(self.loss_fn(self.model(self.x), self.y))
        self.model.load_state_dict(self.params, strict=False)
        return torch.stack(out)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _flops(fn) -> int:
    """Multiply-add FLOPs (matmuls and convolutions only) that ``fn()`` performs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sample_coordinates(oracle: ModuleOracle, per_tensor: int, generator) -> list[torch.Tensor]:
    """Per parameter tensor, up to ``per_tensor`` random coordinates (all when 0)."""
    picks = []
    for s in oracle.slots:
        n = s.numel if per_tensor <= 0 else min(per_tensor, s.numel)
        picks.append(s.offset + torch.randperm(s.numel, generator=generator)[:n].sort().values)
    return picks


def estimated_seconds(rates: list[float], oracle: ModuleOracle) -> float:
    """Time for all coordinates from per-tensor rates (coords/s)."""
    return sum(s.numel / r for s, r in zip(oracle.slots, rates))


def bench_model(name: str, learner: nn.Module, x, y, *, loop_coords: int, engine_coords: int,
                ablation_coords: int = 128, mu: float = 5e-3, repeats: int = 15, rounds: int = 3,
                seed: int = 0) -> dict:
    """One model: loop vs engine (+ ablations); returns a dict of rates, ratios and errors.

    Every ablation configuration, the full engine included, is timed on the same per-tensor
    sample of ``ablation_coords`` coordinates (chunk overheads weigh the same on all of them).
    The engine on all coordinates is timed in ``rounds`` rounds, each right after the median of
    ``repeats`` full forwards; coords_per_forward is the median of the rounds' ratios (a ratio
    of two times taken side by side, so load that changes during the run cancels in it).
    """
    gen = torch.Generator().manual_seed(seed)
    base = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    theta = base.theta()
    loss0 = float(base.loss(theta))
    loop_sample = sample_coordinates(base, loop_coords, gen)
    engine_sample = sample_coordinates(base, engine_coords, gen)
    ablation_sample = sample_coordinates(base, ablation_coords, gen)

    def forward_seconds():  # one full forward at the same batch: the median of many
        with torch.no_grad():
            return statistics.median(_timed(lambda: learner(x))[1] for _ in range(repeats))

    forward_seconds()  # warm-up
    loop = ReferenceLoop(learner, F.cross_entropy, x, y)
    loop_rates, loop_grads = [], []
    for coords in loop_sample:
        losses, t = _timed(lambda: loop.losses(coords, mu))
        loop_rates.append(len(coords) / t)
        loop_grads.append((losses - loss0) / mu)

    def rates_on(oracle, sample):
        rates = []
        for coords in sample:
            _, t = _timed(lambda: oracle.coordinate_losses(theta, coords, mu))
            rates.append(len(coords) / t)
        return rates

    configs = {}
    for label, options in ABLATIONS.items():
        oracle = ModuleOracle(learner, F.cross_entropy, **options).bind(x, y)
        oracle.coordinate_losses(theta, loop_sample[0][:2], mu)  # warm-up and self-check
        configs[label] = {"coords_per_s": oracle.dim / estimated_seconds(rates_on(oracle, ablation_sample), oracle)}
        if label == "engine":
            engine, engine_rates = oracle, rates_on(oracle, engine_sample)
    all_coords = torch.arange(engine.dim)
    forward_times, all_times = [], []
    for _ in range(rounds):
        forward_times.append(forward_seconds())
        losses, t = _timed(lambda: engine.coordinate_losses(theta, all_coords, mu))
        all_times.append(t)
    t_all, forwards_per_s = statistics.median(all_times), 1 / statistics.median(forward_times)
    engine_grad = (losses - loss0) / mu
    # arithmetic, not time: what the rates would be if every method ran at the forward's FLOP/s
    forward_flops = _flops(lambda: learner(x))
    # counted on the library-op path: the fused kernel's multiply-adds are element-wise ops the
    # counter does not see (it does the same products, on the pooled positions only)
    unfused = ModuleOracle(learner, F.cross_entropy, fused_kernels=False).bind(x, y)
    engine_flops = _flops(lambda: unfused.coordinate_losses(theta, all_coords, mu))
    loop_flops = sum(s.numel * _flops(lambda: loop.losses(c[:1], mu)) for s, c in zip(engine.slots, loop_sample))
    reference = torch.cat(loop_grads)
    compared = torch.cat(loop_sample)
    loop_rate = engine.dim / estimated_seconds(loop_rates, engine)
    engine_rate = engine.dim / t_all
    for cfg in configs.values():
        cfg["speedup_vs_loop"] = cfg["coords_per_s"] / loop_rate
    peak = matmul_gflops()
    return {
        "model": name,
        "parameters": engine.dim,
        "batch": len(x),
        "dtype": str(theta.dtype).replace("torch.", ""),
        "forwards_per_s": forwards_per_s,
        "loop_coords_per_s": loop_rate,
        "engine_coords_per_s": engine_rate,
        "speedup_vs_loop": engine_rate / loop_rate,
        "coords_per_forward": statistics.median(engine.dim / t * f for t, f in zip(all_times, forward_times)),
        "loop_coords_per_forward": loop_rate / forwards_per_s,
        "flops_per_forward": forward_flops,
        "engine_flops_per_coord": engine_flops / engine.dim,
        "loop_flops_per_coord": loop_flops / engine.dim,
        "flop_ceiling_coords_per_forward": forward_flops * engine.dim / max(engine_flops, 1),
        "flop_ratio_loop_to_engine": loop_flops / max(engine_flops, 1),
        # FLOP efficiency: each method's counted FLOPs per second of its own, against a big matmul
        "matmul_gflops": peak,
        "forward_gflops": forward_flops * forwards_per_s / 1e9,
        "loop_gflops": loop_flops / engine.dim * loop_rate / 1e9,
        "engine_gflops": engine_flops / t_all / 1e9,
        "max_abs_diff": float((engine_grad[compared] - reference).abs().max()),
        "max_abs_grad": float(reference.abs().max()),
        "compared_coordinates": len(compared),
        "engine_seconds_all_coordinates": t_all,
        "engine_seconds_all_coordinates_rounds": all_times,
        "forwards_per_s_rounds": [1 / f for f in forward_times],
        "per_tensor": [
            {"tensor": s.name, "numel": s.numel, "loop_coords_per_s": lr, "engine_coords_per_s": er}
            for s, lr, er in zip(engine.slots, loop_rates, engine_rates)
        ],
        "ablation": configs,
    }


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """Measured float32 GFLOP/s of an ``n x n`` matmul (the median of ``repeats``): the
    machine's attainable rate, against which FLOP efficiencies are stated."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / statistics.median(_timed(lambda: a @ b)[1] for _ in range(repeats)) / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    step are the engine's. Runs with glibc's default allocator (a child process does not
    inherit ``retain_freed_memory``), as the published peak-memory figures were measured.
    Returns a dict (see ``markdown_sparse``).
    """
    setup = SparseStep(name, batch, sparsity=sparsity, grasp_queries=grasp_queries, mu=mu, seed=seed,
                       eval_mode=eval_mode)
    learner, x, y, oracle, theta = setup.learner, setup.x, setup.y, setup.oracle, setup.theta
    kept, counts, pick = setup.kept, setup.counts, setup.pick

    with torch.no_grad():
        learner(x)
        forward_s = statistics.median(_timed(lambda: learner(x))[1] for _ in range(3))
    rss = {"setup": peak_rss_mb()}

    def per_tensor_seconds(losses_of, per_tensor):
        seconds, samples, values = 0.0, [], []
        for coords, n in zip(kept, counts):
            if n == 0:
                continue
            sample = pick(coords, per_tensor)
            losses, t = _timed(lambda: losses_of(sample))
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
    released_losses, t = _timed(lambda: released.losses(released_sample, mu))
    released_s = sum(counts) * t / len(released_sample)
    rss["released"] = peak_rss_mb()
    # the same coordinates through the engine: the three must agree (float32 rounding)
    compared = torch.cat([loop_sample, released_sample])
    engine_losses = oracle.coordinate_losses(theta, compared, mu)
    loss0 = float(oracle.loss(theta))
    diff = ((engine_losses - torch.cat([loop_losses, released_losses])) / mu).abs().max()

    def step_flops(losses_of, per_tensor):
        return sum(n * _flops(lambda: losses_of(pick(coords, per_tensor))) / min(n, per_tensor)
                   for coords, n in zip(kept, counts) if n)

    necessary = step_flops(lambda c: oracle.coordinate_losses(theta, c, mu), 2)
    forward_flops = _flops(lambda: learner(x))
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
        "threads": torch.get_num_threads(),
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
            _, t = _timed(lambda: step.engine_losses(sample))
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
            "threads": torch.get_num_threads(), "rows": rows}


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
    results = [_isolated(profile_sparse_step, model, b, **options) for b in batches]
    report = {"benchmark": "sparse CGE step profile", "results": results}
    _write_report(report, markdown_profile(results), out_dir, f"profile-{model}", options)
    return report


def _write_report(report: dict, text: str, out_dir, stem: str, options: dict) -> None:
    """``report`` as ``<stem>[-eval].json`` and ``text`` as ``.md`` under ``out_dir`` (None: nowhere)."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem += "-eval" if options.get("eval_mode") else ""
    write_json(out / f"{stem}.json", report)
    write_text(out / f"{stem}.md", text + "\n")


def _isolated(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh child process, so ``ru_maxrss`` is its alone."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


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
    results = [_isolated(sparse_step_bench, model, b, **options) for b in batches]
    report = {"benchmark": "sparse CGE step", "results": results}
    report.update({k: results[-1][k] for k in ("speedup_vs_loop", "speedup_vs_released", "coords_per_forward",
                                               "max_abs_diff", "peak_rss_mb")})
    _write_report(report, markdown_sparse(results), out_dir, f"engine-{model}", options)
    return report


def markdown(results: list[dict]) -> str:
    """The results as a markdown table (one row per model, then the ablation)."""
    lines = ["| model | params | batch | loop coords/s | engine coords/s | speedup | coords_per_forward "
             "(loop) | max abs diff |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['batch']} | {r['loop_coords_per_s']:.0f} | "
                     f"{r['engine_coords_per_s']:.0f} | {r['speedup_vs_loop']:.1f}x | "
                     f"{r['coords_per_forward']:.3g} ({r['loop_coords_per_forward']:.2g}) | "
                     f"{r['max_abs_diff']:.1e} |")
    lines += ["", "Arithmetic (matmul and convolution FLOPs, elementwise work not counted): the speedup "
              "and coords_per_forward each method would reach if it ran at a full forward's FLOP/s.", "",
              "| model | FLOPs per forward | loop FLOPs per coord | engine FLOPs per coord | "
              "FLOP ratio loop/engine | FLOP ceiling of coords_per_forward |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['flops_per_forward']:.3g} | {r['loop_flops_per_coord']:.3g} | "
                     f"{r['engine_flops_per_coord']:.3g} | {r['flop_ratio_loop_to_engine']:.1f}x | "
                     f"{r['flop_ceiling_coords_per_forward']:.3g} |")
    lines += ["", "FLOP efficiency: counted FLOPs per second of each method's own time, and its share of a "
              "float32 2048x2048 matmul's rate on this machine.", "",
              "| model | matmul GFLOP/s | forward GFLOP/s | loop GFLOP/s | engine GFLOP/s |", "|---|---|---|---|---|"]
    for r in results:
        share = lambda g: f"{g:.1f} ({100 * g / r['matmul_gflops']:.0f}%)"  # noqa: E731
        lines.append(f"| {r['model']} | {r['matmul_gflops']:.1f} | {share(r['forward_gflops'])} | "
                     f"{share(r['loop_gflops'])} | {share(r['engine_gflops'])} |")
    lines += ["", "| model | configuration | coords/s | speedup vs loop |", "|---|---|---|---|"]
    for r in results:
        for label, cfg in r["ablation"].items():
            lines.append(f"| {r['model']} | {label} | {cfg['coords_per_s']:.0f} | {cfg['speedup_vs_loop']:.1f}x |")
    return "\n".join(lines)


def run(batch: int = 256, loop_coords: int = 24, engine_coords: int = 0, ablation_coords: int = 128,
        tiny: bool = False, out_dir="runs/bench", seed: int = 0) -> dict:
    """Benchmark the MNIST-5k CNN and MLP; writes JSON and markdown under ``out_dir``.

    Measured as the command line runs: with freed memory retained (``retain_freed_memory``)
    unless ``DEEPZERO_ORACLE_MALLOC=default``; the report says which.
    """
    retained = retain_freed_memory()
    torch.manual_seed(seed)
    data = load_dataset("mnist5k", seed=seed)
    x, y = data.x_train[:batch], data.y_train[:batch]
    shape = data.image_shape
    models = {"mnist5k-cnn": cnn(shape, 10), "mnist5k-mlp": mlp(shape, 10)}
    if tiny:  # for the test suite: the same code on small inputs
        x, y = F.avg_pool2d(x, 4), y
        models = {"tiny-cnn": cnn(x.shape[1:], 10, channels=(4, 4)), "tiny-mlp": mlp(x.shape[1:], 10, (8,))}
    results = [bench_model(name, m, x, y, loop_coords=loop_coords, engine_coords=engine_coords,
                           ablation_coords=ablation_coords, seed=seed) for name, m in models.items()]
    report = {"benchmark": "coordinate estimates", "threads": torch.get_num_threads(),
              "retained_freed_memory": retained, "results": results}
    report.update({k: results[0][k] for k in ("speedup_vs_loop", "coords_per_forward", "max_abs_diff")})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "engine.json", report)
        write_text(out / "engine.md", markdown(results) + "\n")
    return report


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


__all__ = ["ABLATIONS", "CoordinateLocator", "ReferenceLoop", "ReleasedCGE", "SparseStep", "bench_model", "markdown",
           "markdown_profile", "markdown_sparse", "matmul_gflops", "peak_rss_mb", "profile_sparse_step", "register",
           "run", "run_profile", "run_sparse", "sparse_step_bench"]
