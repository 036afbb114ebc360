"""Shared fixtures: tests run in float64 where they compare against autograd."""

import os

import pytest
import torch


def pytest_configure(config):
    # Under pytest-xdist each worker is one of several processes sharing the cores: torch's own
    # intra-op threads on top would oversubscribe them.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionstart(session):
    # the suite's many small layer shapes would each compile a fused kernel (seconds of C++
    # apiece on a cold cache); past dynamo's default eight per kernel they run the same
    # expression uncompiled, with the same results
    from deepzero_oracle.fastpath import fused

    fused.kernels.recompile_limit = 8


# files whose tests each take several seconds (server subprocesses, worker restarts): they run
# first, so that neither pytest-xdist worker is left with one of them alone at the end
LONG_FIRST = ("tests/serving/test_replicas.py", "tests/parallel/test_dask_faults.py",
              "tests/serving/test_serve_cli_errors.py", "tests/engine/test_safe_stops.py",
              "tests/parallel/test_executors.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONG_FIRST)  # stable: the rest keep their order
