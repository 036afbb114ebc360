"""The query benchmark's methods: the engine's estimators under the Trainer, and two general
black-box optimizers a user might reach for instead (CMA-ES from ``cma``, nevergrad's NGOpt).

Every method spends exactly the task's budget of oracle queries (the oracle's ledger counts them)
and records the test error at each eighth of the budget (`run_method`). The peers get the
evaluations a user would give them: a whole CMA-ES generation, or 32 NGOpt candidates, in one
batched oracle call on one batch of data (so candidates of a call compare on the same data).
The peers' initial step size is ``Method.sigma`` (0.02, the scale of the models' weight changes).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch

from deepzero_oracle import CGE, RGE, Callback

__all__ = ["FULL_CMA_MAX_DIM", "Method", "PEER_BATCH", "methods_for", "run_method"]

PEER_BATCH = 32  # NGOpt candidates per batched call
FULL_CMA_MAX_DIM = 1000  # CMA-ES with a full covariance up to this many parameters


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to spend the queries.

    Attributes:
        name: row label; family: "cge", "rge", "cma" or "ngopt".
        sparsity: CGE's share of coordinates left out per step; pruner: how the per-layer shares
            are set ("uniform", or "zo-grasp" scores whose queries count against the budget).
        q, distribution, antithetic: RGE's directions.
        warmup: share of the steps spent warming the learning rate up linearly.
        windows: SOL windows per query (0: the recipe's 4); more windows average the loss of a
            query over more of the data at no extra queries.
        sigma: the peers' initial step size in parameter units.
    """

    name: str
    family: str
    sparsity: float = 0.0
    pruner: str = "uniform"
    q: int = 16
    distribution: str = "gaussian"
    antithetic: bool = False
    warmup: float = 0.0
    windows: int = 0
    sigma: float = 0.02

    @property
    def peer(self) -> bool:
        return self.family in ("cma", "ngopt")

    def estimator_for(self, mu: float):
        """The engine's estimator of a ZO method."""
        if self.family == "rge":
            return RGE(q=self.q, mu=mu, distribution=self.distribution, antithetic=self.antithetic)
        return CGE(mu=mu)

    def sol_fields(self) -> dict:
        """The method as `SOLConfig` fields (ZO-SOL's recipe)."""
        fields = {"estimator": self.family, "sparsity": self.sparsity, "q": self.q,
                  "distribution": self.distribution, "antithetic": self.antithetic}
        return {**fields, "batch_size": self.windows} if self.windows else fields


def methods_for(kind: str) -> list[Method]:
    """The methods run on a task of ``kind`` ("sol" or "classifier"); the first is the default."""
    if kind == "sol":  # the CLI's default (95% sparse CGE), then the former 80% with two stability variants
        former = Method("cge-sparse", "cge", sparsity=0.8)
        default = Method("cge-sparse-95", "cge", sparsity=0.95)
        variants = [former, dataclasses.replace(former, name="cge-sparse+warmup", warmup=0.1),
                    dataclasses.replace(former, name="cge-sparse+8windows", windows=8)]
    else:  # `train --estimator cge`'s default: 90% sparse with ZO-GraSP shares; dense and 99% beside it
        default = Method("cge-sparse", "cge", sparsity=0.9, pruner="zo-grasp")
        variants = [Method("cge-dense", "cge"), Method("cge-sparse-99", "cge", sparsity=0.99, pruner="zo-grasp")]
    rge = [Method(f"rge-{q}", "rge", q=q) for q in (4, 16, 64)]
    rge += [Method("rge-16-sphere", "rge", distribution="sphere"), Method("rge-16-antithetic", "rge", antithetic=True)]
    dense = [Method("cge-dense", "cge")] if kind == "sol" else []
    peers = [Method("cma-es", "cma"), Method("ngopt", "ngopt")]
    if kind == "sol":  # CMA-ES's step size: a quarter, five times and fifty times the peers' 0.02
        peers += [Method(f"cma-es-s{sigma:g}", "cma", sigma=sigma) for sigma in (0.005, 0.1, 1.0)]
    return [default, *variants, *dense, *rge, *peers]


