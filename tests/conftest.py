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
