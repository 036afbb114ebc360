"""Train a small classifier using only loss queries (the README's twenty lines)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, ModuleOracle, TensorBatches, Trainer
from deepzero_oracle.common.datasets import load_dataset

data = load_dataset("digits")  # 8x8 images that ship with scikit-learn
learner = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
oracle = ModuleOracle(learner, F.cross_entropy)  # theta -> loss on a bound batch; counts queries
optimizer = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)
trainer = Trainer(oracle, CGE(mu=5e-3), optimizer, out_dir="runs/quickstart")  # checkpoints, resume
trainer.fit(TensorBatches(data.x_train, data.y_train, batch_size=64), epochs=3)

with torch.no_grad():
    accuracy = (learner(data.x_test).argmax(1) == data.y_test).float().mean()
print(f"test accuracy {accuracy:.3f} after {oracle.queries:,} queries")