class _Marks(Callback):
    """Records ``(queries, error)`` each time the queries pass the next mark."""

    def __init__(self, marks: list[int], error: Callable[[], float]):
        self.marks, self.error, self.curve = list(marks), error, []

    def passed(self, queries: int) -> None:
        while self.marks and queries >= self.marks[0]:
            self.curve.append({"mark": self.marks.pop(0), "queries": int(queries), "error": self.error()})

    def on_step_end(self, trainer, metrics) -> None:
        self.passed(metrics["queries"])

    def finish(self, queries: int) -> list[dict]:
        """The marks the budget's last partial step could not reach get the final state."""
        error = self.error() if self.marks else None
        self.curve += [{"mark": m, "queries": int(queries), "error": error} for m in self.marks]
        self.marks = []
        return self.curve


def run_method(problem, method: Method, budget: int, seed: int, points: int = 8) -> dict:
    """Spend ``budget`` queries of ``problem``'s oracle on ``method``.

    Returns ``{"method", "seed", "queries", "seconds", "curve": [{"mark", "queries", "error"}]}``
    (``error`` at each ``k / points`` of the budget, the last one the final test error) and
    ``"initial"`` (the error before any query).
    """
    marks = [budget * k // points for k in range(1, points + 1)]
    started = time.perf_counter()
    if method.peer:
        initial, curve, queries = _run_peer(problem, method, budget, seed, marks)
    else:
        trainer, batches = problem.trainer(method, budget)
        learner = trainer.oracle.learner
        initial = problem.test_error(learner)
        record = _Marks(marks, lambda: problem.test_error(learner))
        trainer.callbacks.append(record)
        trainer.fit(batches, max_queries=budget, max_steps=10**9, handle_signals=False)
        queries = trainer.oracle.queries
        curve = record.finish(queries)
    return {"method": method.name, "seed": seed, "queries": int(queries), "initial": initial,
            "seconds": round(time.perf_counter() - started, 1), "curve": curve}


def _run_peer(problem, method: Method, budget: int, seed: int, marks: list[int]):
    oracle = problem.oracle
    theta0 = oracle.theta().detach()
    peer = (_CMA if method.family == "cma" else _NGOpt)(theta0.double().numpy(), method.sigma, budget, seed)
    record = _Marks(marks, lambda: problem.test_error(oracle.learner))
    initial = problem.test_error(oracle.learner)
    batches = iter(problem.batches)

    def show(x):
        oracle.set_theta(torch.as_tensor(x, dtype=theta0.dtype))

    while True:
        candidates = peer.ask(budget - oracle.queries)
        if not candidates:
            break
        oracle.bind(*next(batches))
        values = oracle.losses(torch.as_tensor(np.stack(candidates), dtype=theta0.dtype))
        # a candidate whose rollout blew up is simply very bad
        peer.tell(candidates, torch.nan_to_num(values.double(), nan=1e30, posinf=1e30).tolist())
        if record.marks and oracle.queries >= record.marks[0]:
            show(peer.current())
            record.passed(oracle.queries)
    show(peer.current())
    return initial, record.finish(oracle.queries), oracle.queries


class _CMA:
    """CMA-ES (``cma``): one generation per call; its mean is the current answer. Above
    `FULL_CMA_MAX_DIM` parameters the covariance is diagonal (sep-CMA), as practitioners run it in
    high dimension: a full one costs d^2 memory and an O(d^3) eigendecomposition every few
    generations."""

    def __init__(self, x0, sigma, budget, seed):
        import cma

        self.es = cma.CMAEvolutionStrategy(x0, sigma, {"seed": seed + 1, "verbose": -9, "maxfevals": budget,
                                                       "CMA_diagonal": len(x0) > FULL_CMA_MAX_DIM})

    def ask(self, room: int):
        return self.es.ask() if self.es.popsize <= room else []

    def tell(self, xs, fs):
        self.es.tell(xs, fs)

    def current(self):
        return self.es.mean


class _NGOpt:
    """nevergrad's NGOpt on an array started at theta0 with step ``sigma``, told as it asks."""

    def __init__(self, x0, sigma, budget, seed):
        import nevergrad as ng

        param = ng.p.Array(init=x0).set_mutation(sigma=sigma)
        param.random_state = np.random.RandomState(seed)
        self.opt = ng.optimizers.NGOpt(parametrization=param, budget=budget, num_workers=1)
        self.asked = []

    def ask(self, room: int):
        self.asked = [self.opt.ask() for _ in range(min(PEER_BATCH, room))]
        return [c.value for c in self.asked]

    def tell(self, xs, fs):
        for c, f in zip(self.asked, fs):
            self.opt.tell(c, f if math.isfinite(f) else 1e30)

    def current(self):
        return self.opt.provide_recommendation().value
