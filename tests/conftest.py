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
