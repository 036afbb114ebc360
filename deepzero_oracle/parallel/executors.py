"""Executors: the inline default, ``open_executor`` (an executor from a spec string, as the
command line's ``--executor`` takes it), and what we read off the others (Dask is recognised by
type name and imported only by ``open_executor`` when a spec asks for it, so it stays optional)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import re
from typing import Iterator

from deepzero_oracle.errors import ExecutorUnavailable
from deepzero_oracle.extras import require

#: The spec forms ``open_executor`` (and ``--executor``) accept.
EXECUTOR_FORMS = ("inline", "threads:N", "processes:N", "dask-local:N", "dask://HOST:PORT",
                  "tls://HOST:PORT")
#: Environment variables naming the client's TLS files for ``tls://`` schedulers (PEM paths);
#: unset ones fall back to Dask's own configuration (``distributed.comm.tls.*``).
TLS_ENV = {"tls_ca_file": "DEEPZERO_ORACLE_DASK_TLS_CA_FILE",
           "tls_client_cert": "DEEPZERO_ORACLE_DASK_TLS_CERT",
           "tls_client_key": "DEEPZERO_ORACLE_DASK_TLS_KEY"}
_COUNTED = re.compile(r"(threads|processes|dask-local):(\d+)")
_REMOTE = re.compile(r"(dask|tls)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


class InlineExecutor(cf.Executor):
    """Runs each call at ``submit`` time in the calling thread; returns a completed Future.

    The default executor of ``ParallelOracle``: no threads, no pickling, exceptions are kept in
    the Future (as with any executor) rather than raised by ``submit``.
    """

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        """``fn(*args, **kwargs)`` now; returns a done ``Future`` with its result or exception."""
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - delivered through the Future like any executor
            future.set_exception(exc)
        return future


def dask_client(executor):
    """The dask.distributed Client behind ``executor``, or None (without importing Dask)."""
    module = type(executor).__module__ or ""
    if not module.startswith("distributed"):
        return None
    if type(executor).__name__ == "Client":
        return executor
    return getattr(executor, "_client", None)  # ClientExecutor keeps its client here


def executor_slots(executor) -> int:
    """How many tasks ``executor`` runs at once: 1 inline, Dask's total worker threads, a
    pool's ``_max_workers``, else ``os.cpu_count()``."""
    if isinstance(executor, InlineExecutor):
        return 1
    client = dask_client(executor)
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    return int(getattr(executor, "_max_workers", 0) or os.cpu_count() or 1)


def parse_executor_spec(spec: str) -> tuple[str, int | str | None]:
    """``(kind, value)`` of an executor spec: ``("inline", None)``, ``("threads", N)``,
    ``("processes", N)``, ``("dask-local", N)`` or ``("dask", "tcp://HOST:PORT")`` /
    ``("dask", "tls://HOST:PORT")``. Raises ValueError listing ``EXECUTOR_FORMS`` otherwise."""
    text = str(spec).strip()
    if text == "inline":
        return "inline", None
    counted = _COUNTED.fullmatch(text)
    if counted and int(counted.group(2)) >= 1:
        return counted.group(1), int(counted.group(2))
    remote = _REMOTE.fullmatch(text)
    if remote and 0 < int(remote.group(3)) < 65536:
        scheme = "tcp" if remote.group(1) == "dask" else "tls"
        return "dask", f"{scheme}://{remote.group(2)}:{remote.group(3)}"
    raise ValueError(f"malformed executor spec {spec!r}; accepted forms: {', '.join(EXECUTOR_FORMS)} "
                     "(N >= 1 workers, e.g. threads:4, dask-local:2, dask://10.0.0.5:8786)")


