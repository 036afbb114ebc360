"""The public fan-out helpers of deepzero_oracle.parallel: ``map_ordered`` (results in order,
bounded work in flight, shared values shipped once, unshippable ones refused before any work)
and worker-side counters (work counted on worker copies reaches the wrapped oracle exactly once).
"""

import concurrent.futures as cf
import math
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CallableOracle, ModuleOracle
from deepzero_oracle.errors import NotShippable
from deepzero_oracle.parallel import InlineExecutor, ParallelOracle, map_ordered, open_executor

# -- shipped to workers: module level, so they pickle ---------------------------------------------


def scaled(factor, offset, x):
    """``factor * x + offset``: ``factor`` is the shared value, ``(offset, x)`` the item."""
    return factor * x + offset


def row_sum(table, x):
    """The sum of ``x`` plus the number of rows of the shared ``table``."""
    return float(x.sum()) + len(table)


def square_norm(theta):
    return (theta ** 2).sum()


class CountingOracle(CallableOracle):
    """A CallableOracle that counts its evaluated rows and its evaluation calls (blocks)."""

    def __init__(self, dim):
        super().__init__(square_norm, dim)
        self.rows = self.calls = 0

    def evaluate_losses(self, thetas):
        self.rows += len(thetas)
        self.calls += 1
        return super().evaluate_losses(thetas)

    def counters(self):
        return {"rows": self.rows, "calls": self.calls}

    def add_counters(self, counts):
        self.rows += counts.get("rows", 0)
        self.calls += counts.get("calls", 0)


class CountingBox:
    """A black box after a module (identity) that counts the images sent to it."""

    def __init__(self):
        self.images = 0

    def __call__(self, x):
        self.images += int(x.shape[0])
        return x

    def counters(self):
        return {"images": self.images}

    def add_counters(self, counts):
        self.images += counts.get("images", 0)


class UncountedAdd(CountingOracle):
    """Counts its work but cannot take worker copies' counts back."""

    add_counters = None


@pytest.fixture(scope="module")
def processes():
    with open_executor("processes:2") as pool:
        yield pool


# -- map_ordered ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["inline", "threads", "processes"])
def test_map_ordered_yields_in_order_with_the_shared_value(kind, request):
    items = [(float(i), torch.arange(3.0) + i) for i in range(9)]
    expected = [scaled(2.0, *item) for item in items]
    if kind == "inline":
        got = list(map_ordered(scaled, items, InlineExecutor(), shared=(2.0,)))
    elif kind == "threads":
        with cf.ThreadPoolExecutor(2) as pool:
            got = list(map_ordered(scaled, items, pool, shared=(2.0,), window=3))
    else:
        got = list(map_ordered(scaled, items, request.getfixturevalue("processes"), shared=(2.0,)))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_map_ordered_keeps_at_most_window_tasks_in_flight():
    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield (torch.full((2,), float(i)),)

    with cf.ThreadPoolExecutor(2) as pool:
        for k, value in enumerate(map_ordered(row_sum, items(), pool, shared=([1, 2],), window=3)):
            assert value == 2 * k + 2
            # result k is in hand: at most k + 1 done plus `window` submitted behind it
            assert len(pulled) <= k + 1 + 3
    assert len(pulled) == 20


def test_map_ordered_ships_a_row_at_its_own_size(request):
    big = torch.arange(4000.0).reshape(1000, 4)
    got = list(map_ordered(row_sum, ((big[i],) for i in range(3)), request.getfixturevalue("processes"),
                           shared=([0],)))
    assert got == [float(big[i].sum()) + 1 for i in range(3)]


def test_map_ordered_refuses_an_unshippable_shared_value_before_any_task():
    ran = []
    lock = threading.Lock()  # does not pickle
    with cf.ThreadPoolExecutor(2) as pool:
        answers = map_ordered(row_sum, ((ran.append(i) or torch.ones(1),) for i in range(3)), pool,
                              shared=(lock,))
        with pytest.raises(NotShippable, match="does not pickle"):
            next(answers)
    assert ran == []


def test_map_ordered_raises_a_task_error_when_reached():
    with cf.ThreadPoolExecutor(2) as pool:
        answers = map_ordered(row_sum, [(torch.ones(2),), (None,)], pool, shared=([0],))
        assert next(answers) == 3.0  # 2 + one row in the table
        with pytest.raises(AttributeError):
            next(answers)


def test_map_ordered_rejects_an_empty_window():
    with cf.ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="window"):
        next(map_ordered(row_sum, [(torch.ones(1),)], pool, window=0))


# -- worker-side counters ------------------------------------------------------------------------


def _coordinate_request(oracle):
    theta = torch.linspace(-1, 1, oracle.dim)
    return oracle.coordinate_losses(theta, torch.arange(oracle.dim), 1e-3)


@pytest.mark.parametrize("kind", ["inline", "threads", "processes"])
def test_worker_counts_reach_the_wrapped_oracle_once(kind, request):
    dim, block = 50, 8
    reference = CountingOracle(dim)
    expected = _coordinate_request(reference)
    inner = CountingOracle(dim)
    executor = {"inline": InlineExecutor(), "threads": None, "processes": None}[kind]
    pool = cf.ThreadPoolExecutor(2) if kind == "threads" else None
    if kind == "processes":
        executor = request.getfixturevalue("processes")
    elif kind == "threads":
        executor = pool
    try:
        with ParallelOracle(inner, executor, block=block, chunk_size=16) as parallel:
            assert torch.equal(_coordinate_request(parallel), expected)
            assert parallel.queries == dim
    finally:
        if pool is not None:
            pool.shutdown()
    blocks = math.ceil(dim / block)
    assert inner.counters() == {"rows": dim, "calls": blocks}
    # inline the wrapped oracle counts itself (nothing travels): nothing is added twice
    assert parallel.worker_counters == ({} if kind == "inline" else {"rows": dim, "calls": blocks})
    assert inner.state_dict()["queries"] == 0  # queries stay with the wrapper


def test_worker_counts_reach_a_counting_black_box():
    torch.manual_seed(0)
    x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
    counts = {}
    for name in ("inline", "threads"):
        box = CountingBox()
        oracle = ModuleOracle(nn.Linear(4, 3), F.cross_entropy, blackbox=box).bind(x, y)
        with cf.ThreadPoolExecutor(2) as pool, ParallelOracle(oracle, pool if name == "threads" else None,
                                                              chunk_size=5) as parallel:
            parallel.coordinate_losses(parallel.theta(), torch.arange(parallel.dim), 1e-3)
        counts[name] = box.images
    assert counts["threads"] == counts["inline"] > 0


def test_counts_without_add_counters_fail_before_any_work():
    with pytest.raises(TypeError, match="no add_counters"):
        ParallelOracle(UncountedAdd(6))
