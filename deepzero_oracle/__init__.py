"""deepzero-oracle: train neural networks in a loop with black boxes you can only query."""

from deepzero_oracle.blackbox import BlackBoxError, LocalBlackBox
from deepzero_oracle.errors import NonFiniteLossError, QueryBudgetExceeded
from deepzero_oracle.estimators import CGE, RGE, Autograd, Estimator
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.oracle import CallableOracle, LearnerOracle, Oracle, QueryLedger
from deepzero_oracle.parallel import ChunkError, InlineExecutor, ParallelOracle
from deepzero_oracle.pruning import MaskSchedule
from deepzero_oracle.theta import assign_gradient
from deepzero_oracle.train import Callback, CSVLogger, Trainer

__version__ = "0.1.0"

__all__ = [
    "Autograd",
    "CSVLogger",
    "Callback",
    "MaskSchedule",
    "Trainer",
    "assign_gradient",
    "BlackBoxError",
    "CGE",
    "CallableOracle",
    "ChunkError",
    "InlineExecutor",
    "Estimator",
    "LocalBlackBox",
    "ModuleOracle",
    "NonFiniteLossError",
    "Oracle",
    "ParallelOracle",
    "QueryBudgetExceeded",
    "RGE",
]