@contextlib.contextmanager
def open_executor(spec: str, *, connect_timeout: float = 5.0, security=None) -> Iterator[cf.Executor]:
    """The executor a spec names, shut down (with whatever it started) on exit.

    Specs (``EXECUTOR_FORMS``): ``inline`` (``InlineExecutor``); ``threads:N`` (a thread pool);
    ``processes:N`` (a process pool, forkserver where available, torch at one thread per
    worker); ``dask-local:N`` (a ``dask.distributed.LocalCluster`` on 127.0.0.1: N worker
    processes with one thread each, its dashboard on a free local port; yields its ``Client``);
    ``dask://HOST:PORT`` (a ``Client`` of a running scheduler); ``tls://HOST:PORT`` (the same
    over TLS, with ``security`` or a ``distributed.security.Security`` from the ``TLS_ENV``
    variables).

    Args:
        spec: one of the forms above.
        connect_timeout: seconds to reach a remote scheduler and to see its first worker.
        security: a ``distributed.security.Security`` for ``tls://`` (default: from ``TLS_ENV``).
    Raises:
        ValueError: a malformed spec, or ``tls://`` without the client's TLS files (before
            anything starts).
        ImportError: a Dask spec without dask.distributed installed.
        ExecutorUnavailable: the scheduler cannot be reached or has no workers.
    """
    kind, value = parse_executor_spec(spec)
    if kind == "inline":
        yield InlineExecutor()
    elif kind == "threads":
        with cf.ThreadPoolExecutor(value, thread_name_prefix="deepzero-query") as pool:
            yield pool
    elif kind == "processes":
        with cf.ProcessPoolExecutor(value, mp_context=_process_context(), initializer=_one_thread) as pool:
            yield pool
    elif kind == "dask-local":
        distributed = _import_distributed()
        # the dashboard Dask starts anyway: on a free local port, so several clusters coexist
        with _sigint_ignored():  # the workers start ignoring Ctrl-C (see _one_thread)
            cluster = distributed.LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                                               host="127.0.0.1", dashboard_address="127.0.0.1:0")
        with cluster, distributed.Client(cluster) as client:
            yield client
    else:
        with _remote_client(value, connect_timeout, security) as client:
            yield client


def _import_distributed():
    return require("dask", "distributed", feature="a Dask executor (--executor dask-local:N, dask://, tls://)")


def _process_context():
    # forkserver: workers start from a clean server with torch imported once (fork is unsafe
    # with threads, spawn re-imports torch per worker)
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "deepzero_oracle.parallel"])
    return context


@contextlib.contextmanager
def _sigint_ignored():
    """Processes started within ignore SIGINT (an ignored signal stays ignored in a new process);
    this process's own handler comes back after. Main thread only, else a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _one_thread() -> None:
    import signal

    import torch

    torch.set_num_threads(1)  # one worker per core: torch's own threads would oversubscribe
    # Ctrl-C reaches the whole process group: the parent finishes the step in flight and stops
    # (deepzero_oracle.stops), so its workers must not die under it
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _remote_client(address: str, connect_timeout: float, security):
    distributed = _import_distributed()
    if address.startswith("tls://") and security is None:
        from distributed.security import Security

        files = {k: os.environ[v] for k, v in TLS_ENV.items() if os.environ.get(v)}
        security = Security(require_encryption=True, **files)  # unset ones: from Dask's config
        missing = [v for k, v in TLS_ENV.items() if not getattr(security, k)]
        if missing:
            raise ValueError(f"{address} needs the client's TLS files: set {', '.join(missing)} to PEM paths "
                             "(or Dask's distributed.comm.tls configuration), or pass security=")
    what = f"the TLS files ({', '.join(TLS_ENV.values())}), " if address.startswith("tls://") else ""
    try:
        client = distributed.Client(address, timeout=connect_timeout, security=security, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ExecutorUnavailable(
            f"cannot reach the Dask scheduler at {address} within {connect_timeout:g} s ({exc}); check that "
            f"`dask scheduler` runs there and listens on that port, {what}and the firewalls on the way") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ExecutorUnavailable(
                f"the Dask scheduler at {address} has no workers after {connect_timeout:g} s ({exc}); start "
                f"some with `dask worker {address}`") from None
        yield client


__all__ = ["EXECUTOR_FORMS", "InlineExecutor", "TLS_ENV", "dask_client", "executor_slots",
           "open_executor", "parse_executor_spec"]
