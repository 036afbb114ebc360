"""deepzero-oracle: train neural networks in a loop with black boxes you can only query.

The engine's public API. Layers (imports point down): the command line and example apps
(``deepzero_oracle.apps``), the adapters and simulators (installed as
``deepzero_oracle.adapters`` / ``deepzero_oracle.simulators``), then this engine, which never
imports them.
"""

__version__ = "0.1.0"

from deepzero_oracle.allocator import retain_freed_memory
from deepzero_oracle.batches import SampledBatches, TensorBatches
from deepzero_oracle.blackbox import BlackBoxError, LocalBlackBox
from deepzero_oracle.errors import NonFiniteLossError, QueryBudgetExceeded, SettingsMismatch, TrainingDiverged
from deepzero_oracle.estimators import CGE, RGE, Autograd, Estimator
from deepzero_oracle.minimize import MinimizeResult, minimize
from deepzero_oracle.module_oracle import ModuleOracle
from deepzero_oracle.oracle import CallableOracle, LearnerOracle, Oracle, QueryLedger
from deepzero_oracle.parallel import ChunkError, InlineExecutor, ParallelOracle
from deepzero_oracle.pruning import MaskSchedule
from deepzero_oracle.stops import StopRequested
from deepzero_oracle.theta import assign_gradient
from deepzero_oracle.train import Callback, CSVLogger, StopTraining, TensorBoardLogger, Trainer

__all__ = [
    "Autograd",
    "BlackBoxError",
    "CGE",
    "CSVLogger",
    "CallableOracle",
    "Callback",
    "ChunkError",
    "Estimator",
    "InlineExecutor",
    "LearnerOracle",
    "LocalBlackBox",
    "MaskSchedule",
    "MinimizeResult",
    "ModuleOracle",
    "NonFiniteLossError",
    "Oracle",
    "ParallelOracle",
    "QueryBudgetExceeded",
    "QueryLedger",
    "RGE",
    "SampledBatches",
    "SettingsMismatch",
    "StopTraining",
    "StopRequested",
    "TensorBatches",
    "TensorBoardLogger",
    "Trainer",
    "TrainingDiverged",
    "assign_gradient",
    "minimize",
    "retain_freed_memory",
]
