"""Optional dependencies: which pip extra a feature needs, and a one-line error when it is missing.

The core install (``pip install deepzero-oracle``) holds the engine, the gRPC black box and
server and the command line. Everything else is an extra, imported only where it is used:

    from deepzero_oracle.extras import require

    uvicorn = require("rest", "uvicorn", feature="the REST endpoint (--http-port)")

A missing extra raises :class:`MissingExtra` (an ``ImportError``) whose message is one line
naming the command that installs it; the command line prints it and exits with code 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The extras and what each one is for (pyproject.toml lists their packages).
EXTRAS: dict[str, str] = {
    "rest": "the KServe v2 REST endpoint (serve --http-port) and REST client (kserve+http://)",
    "metrics": "the Prometheus endpoint of the server (serve --metrics-port)",
    "dask": "Dask executors (--executor dask-local:N, dask://HOST:PORT, tls://HOST:PORT)",
    "sim": "the built-in simulators (sol --scenario burgers, wake2d)",
    "apps": "the built-in datasets, plots and image folders of train, defense and sol",
    "tensorboard": "TensorBoardLogger",
    "peers": "gradient-free peers for benchmarks (nevergrad, cma, bayesian-optimization)",
}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'deepzero-oracle[EXTRA]'``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; one of {', '.join(EXTRAS)}")
    return f"pip install 'deepzero-oracle[{extra}]'"


class MissingExtra(ImportError):
    """A feature needs an extra that is not installed. The message is one line:
    ``missing the '<extra>' extra for <feature>: pip install 'deepzero-oracle[<extra>]' (no module <module>)``.

    Attributes:
        extra: the extra to install.
        name: the module that failed to import (as ``ImportError.name``).
    """

    def __init__(self, extra: str, module: str, feature: str | None = None):
        self.extra = extra
        what = feature or EXTRAS[extra]
        super().__init__(f"missing the '{extra}' extra for {what}: {install_hint(extra)} (no module {module})",
                         name=module)


def require(extra: str, module: str, *more: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` (and the modules in ``more``) and return ``module``.

    Args:
        extra: the extra that installs them (a key of :data:`EXTRAS`).
        module: dotted module name, e.g. ``"sklearn.datasets"``.
        more: other modules the feature needs from the same extra (imported, not returned).
        feature: what needs them, for the message (default: the extra's description).
    Raises:
        MissingExtra: one of the modules cannot be imported.
    """
    install_hint(extra)  # an unknown extra is a bug here, not a missing install
    first = None
    for name in (module, *more):
        try:
            imported = importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtra(extra, exc.name or name, feature) from exc
        first = first or imported
    return first


def available(module: str) -> bool:
    """Whether ``module`` imports (for features that are skipped, not refused, without it)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


__all__ = ["EXTRAS", "MissingExtra", "available", "install_hint", "require"]
