"""The REST client: a model behind any KServe v2 REST server (ours with ``--http-port``,
MLServer, Triton, KServe) as a black box.

    box = RestBlackBox("http://127.0.0.1:8080", "my-model")      # x [N, ...] -> y [N, ...]
    y = box(x)

Same call and errors as LocalBlackBox and GrpcBlackBox. It POSTs JSON to
``/v2/models/<name>[/versions/<v>]/infer`` on one kept-alive ``httpx.Client`` per address.
Input names come from the model's metadata unless given. Needs the ``rest`` extra
(``pip install 'deepzero-oracle[rest]'``); it never imports grpc.
"""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import time
import urllib.parse
from typing import TYPE_CHECKING

import numpy as np

from deepzero_oracle.blackbox.errors import BlackBoxError, remote_error, unreachable_replicas
from deepzero_oracle.blackbox.remote import RemoteBlackBox, metadata_dict
from deepzero_oracle.extras import require
from deepzero_oracle.wire.codec import decode_json, json_tensor
from deepzero_oracle.wire.constants import GRPC_CODE_OF_HTTP, bearer, check_timeout, resolve_token
from deepzero_oracle.wire.errors import WireError

if TYPE_CHECKING:
    import httpx

# the REST client is an extra; gRPC users never import httpx
_REST_CLIENT = "the KServe v2 REST client (RestBlackBox, kserve+http://)"

_NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class RestBlackBox(RemoteBlackBox):
    """A model behind a KServe v2 REST server: ``box(*inputs [N, ...]) -> [N, ...]``.

    Args:
        url: ``http(s)://host:port`` (``host:port`` means http), or a list of them for replicas
            of one model: calls rotate over the addresses, and a connection failure or a
            timeout is retried on the next one.
        model: model name on the server.
        version: model version ("" = the server's choice).
        timeout: deadline of every call, in seconds.
        token: sent as ``Authorization: Bearer <token>`` (default: $DEEPZERO_ORACLE_TOKEN).
        tls: use https:// in ``url``; pass a CA PEM path here to trust a private CA.
        input_names: names of the inputs in call order (default: from the model's metadata).
        output_names: outputs to return, in order (default: all, in the server's order).
        max_batch_rows: most rows per request; larger calls are split.
        max_message_mb: the budget of one request's tensor bytes (larger calls are split).
        retries: extra attempts when the server is unreachable or answers 503.

    ``clients`` holds one ``httpx.Client`` per address (its connection pool keeps the
    connection alive between calls; ``http`` is the first); ``close()`` closes them. The black
    box pickles; a copy opens its own connections on first use.
    """

    def __init__(self, url, model: str, *, version: str = "", timeout: float = 30.0, token: str | None = None,
                 tls=None, input_names: list[str] | None = None, output_names: list[str] | None = None,
                 max_batch_rows: int = 65536, max_message_mb: float = 64, retries: int = 4):
        super().__init__(model=model, version=version, input_names=input_names, output_names=output_names,
                         max_batch_rows=max_batch_rows, max_message_mb=max_message_mb)
        require("rest", "httpx", feature=_REST_CLIENT)
        self.timeout = check_timeout(timeout)
        self.retries = max(0, int(retries))
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("RestBlackBox needs at least one address")
        self.bases = [(u if "://" in u else "http://" + u).rstrip("/") for u in urls]
        self.base = self.bases[0]
        self.target = ",".join(self.bases)
        token = resolve_token(token)
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = bearer(token)
        self._cafile = tls if isinstance(tls, str) else None
        self._clients: list[httpx.Client] | None = None
        self._turn = itertools.count()

    # -- connections -------------------------------------------------------------------------
    @property
    def clients(self) -> list[httpx.Client]:
        """One ``httpx.Client`` per address (opened on first use), whose connection pool keeps
        its connection alive between calls."""
        if self._clients is None:
            httpx = require("rest", "httpx", feature=_REST_CLIENT)
            verify = ssl.create_default_context(cafile=self._cafile) if self._cafile else True
            # No Nagle delay: a request's headers and body are separate small writes, and waiting
            # for the server's delayed ACK between them costs ~40 ms per call.
            self._clients = [httpx.Client(base_url=base, headers=self._headers, timeout=self.timeout,
                                          transport=httpx.HTTPTransport(verify=verify, socket_options=_NO_DELAY))
                             for base in self.bases]
        return self._clients

    @property
    def http(self) -> httpx.Client:
        """The client of the first address."""
        return self.clients[0]

    # -- metadata --------------------------------------------------------------------------
    def _fetch_metadata(self) -> dict:
        return metadata_dict(self._http("GET", self._model_path(""), None, "metadata"))

    def ready(self, timeout: float | None = None) -> bool:
        """True if the server says the model is ready (False if unreachable or unknown)."""
        import httpx

        try:
            r = self.http.get(self._model_path("/ready"),
                              timeout=self.timeout if timeout is None else check_timeout(timeout))
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def _model_path(self, suffix: str) -> str:
        path = f"/v2/models/{urllib.parse.quote(self.model, safe='')}"
        if self.version:
            path += f"/versions/{urllib.parse.quote(self.version, safe='')}"
        return path + suffix

    # -- inference -------------------------------------------------------------------------
    def _infer_chunks(self, chunks):
        names = self._names(len(chunks[0]))
        return [self._select(self._infer(c, names)) for c in chunks]

    def _infer(self, arrays: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        body = {"inputs": [json_tensor(n, a) for n, a in zip(names, arrays)]}
        if self.output_names:
            body["outputs"] = [{"name": n} for n in self.output_names]
        # allow_nan=False: JSON has no NaN; refuse rather than send something a server misreads.
        try:
            data = json.dumps(body, allow_nan=False).encode()
        except ValueError as e:
            raise remote_error("INVALID_ARGUMENT", "inputs hold NaN or Inf, which JSON cannot carry",
                               self.target, context="REST infer") from e
        answer = self._http("POST", self._model_path("/infer"), data, f"infer({self.model!r})")
        out: dict[str, np.ndarray] = {}
        try:
            for t in answer.get("outputs", []):
                out[t["name"]] = decode_json(t.get("data"), t.get("datatype", ""), t.get("shape", []),
                                             t["name"])
        except (WireError, KeyError, TypeError, AttributeError) as e:
            raise BlackBoxError(f"black box at {self.target} sent an unreadable answer: {e}") from e
        return out

    def _http(self, method: str, path: str, data: bytes | None, what: str):
        """One JSON request with retries on connection failures / 503 (idempotent calls only).

        With several addresses, calls rotate over them; a connection failure or a timeout is
        retried on the next address (a timeout at most once per address, each with the full
        ``timeout``)."""
        import httpx

        replicas = len(self.bases) > 1
        deadline = time.monotonic() + self.timeout
        attempt, stalls = 0, 0
        turn = next(self._turn)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise remote_error("DEADLINE_EXCEEDED", f"no answer within {self.timeout} s",
                                   self.target, context=what)
            client = self.clients[(turn + attempt) % len(self.bases)]
            try:
                r = client.request(method, path, content=data, timeout=remaining)
            except httpx.TimeoutException:
                stalls += 1
                if not replicas or stalls >= len(self.bases):
                    raise remote_error("DEADLINE_EXCEEDED", f"no answer within {self.timeout} s",
                                       self.target, context=what) from None
                attempt += 1
                deadline = time.monotonic() + self.timeout  # the next replica gets a full deadline
                continue
            except httpx.TransportError as e:
                if attempt >= self.retries + len(self.bases) - 1:
                    raise remote_error("UNAVAILABLE", f"{type(e).__name__}: {e}", self.target,
                                       context=what) from None
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError as e:
                        raise BlackBoxError(f"black box at {self.target} answered {what} with invalid "
                                            f"JSON: {e}") from None
                code = GRPC_CODE_OF_HTTP.get(r.status_code, "UNKNOWN")
                if code != "UNAVAILABLE" or attempt >= self.retries:
                    raise remote_error(code, f"HTTP {r.status_code}: {_error_text(r)}", self.target,
                                       context=what) from None
            attempt += 1
            time.sleep(min(0.1 * 2 ** (attempt - 1), 2.0, max(0.0, deadline - time.monotonic())))

    def check_replicas(self, timeout: float = 10.0) -> None:
        """Raise `BlackBoxUnavailable` naming every address that cannot be reached
        (``GET /v2/health/live``)."""
        import httpx

        problems = []
        for base, client in zip(self.bases, self.clients):
            try:
                r = client.get("/v2/health/live", timeout=check_timeout(timeout))
                if r.status_code != 200:
                    problems.append(f"{base} (HTTP {r.status_code})")
            except httpx.HTTPError as e:
                problems.append(f"{base} ({type(e).__name__}: {e})")
        if problems:
            raise unreachable_replicas(self.target, problems)

    def close(self) -> None:
        """Close the connection pools (a later call opens new ones)."""
        if self._clients is not None:
            for client in self._clients:
                client.close()
            self._clients = None

    def __getstate__(self) -> dict:
        # The clients hold sockets: a copy (another process, a Dask worker) opens its own.
        return {k: (None if k == "_clients" else v) for k, v in self.__dict__.items() if k != "_turn"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._turn = itertools.count()

    def __enter__(self) -> "RestBlackBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RestBlackBox({self.target!r}, {self.model!r})"


def _error_text(r: httpx.Response) -> str:
    """The server's message in an error response (``{"error": ...}`` in KServe v2)."""
    try:
        parsed = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(parsed, dict):
        return str(parsed.get("error") or parsed.get("detail") or parsed)
    return str(parsed)[:500]


__all__ = ["RestBlackBox"]
