"""Serve a scenario's source solver over gRPC (loopback by default) for ZO-SOL's ``--solver grpc://``."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["serve_source_solver"]


def serve_source_solver(scenario, *, host: str = "127.0.0.1", port: int = 0, threads: int = 1):
    """Start an embedded gRPC server whose model is ``scenario.source_step``.

    Args:
        scenario: a `deepzero_oracle.simulators.Scenario`.
        host, port: where to listen (port 0: a free port; read ``server.port`` / ``server.address``).
        threads: torch threads in the serving thread. torch's thread setting is per thread, so without
            this the server's worker thread may use another count than the caller, which changes
            floating-point reduction order (results then differ from in-process runs in the last bits).
    Returns:
        The started `OracleServer` (``.address``, ``.stop()``; a context manager). Inputs
        ``state [N, C, H, W]`` and ``params [N, K]`` (float64); a ValueError of the solver (wrong shape,
        NaN) reaches the client as INVALID_ARGUMENT.
    """
    from deepzero_oracle.server import serve_blackbox

    def source_step(state, params):
        if threads:
            torch.set_num_threads(threads)
        return np.asarray(scenario.source_step(state, params))

    return serve_blackbox(source_step, host=host, port=port, numpy=True,
                          model_name=f"{scenario.name}_source_step")
