"""The engine computes on theta's device and in theta's dtype: no tensor on the query path is
made on a default device or dtype. Here only the CPU exists, so the device is checked by
watching torch's tensor factories during a training step; the dtype by running float32 and
float64 learners."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from deepzero_oracle import CGE, RGE, ModuleOracle
from deepzero_oracle.common.models import cnn, resnet

FACTORIES = ("arange", "empty", "zeros", "ones", "full", "tensor", "eye", "rand", "randn", "randint", "linspace")
# modules that make index tensors or random recipes on the CPU by design: PyTorch indexes a
# tensor on any device with CPU indices, and directions are drawn on the CPU so that every
# device (and every worker) draws the same ones
CPU_BY_DESIGN = ("deepzero_oracle.estimators.base", "deepzero_oracle.estimators.directions")


def learners():
    return {"resnet": resnet((3, 8, 8), 10, 1, widths=(4, 8, 8)), "cnn": cnn((3, 8, 8), 10, channels=(4, 4))}


@pytest.mark.parametrize("name", list(learners()))
def test_query_path_makes_every_tensor_on_a_given_device(name, monkeypatch):
    undeviced = []

    def watch(factory):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if (caller.startswith("deepzero_oracle") and not caller.startswith(CPU_BY_DESIGN)
                    and "device" not in kwargs):
                undeviced.append(f"{caller}: torch.{factory.__name__}")
            return factory(*args, **kwargs)
        wrapped.__name__ = factory.__name__
        return wrapped

    learner = learners()[name].train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
    for factory in FACTORIES:
        monkeypatch.setattr(torch, factory, watch(getattr(torch, factory)))
    theta = oracle.theta()
    mask = torch.rand(oracle.dim, generator=torch.Generator().manual_seed(0)) < 0.05
    CGE(mu=5e-3).estimate(oracle, theta, mask)
    CGE(mu=5e-3, joint=True).estimate(oracle, theta, mask)
    RGE(q=3, mu=5e-3).estimate(oracle, theta)
    assert oracle.fallback_reason is None
    assert not undeviced, sorted(set(undeviced))


@pytest.mark.parametrize("name", list(learners()))
def test_estimates_keep_thetas_dtype(name):
    x, y = torch.rand(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    grads, model = {}, learners()[name].train()
    for dtype in (torch.float32, torch.float64):
        learner = copy.deepcopy(model).to(dtype)
        oracle = ModuleOracle(learner, F.cross_entropy).bind(x, y)
        theta = oracle.theta()
        assert theta.dtype == dtype
        mask = torch.zeros(oracle.dim, dtype=torch.bool)
        mask[::7] = True
        assert oracle.coordinate_losses(theta, mask.nonzero().reshape(-1), 1e-2).dtype == dtype
        grads[dtype] = CGE(mu=1e-2).estimate(oracle, theta, mask)
        assert grads[dtype].dtype == dtype and oracle.fallback_reason is None
    assert torch.allclose(grads[torch.float32].double(), grads[torch.float64], atol=2e-3)
