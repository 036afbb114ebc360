"""Training across the wire: a digits classifier whose output head is a served black box
follows the same trajectory (same seed) as with the same function in-process."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepzero_oracle.blackbox import GrpcBlackBox, LocalBlackBox
from support.grpcbb_functions import digits_head
from support.grpcbb_helpers import start_server

from deepzero_oracle import CGE, ModuleOracle, TensorBatches, Trainer  # noqa: E402
from deepzero_oracle.common.datasets import load_dataset  # noqa: E402
from deepzero_oracle.common.models import mlp  # noqa: E402


def _train(blackbox, x, y, x_test, y_test):
    torch.manual_seed(0)
    learner = mlp((1, 8, 8), 10, hidden=(8,))  # 610 parameters: 611 queries per CGE step
    oracle = ModuleOracle(learner, F.cross_entropy, blackbox=blackbox)
    opt = torch.optim.SGD(learner.parameters(), lr=0.5, momentum=0.9)

    def evaluate(model):
        logits = blackbox(model(x_test))
        return {"test_loss": float(F.cross_entropy(torch.as_tensor(logits), y_test)),
                "test_accuracy": float((model(x_test).argmax(1) == y_test).float().mean())}

    trainer = Trainer(oracle, CGE(mu=5e-3), opt, evaluate=evaluate, seed=0, progress=False)
    history = trainer.fit(TensorBatches(x, y, batch_size=32), epochs=2)
    params = torch.cat([p.detach().reshape(-1) for p in learner.parameters()])
    return params, history, oracle.queries


def test_served_head_gives_the_same_trajectory_as_in_process():
    data = load_dataset("digits")
    x, y = data.x_train[:128], data.y_train[:128]
    x_test, y_test = data.x_test[:200], data.y_test[:200]
    local = _train(LocalBlackBox(digits_head), x, y, x_test, y_test)
    server = start_server()
    try:
        with GrpcBlackBox(server.address, model="digits_head", timeout=60) as box:
            remote = _train(box, x, y, x_test, y_test)
            assert box.calls > 0 and box.rows > 0
    finally:
        server.stop()
    assert local[2] == remote[2]  # same number of queries
    strip = lambda h: [{k: v for k, v in m.items() if k != "seconds"} for m in h]  # noqa: E731
    assert strip(local[1]) == strip(remote[1])  # same losses and accuracies, epoch by epoch
    assert torch.equal(local[0], remote[0])  # bit-identical parameters
    assert local[1][-1]["test_loss"] < local[1][0]["test_loss"]  # and it did learn something
