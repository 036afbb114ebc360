"""Black boxes: things that may only be queried, arrays in and arrays out.

A black box is any callable ``f(inputs) -> outputs`` on a batch: ``inputs`` is an array
shaped ``[N, *in_shape]`` (a ``torch.Tensor`` or ``numpy.ndarray``) and ``outputs`` an array
shaped ``[N, *out_shape]`` of either kind. Rows are independent. Local callables, gRPC
servers and remote model APIs all follow the same contract and raise the same errors.
"""

from deepzero_oracle.blackbox.local import BlackBoxError, LocalBlackBox, as_tensor

__all__ = ["BlackBoxError", "LocalBlackBox", "as_tensor"]
