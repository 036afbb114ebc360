"""Engine benchmarks (``deepzero-oracle bench``, ``make bench``): our engine against DeepZero's
reference loop and its released ``cge``, timed side by side in one run.

- ``timing``: the two baselines and the measuring tools (time, FLOPs, matmul rate, peak memory).
- ``coordinates``: every coordinate of the MNIST-5k CNN and MLP, with an ablation (``run``).
- ``resnet``: one sparse CGE step of ResNet-8/20, and its per-layer profile (``run_sparse``,
  ``run_profile``).
- ``command``: the ``bench`` subcommand (``register``).
"""

from .command import register
from .coordinates import ABLATIONS, bench_model, markdown, run
from .resnet import (SparseStep, markdown_profile, markdown_sparse, profile_sparse_step, run_profile, run_sparse,
                     sparse_step_bench)
from .timing import CoordinateLocator, ReferenceLoop, ReleasedCGE, matmul_gflops, peak_rss_mb

__all__ = ["ABLATIONS", "CoordinateLocator", "ReferenceLoop", "ReleasedCGE", "SparseStep", "bench_model", "markdown",
           "markdown_profile", "markdown_sparse", "matmul_gflops", "peak_rss_mb", "profile_sparse_step", "register",
           "run", "run_profile", "run_sparse", "sparse_step_bench"]
