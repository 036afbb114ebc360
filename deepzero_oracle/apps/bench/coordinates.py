"""Coordinate-estimate throughput on the MNIST-5k CNN and MLP: our engine against the
reference loop, side by side (``run``; ``deepzero-oracle bench``).

The reference method (DeepZero's implementation) loops over coordinates in Python: perturb one
weight in place, run the layers from the perturbed one on from cached features, restore. We
time it and our ``ModuleOracle`` on the same coordinates, batch and dtype, in one run, and
report ratios (absolute times mean little on a shared machine).

Per parameter tensor, each method is timed on a sample of coordinates; the time for all
coordinates is the sum over tensors of ``numel / rate`` (``--loop-coords 0`` times the loop on
every coordinate instead). The engine is also timed directly on all coordinates.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle.allocator import retain_freed_memory
from deepzero_oracle.module_oracle import ModuleOracle

from deepzero_oracle.common.datasets import load_dataset
from deepzero_oracle.common.models import cnn, mlp

from .timing import (ReferenceLoop, counted_flops, estimated_seconds, matmul_gflops, sample_coordinates, timed,
                     write_report)

ABLATIONS = {
    "engine": {},
    "no fused kernels": {"fused_kernels": False},
    "no delta propagation": {"delta_propagation": False},
    "no one-weight delta": {"one_weight_delta": False, "delta_propagation": False},
    "no feature reuse": {"fast": False},
}


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
            return statistics.median(timed(lambda: learner(x))[1] for _ in range(repeats))

    forward_seconds()  # warm-up
    loop = ReferenceLoop(learner, F.cross_entropy, x, y)
    loop_rates, loop_grads = [], []
    for coords in loop_sample:
        losses, t = timed(lambda: loop.losses(coords, mu))
        loop_rates.append(len(coords) / t)
        loop_grads.append((losses - loss0) / mu)

    def rates_on(oracle, sample):
        rates = []
        for coords in sample:
            _, t = timed(lambda: oracle.coordinate_losses(theta, coords, mu))
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
        losses, t = timed(lambda: engine.coordinate_losses(theta, all_coords, mu))
        all_times.append(t)
    t_all, forwards_per_s = statistics.median(all_times), 1 / statistics.median(forward_times)
    engine_grad = (losses - loss0) / mu
    # arithmetic, not time: what the rates would be if every method ran at the forward's FLOP/s
    forward_flops = counted_flops(lambda: learner(x))
    # counted on the library-op path: the fused kernel's multiply-adds are element-wise ops the
    # counter does not see (it does the same products, on the pooled positions only)
    unfused = ModuleOracle(learner, F.cross_entropy, fused_kernels=False).bind(x, y)
    engine_flops = counted_flops(lambda: unfused.coordinate_losses(theta, all_coords, mu))
    loop_flops = sum(s.numel * counted_flops(lambda: loop.losses(c[:1], mu)) for s, c in zip(engine.slots, loop_sample))
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
    write_report(report, markdown(results), out_dir, "engine", {})
    return report


__all__ = ["ABLATIONS", "bench_model", "markdown", "run"]
