"""Run an oracle's query batches on any executor: inline, threads, processes, a Dask cluster.

Queries are independent, so one request (C coordinate losses, Q direction losses, P thetas)
splits into chunks that can run anywhere offering ``submit(fn, *args, **kwargs) -> Future``:
``InlineExecutor`` (the default), ``concurrent.futures.ThreadPoolExecutor`` /
``ProcessPoolExecutor``, or ``dask.distributed`` (a ``Client`` or its
``get_executor(pure=False)``; Dask is imported by nobody here, it is recognised by type name).

Rooms: ``oracle`` (``ParallelOracle``: plan, submit, gather; ``ChunkError``; ``parallelize``),
``payloads`` (what travels and how, the worker side), ``executors`` (``InlineExecutor``,
``open_executor`` for spec strings such as ``dask-local:2``, executor sniffing), ``fanout``
(``map_ordered``: any independent tasks, results in order).

Public API (this package's ``__all__``; the rooms' other names are internals): the names
above, ``map_ordered``, ``executor_slots`` (how many tasks an executor runs at once),
``check_shippable`` / ``shippable_bytes`` (refuse, before any work, what cannot travel to the
workers), ``compact`` (a tensor view copied to its own size before it travels), and the
worker-side counters protocol below.

Worker-side counters
--------------------
Queries are counted by ``ParallelOracle`` in the parent. Other work a query does (solver calls,
images through a classifier) happens on the worker copies; an oracle counts it by defining

- ``counters() -> dict[str, int]``: its running totals, e.g. ``{"solver_calls": 12}``;
- ``add_counters(counts: dict[str, int])``: add ``counts`` to those totals.

(or by holding, as ``oracle.blackbox``, a black box that defines both). Each chunk returns how
much its worker copy's ``counters()`` grew, and ``ParallelOracle`` adds that to the wrapped
oracle with ``add_counters`` (and sums it in ``worker_counters``): the wrapped oracle's totals,
its ``state_dict`` and a resumed run read the same as inline, whatever the executor.

What travels
------------
Payloads, each deserialised once per worker (thread or process) and shipped once per worker
(except with the "bytes" transport below), identified by a content hash (token):

- the *state*: the wrapped oracle, pickled (a bound ``ModuleOracle`` with its learner, data
  batch, loss and black box; a ``CallableOracle`` with its function). About the size of the data
  batch plus the learner. Re-shipped only when its bytes change (a new ``bind``, a BatchNorm
  running-statistics update), so in training: once per step.
- the *request*: theta ``[dim]`` plus the sorted coordinates ``[C]`` (CGE), or theta plus the
  directions: a ``Directions`` recipe (seed, q, the mask's coordinates; what ``RGE`` draws),
  from which workers make their rows, or a plain matrix ``[Q, dim]``. Once per theta: the plus
  and minus requests of central CGE or antithetic RGE share it, since mu travels in the task.

Per task (small): a ``Job`` (kind, chunk number, ``start``/``stop`` positions in the sorted
request, mu, block) and two handles naming the state and the request; for ``losses(thetas)``
also that chunk's rows ``[stop - start, dim]`` (they *are* the request; each row travels once). Never a perturbed theta.
Per result: the chunk's losses ``[stop - start]``, its run time and how many payloads it loaded.

How a handle reaches a worker (``transport``, picked from the executor):

- ``"live"`` (``InlineExecutor``): the objects themselves, same thread, nothing pickled.
- ``"scatter"`` (Dask): each payload is ``client.scatter(..., broadcast=True)`` once; tasks
  carry the Dask future, which the worker resolves to its local replica.
- ``"spool"`` (``ProcessPoolExecutor``, same machine): each payload is written once to a private
  temporary file (mode 0600); tasks carry ``(token, path)``, a worker reads it on a cache miss.
- ``"bytes"`` (anything else, e.g. a thread pool): the payload bytes ride along with each task
  (free in a thread pool: a reference, no copy); still deserialised once per worker thread.

Workers keep the last few payloads in a thread-local cache keyed by a content hash (token), so
a worker deserialises the state once per step and its copy of a ``ModuleOracle`` keeps its base
forward (feature reuse) across all chunks of the step.

Determinism: a request is sorted (coordinates) and cut into fixed *blocks* of ``block`` queries;
each block is one call of the wrapped oracle's evaluation hook, and a task is a run of whole
blocks. So every loss is computed by the same block composition whatever the executor and
whatever the chunking, and the result is bitwise identical across them (given the same torch
build; the tests check inline vs threads vs spawn/forkserver processes vs Dask, whose workers run
torch with one thread while the parent uses two). Directions made from a recipe are bitwise the
rows of its matrix, so a seeded RGE run is the same with and without an executor.
"""

from deepzero_oracle.estimators.directions import Directions
from deepzero_oracle.parallel.executors import EXECUTOR_FORMS, InlineExecutor, executor_slots, open_executor
from deepzero_oracle.parallel.fanout import map_ordered
from deepzero_oracle.parallel.oracle import ChunkError, ParallelOracle, parallelize
from deepzero_oracle.parallel.payloads import TRANSPORTS, check_shippable, compact, shippable_bytes

__all__ = ["ChunkError", "Directions", "EXECUTOR_FORMS", "InlineExecutor", "ParallelOracle", "TRANSPORTS",
           "check_shippable", "compact", "executor_slots", "map_ordered", "open_executor", "parallelize",
           "shippable_bytes"]
