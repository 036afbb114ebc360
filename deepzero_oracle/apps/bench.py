"""Coordinate-estimate throughput: our engine against the reference method, side by side.

The reference method (DeepZero's implementation) loops over coordinates in Python: perturb one
weight in place, run the layers from the perturbed one on from cached features, restore. We
time it and our ``ModuleOracle`` on the same coordinates, batch and dtype, in one run, and
report ratios (absolute times mean little on a shared machine).

Per parameter tensor, each method is timed on a sample of coordinates; the time for all
coordinates is the sum over tensors of ``numel / rate`` (``--loop-coords 0`` times the loop on
every coordinate instead). The engine is also timed directly on all coordinates.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from deepzero_oracle.atomic import write_json, write_text
from deepzero_oracle.module_oracle import ModuleOracle

from deepzero_oracle.apps.datasets import load_dataset
from deepzero_oracle.apps.models import cnn, mlp
from deepzero_oracle.apps.options import add_command, add_json

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
        with torch.no_grad():  # the input of every layer, once
            self.inputs, h = [], x
            for layer in self.layers:
                self.inputs.append(h)
                h = layer(h)

    def losses(self, coords: torch.Tensor, mu: float) -> torch.Tensor:
        sizes = torch.tensor([p.numel() for _, p in self.owner])
        starts = torch.cumsum(sizes, 0) - sizes
        out = []
        with torch.no_grad():
            for c in coords.tolist():
                k = int(torch.searchsorted(starts, torch.tensor(c), right=True)) - 1
                layer_index, p = self.owner[k]
                flat = p.data.view(-1)
                flat[c - starts[k]] += mu
                h = self.inputs[layer_index]
                for layer in self.layers[layer_index:]:
                    h = layer(h)
                out.append(self.loss_fn(h, self.y))
                flat[c - starts[k]] -= mu
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
                ablation_coords: int = 128, mu: float = 5e-3, repeats: int = 15, seed: int = 0) -> dict:
    """One model: loop vs engine (+ ablations); returns a dict of rates, ratios and errors.

    Every ablation configuration, the full engine included, is timed on the same per-tensor
    sample of ``ablation_coords`` coordinates (chunk overheads weigh the same on all of them).
    """
    gen = torch.Generator().manual_seed(seed)
    base = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    theta = base.theta()
    loss0 = float(base.loss(theta))
    loop_sample = sample_coordinates(base, loop_coords, gen)
    engine_sample = sample_coordinates(base, engine_coords, gen)
    ablation_sample = sample_coordinates(base, ablation_coords, gen)

    with torch.no_grad():  # full forwards per second at the same batch: the median of many
        learner(x)
        forwards_per_s = 1 / statistics.median(_timed(lambda: learner(x))[1] for _ in range(repeats))

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
    losses, t_all = _timed(lambda: engine.coordinate_losses(theta, all_coords, mu))
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
    return {
        "model": name,
        "parameters": engine.dim,
        "batch": len(x),
        "dtype": str(theta.dtype).replace("torch.", ""),
        "forwards_per_s": forwards_per_s,
        "loop_coords_per_s": loop_rate,
        "engine_coords_per_s": engine_rate,
        "speedup_vs_loop": engine_rate / loop_rate,
        "coords_per_forward": engine_rate / forwards_per_s,
        "loop_coords_per_forward": loop_rate / forwards_per_s,
        "flops_per_forward": forward_flops,
        "engine_flops_per_coord": engine_flops / engine.dim,
        "loop_flops_per_coord": loop_flops / engine.dim,
        "flop_ceiling_coords_per_forward": forward_flops * engine.dim / max(engine_flops, 1),
        "flop_ratio_loop_to_engine": loop_flops / max(engine_flops, 1),
        "max_abs_diff": float((engine_grad[compared] - reference).abs().max()),
        "max_abs_grad": float(reference.abs().max()),
        "compared_coordinates": len(compared),
        "engine_seconds_all_coordinates": t_all,
        "per_tensor": [
            {"tensor": s.name, "numel": s.numel, "loop_coords_per_s": lr, "engine_coords_per_s": er}
            for s, lr, er in zip(engine.slots, loop_rates, engine_rates)
        ],
        "ablation": configs,
    }


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
    lines += ["", "| model | configuration | coords/s | speedup vs loop |", "|---|---|---|---|"]
    for r in results:
        for label, cfg in r["ablation"].items():
            lines.append(f"| {r['model']} | {label} | {cfg['coords_per_s']:.0f} | {cfg['speedup_vs_loop']:.1f}x |")
    return "\n".join(lines)


def run(batch: int = 256, loop_coords: int = 24, engine_coords: int = 0, ablation_coords: int = 128,
        tiny: bool = False, out_dir="runs/bench", seed: int = 0) -> dict:
    """Benchmark the MNIST-5k CNN and MLP; writes JSON and markdown under ``out_dir``."""
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
    report = {"benchmark": "coordinate estimates", "threads": torch.get_num_threads(), "results": results}
    report.update({k: results[0][k] for k in ("speedup_vs_loop", "coords_per_forward", "max_abs_diff")})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "engine.json", report)
        write_text(out / "engine.md", markdown(results) + "\n")
    return report


def _bench(args) -> int:
    report = run(batch=args.batch_size, loop_coords=args.loop_coords, engine_coords=args.engine_coords,
                 ablation_coords=args.ablation_coords, tiny=args.tiny, out_dir=args.out)
    print(json.dumps(report, indent=2) if args.json else markdown(report["results"]))
    print(f"wrote {args.out}/engine.json, engine.md", file=sys.stderr)
    return 0


def register(subparsers):
    """Add the ``bench`` subcommand."""
    p = add_command(subparsers, "bench", "coordinate-estimate throughput: engine vs the per-coordinate loop")
    p.add_argument("--batch-size", type=int, default=256, help="images per query")
    p.add_argument("--loop-coords", type=int, default=24,
                   help="coordinates per parameter tensor timed for the loop (0: all)")
    p.add_argument("--engine-coords", type=int, default=0,
                   help="coordinates per parameter tensor timed for the engine's per-tensor rates (0: all)")
    p.add_argument("--ablation-coords", type=int, default=128,
                   help="coordinates per parameter tensor timed for every ablation configuration (0: all)")
    p.add_argument("--tiny", action="store_true", help="small inputs (what the test suite runs)")
    p.add_argument("--out", default="runs/bench", help="where engine.json and engine.md go")
    add_json(p)
    p.set_defaults(func=_bench)
    return p


__all__ = ["ABLATIONS", "ReferenceLoop", "bench_model", "markdown", "register", "run"]
