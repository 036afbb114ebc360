"""Quality per query: the engine's estimators against general black-box optimizers at equal
query budgets (``deepzero-oracle bench --queries``, ``make bench``).

- ``tasks``: the black boxes (SOL on burgers and on examples/own_solver, the digits and MNIST-5k CNNs).
- ``methods``: dense and sparse CGE, RGE (q = 4, 16, 64; Gaussian, sphere, antithetic), stability
  variants of the default, and the peers CMA-ES (``cma``) and nevergrad's NGOpt (the ``[peers]`` extra).
- ``run``: every (task, method, seed) once, records kept as they finish (`run_benchmark`).
- ``report``: tables, paired tests and curves from the records (`report`).
"""

from .report import markdown, report
from .run import bench_queries, run_benchmark

__all__ = ["bench_queries", "markdown", "report", "run_benchmark"]
