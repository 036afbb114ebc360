"""Minimise a plain NumPy function you can only evaluate (the README's example).

Needs only the core install (``pip install deepzero-oracle``): ``minimize`` estimates gradients
from values of ``f`` alone (CGE, d + 1 calls per step) and steps with Adam.
"""
import numpy as np

from deepzero_oracle import minimize

TARGET = np.linspace(-1, 1, 8)


def f(x: np.ndarray) -> float:  # e.g. a simulation's error for parameters x
    return float(np.sum((x - TARGET) ** 2))


result = minimize(f, np.zeros(8), max_queries=2_000)  # CGE + Adam; at most 2,000 calls of f
print(result.x, result.fun)  # the best point found and its value
print(result.queries, result.history[-1])  # calls spent; one record per step: step, queries, loss
assert result.queries <= 2_000 and result.fun < 1e-3 * f(np.zeros(8)), "minimize did not converge"
