"""Shared fixtures: tests run in float64 where they compare against autograd."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
