"""The fast path: a learner's outputs at ``theta + mu e_i`` for many coordinates i at once.

``ModuleOracle`` talks only to ``FastPath`` (``front``). The performance model, one saving
per room:

- **Feature reuse** (``front``). The learner is traced once with ``torch.fx`` (``graph``); a
  base forward at theta keeps every node's value, until theta or the data batch change.
- **One-weight delta** (``delta``). A moved weight of a Linear, Conv2d or BatchNorm changes one
  unit or channel of that module's output by a known slice; the layer is never recomputed.
- **Delta propagation** (``delta``). Element-wise layers, pooling, per-channel BatchNorm,
  flattening, spatial slicing and constant padding (ResNet shortcut option A) keep the change
  inside that block, so only the block is computed per copy; the next Linear / Conv2d turns it
  into a dense change using only the block's weights. A residual sum keeps a Delta when the
  other branch is unchanged (its cached base is added) and adds a Delta to a stacked branch on
  its block only.
- **Stacked suffix** (``graph``, ``layers``). From there the rest of the network runs once on
  all P copies stacked as ``P * B`` rows; BatchNorm in train mode normalises each copy on its
  own, and parameters that differ per copy run as batched / grouped kernels. Stacked
  convolutions run channels-last, and a flatten into a Linear reads channels-last rows as they
  are (the Linear's weight permuted), never copying them to the contiguous layout.
- **Fused kernels** (``fused``). A change entering a Conv2d that a 2x2 max-pool (and maybe a
  ReLU) follows is convolved, pooled and rectified by one ``torch.compile``d kernel, where the
  work per copy pays (``DEEPZERO_ORACLE_COMPILE=0`` turns it off).
- **Chunk sizing** (``front.default_working_set``, ``graph.GraphForward.copies_within``). Per
  parameter tensor, chunks are sized by the cache: large enough to spread each chunk's fixed
  cost, and no larger while freed memory goes back to the OS.

Where the fast path cannot follow the learner, or its self-check disagrees, the generic path
(``torch.func.functional_call`` + ``vmap``) answers instead.
"""

from deepzero_oracle.fastpath.front import FastPath, Features, default_working_set
from deepzero_oracle.fastpath.graph import UnsupportedLearner
from deepzero_oracle.fastpath.layers import updates_running_stats

__all__ = ["FastPath", "Features", "UnsupportedLearner", "default_working_set", "updates_running_stats"]
