"""One string names a black box, the same way for every command that takes one
(``--solver``, ``--classifier``):

    grpc://HOST:PORT[/MODEL]          our server, or any KServe v2 gRPC server (GrpcBlackBox)
    kserve://HOST:PORT/MODEL          KServe v2 over gRPC (KServeBlackBox)
    kserve+http://HOST:PORT/MODEL     KServe v2 over REST (KServeBlackBox, protocol="rest")
    MODULE:FUNCTION                   a Python function, called in this process (LocalBlackBox)

With TLS: ``grpcs://``, ``kserves://`` and ``kserve+https://``; the server's certificate is
checked against the system's roots, or against the CA certificate (PEM) that
``$DEEPZERO_ORACLE_TLS_CA`` names (a self-signed server: its own certificate).

Replicas of one remote black box are several specs joined by commas, all with the same scheme
and model: ``grpc://h1:p1,grpc://h2:p2`` (calls are spread over them and a failed or stalled
replica's call goes to another; see :mod:`deepzero_oracle.blackbox.grpc`).

``open_blackbox(spec)`` returns the black box, a context manager that closes its connection.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Mapping

from deepzero_oracle.blackbox.local import LocalBlackBox

SPEC_FORMS = ("grpc[s]://HOST:PORT[/MODEL]", "kserve[s]://HOST:PORT/MODEL", "kserve+http[s]://HOST:PORT/MODEL",
              "MODULE:FUNCTION")
# scheme -> (kind, TLS)
_SCHEMES = {"grpc": ("grpc", False), "grpcs": ("grpc", True), "kserve": ("kserve", False),
            "kserves": ("kserve", True), "kserve+http": ("kserve+http", False), "kserve+https": ("kserve+http", True)}
TLS_CA_ENV = "DEEPZERO_ORACLE_TLS_CA"


@dataclass(frozen=True)
class BlackBoxSpec:
    """A parsed black-box spec.

    Attributes:
        kind: "grpc", "kserve", "kserve+http" or "python".
        target: ``host:port`` for remote kinds (``h1:p1,h2:p2`` for replicas), the module for
            "python".
        name: the model name ("" for our server's only model) or the function's attribute path.
        tls: the connection is TLS (``grpcs://``, ``kserves://``, ``kserve+https://``).
    """

    kind: str
    target: str
    name: str
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> "BlackBoxSpec":
        """Parse one of ``SPEC_FORMS``; a ValueError lists them when ``text`` is none of them."""
        text = str(text).strip()
        if "," in text:
            return cls._parse_replicas(text)
        scheme, sep, rest = text.partition("://")
        if sep:
            if scheme not in _SCHEMES:
                raise ValueError(f"{text!r}: unknown scheme {scheme!r}; {_forms()}")
            target, _, name = rest.partition("/")
            if not _is_host_port(target):
                raise ValueError(f"{text!r}: expected HOST:PORT after {scheme}://; {_forms()}")
            kind, tls = _SCHEMES[scheme]
            if kind != "grpc" and not name:
                raise ValueError(f"{text!r}: a KServe spec names its model: {scheme}://HOST:PORT/MODEL")
            return cls(kind, target, name, tls)
        module, sep, attr = text.partition(":")
        if not sep or not module or not attr or "/" in text:
            raise ValueError(f"{text!r} is not a black-box spec; {_forms()}")
        return cls("python", module, attr)

    @classmethod
    def _parse_replicas(cls, text: str) -> "BlackBoxSpec":
        """``SCHEME://H1:P1[/MODEL],SCHEME://H2:P2[/MODEL]``: replicas of one remote model."""
        parts = [cls.parse(part) for part in text.split(",")]
        if any(not p.remote for p in parts):
            raise ValueError(f"{text!r}: only remote specs have replicas (grpc://, kserve://, "
                             "kserve+http://, joined by commas); MODULE:FUNCTION runs in this process")
        if len({(p.kind, p.name, p.tls) for p in parts}) > 1:
            mixed = ", ".join(sorted({f"{p.scheme}://.../{p.name}" for p in parts}))
            raise ValueError(f"{text!r}: replicas must share the scheme and the model, got {mixed}; "
                             "serve the same model on every address and name it the same way")
        targets = [p.target for p in parts]
        if len(set(targets)) != len(targets):
            raise ValueError(f"{text!r}: an address appears twice; name each replica once")
        return cls(parts[0].kind, ",".join(targets), parts[0].name, parts[0].tls)

    @property
    def targets(self) -> list[str]:
        """The ``host:port`` of every replica (one for a single server); [] for "python"."""
        return self.target.split(",") if self.remote else []

    @property
    def remote(self) -> bool:
        """True for the kinds reached over the network."""
        return self.kind != "python"

    @property
    def scheme(self) -> str:
        """The spec's scheme (``grpcs`` for kind grpc with TLS, ...); "" for "python"."""
        if not self.remote:
            return ""
        return self.kind + ("s" if self.tls else "")

    def __str__(self) -> str:
        if self.kind == "python":
            return f"{self.target}:{self.name}"
        return ",".join(f"{self.scheme}://{t}" + (f"/{self.name}" if self.name else "") for t in self.targets)


def load_callable(spec: str) -> Callable | Mapping[str, Callable]:
    """Import ``MODULE:ATTR[.ATTR...]`` (the current directory is importable) and return it.

    The attribute may also be a dict ``{model_name: callable}`` (``serve`` serves every entry).
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r}: expected MODULE:CALLABLE, e.g. mypkg.sim:step")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not callable(v)]
        if bad or not obj:
            raise TypeError(f"{spec!r} is a mapping, but not of names to callables (bad: {bad})")
        return obj
    if not callable(obj):
        raise TypeError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def open_blackbox(spec: str | BlackBoxSpec, *, timeout: float = 60.0, token: str | None = None,
                  numpy: bool = True, tls_ca: str | None = None):
    """The black box a spec names: ``box(*inputs [N, ...]) -> [N, ...]`` (a torch tensor).

    Args:
        spec: one of ``SPEC_FORMS`` (or a parsed ``BlackBoxSpec``).
        timeout: deadline of every remote call, in seconds.
        token: shared token for remote servers (default: ``$DEEPZERO_ORACLE_TOKEN``).
        numpy: in-process functions receive NumPy arrays (the black-box contract: arrays in,
            arrays out); False passes torch tensors.
        tls_ca: for TLS specs, a CA certificate (PEM path) to trust (default:
            ``$DEEPZERO_ORACLE_TLS_CA``, else the system's roots).
    Returns:
        ``GrpcBlackBox``, ``KServeBlackBox`` or ``LocalBlackBox``; each is a context manager.
    Raises:
        BlackBoxUnavailable: a spec with replicas where one of them cannot be reached (named),
            before any query is sent.
        FileNotFoundError: the CA file does not exist.
    """
    spec = spec if isinstance(spec, BlackBoxSpec) else BlackBoxSpec.parse(spec)
    if spec.kind == "python":
        fn = load_callable(str(spec))
        if isinstance(fn, Mapping):
            raise TypeError(f"{spec} is a mapping of several functions; name one: MODULE:NAME")
        return LocalBlackBox(fn, numpy=numpy)
    tls = None
    if spec.tls:
        tls_ca = tls_ca or os.environ.get(TLS_CA_ENV) or None
        if tls_ca and not os.path.isfile(tls_ca):
            raise FileNotFoundError(f"CA certificate {tls_ca!r} (for {spec}) does not exist; set {TLS_CA_ENV} "
                                    "to the PEM file of the server's CA, or unset it to use the system's roots")
        tls = tls_ca or True
    targets = spec.targets if len(spec.targets) > 1 else spec.target
    if spec.kind == "grpc":
        from deepzero_oracle.blackbox.grpc import GrpcBlackBox

        box = GrpcBlackBox(targets, model=spec.name, timeout=timeout, token=token, tls=tls)
    else:
        from deepzero_oracle.blackbox.kserve import KServeBlackBox

        if spec.kind == "kserve+http":
            urls = [f"{'https' if spec.tls else 'http'}://{t}" for t in spec.targets]
            box = KServeBlackBox(urls if len(urls) > 1 else urls[0], spec.name, protocol="rest",
                                 timeout=timeout, token=token, tls=tls)
        else:
            box = KServeBlackBox(targets, spec.name, protocol="grpc", timeout=timeout, token=token, tls=tls)
    if len(spec.targets) > 1:
        try:
            # A dead replica would silently leave the rotation: name it before any work starts.
            box.check_replicas(timeout=min(timeout, 10.0))
        except BaseException:
            box.close()
            raise
    return box


def _is_host_port(target: str) -> bool:
    host, sep, port = target.rpartition(":")
    return bool(sep and host and port.isdigit())


def _forms() -> str:
    return "use one of " + ", ".join(SPEC_FORMS)


__all__ = ["BlackBoxSpec", "SPEC_FORMS", "TLS_CA_ENV", "load_callable", "open_blackbox"]
