"""Train a small classifier using only loss queries (the README's 20-line example)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, ModuleOracle, assign_gradient
from deepzero_oracle.apps.datasets import load_dataset

data = load_dataset("digits")
learner = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
oracle = ModuleOracle(learner, F.cross_entropy)  # theta -> loss; counts queries
optimizer = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)
estimator = CGE(mu=5e-3)  # coordinate-wise forward differences: d + 1 queries

for step in range(150):
    idx = torch.randint(len(data.x_train), (64,))
    oracle.bind(data.x_train[idx], data.y_train[idx])
    grad = estimator.estimate(oracle, oracle.theta())  # no back-propagation anywhere
    assign_gradient(learner.parameters(), grad)  # into param.grad
    optimizer.step()

accuracy = (learner(data.x_test).argmax(1) == data.y_test).float().mean()
print(f"test accuracy {accuracy:.3f} after {oracle.queries:,} queries")
