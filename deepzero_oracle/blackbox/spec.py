"""One string names a black box, the same way for every command that takes one
(``--solver``, ``--classifier``):

    grpc://HOST:PORT[/MODEL]          our server, or any KServe v2 gRPC server (GrpcBlackBox)
    kserve://HOST:PORT/MODEL          the same client for a KServe v2 gRPC server (GrpcBlackBox,
                                      one chunk in flight at a time)
    kserve+http://HOST:PORT/MODEL     KServe v2 over REST (RestBlackBox)
    MODULE:FUNCTION                   a Python function, called in this process (LocalBlackBox)

With TLS: ``grpcs://``, ``kserves://`` and ``kserve+https://``; the server's certificate is
checked against the system's roots, or against the CA certificate (PEM) that
``$DEEPZERO_ORACLE_TLS_CA`` names (a self-signed server: its own certificate).

Replicas of one remote black box are several specs joined by commas, all with the same scheme
and model: ``grpc://h1:p1,grpc://h2:p2`` (calls are spread over them and a failed or stalled
replica's call goes to another; see ``deepzero_oracle.blackbox.grpc``).

``open_blackbox(spec)`` returns the black box, a context manager that closes its connection.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Mapping

from deepzero_oracle.blackbox.local import LocalBlackBox
from deepzero_oracle.wire.constants import check_timeout

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

    Raises:
        ValueError: ``spec`` is not ``MODULE:CALLABLE``.
        ImportError: the module is not found, needs a package that is not installed, or
            raised while importing (the message names the file and line).
        AttributeError: the module has no such attribute (the message lists its callables).
        TypeError: the attribute is not a callable (nor a dict of callables).
    Every message is one line saying what is wrong and what to do.
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r}: expected MODULE:CALLABLE, e.g. mypkg.sim:step")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj = _import(module_name, spec)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            have = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            listed = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "") if have else "none"
            raise AttributeError(f"{spec}: {_describe(obj)} has no attribute {part!r} (its callables: {listed}); "
                                 "name one of them after the colon") from None
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not callable(v)]
        if bad or not obj:
            raise TypeError(f"{spec} is a mapping, but not of names to callables (bad: {bad[:5]}); "
                            "give a dict {model_name: callable}")
        return obj
    if not callable(obj):
        raise TypeError(f"{spec} is not callable (its type is {type(obj).__name__}); name a function (or an object "
                        "with __call__) f(*inputs [N, ...]) -> [N, ...], or a dict of them")
    return obj


def load_callable_for(spec: str, what: str = "") -> Callable | Mapping[str, Callable]:
    """``load_callable`` for the command line: every failure is one ``ValueError`` (exit
    code 2) saying what is wrong and what to do, prefixed by ``what`` (e.g. ``"--solver"``)."""
    try:
        return load_callable(spec)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, whatever the module's error said
        raise ValueError(f"{what} {message}" if what else message) from e


def _import(module_name: str, spec: str):
    """``importlib.import_module`` with one-line errors (see ``load_callable``)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ImportError(f"{spec}: no module named {missing!r}; MODULE must be importable from the "
                              "current folder or installed in this Python environment") from e
        raise ImportError(f"{spec}: importing {module_name!r} needs the package {missing!r}, which is not "
                          "installed; install it in this Python environment") from e
    except Exception as e:  # noqa: BLE001 -- the module's own code failed: say where, in one line
        raise ImportError(f"{spec}: importing {module_name!r} raised {type(e).__name__}: {_first_line(e)}"
                          f"{_where(e)}; fix the module") from e


def _first_line(e: BaseException) -> str:
    text = e.msg if isinstance(e, SyntaxError) and e.msg else str(e)
    return text.strip().splitlines()[0][:300] if text.strip() else "(no message)"


def _where(e: BaseException) -> str:
    """`` (FILE, line N)``: where a module's import failed (the file's name only), or ""."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" ({os.path.basename(e.filename)}, line {e.lineno})"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if f.name == "<module>" and not f.filename.startswith("<")]
    return f" ({os.path.basename(frames[-1].filename)}, line {frames[-1].lineno})" if frames else ""


def _describe(obj) -> str:
    return f"module {obj.__name__!r}" if inspect.ismodule(obj) else f"{type(obj).__name__} object"


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
        ``GrpcBlackBox``, ``RestBlackBox`` or ``LocalBlackBox``; each is a context manager.
    Raises:
        BlackBoxUnavailable: a spec with replicas where one of them cannot be reached (named),
            before any query is sent.
        FileNotFoundError: the CA file does not exist.
    """
    spec = spec if isinstance(spec, BlackBoxSpec) else BlackBoxSpec.parse(spec)
    timeout = check_timeout(timeout)
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
    if spec.kind == "kserve+http":
        from deepzero_oracle.blackbox.rest import RestBlackBox

        urls = [f"{'https' if spec.tls else 'http'}://{t}" for t in spec.targets]
        box = RestBlackBox(urls if len(urls) > 1 else urls[0], spec.name, timeout=timeout, token=token, tls=tls)
    else:
        from deepzero_oracle.blackbox.grpc import GrpcBlackBox

        # kserve:// is grpc:// for servers that run one call per model at a time.
        one_at_a_time = {"max_inflight": 1} if spec.kind == "kserve" else {}
        box = GrpcBlackBox(targets, model=spec.name, timeout=timeout, token=token, tls=tls, **one_at_a_time)
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


__all__ = ["BlackBoxSpec", "SPEC_FORMS", "TLS_CA_ENV", "load_callable", "load_callable_for", "open_blackbox"]
