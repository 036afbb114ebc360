"""ParallelOracle: the same gradient on every executor, exact counts, budget first, clear errors.

Executors (process pools, a 2-worker Dask LocalCluster on 127.0.0.1) are module-scoped and
started lazily, so selecting a subset of tests only pays for what it uses.
"""

import concurrent.futures as cf
import copy
import multiprocessing as mp
import os
import pickle
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import (CGE, RGE, CallableOracle, ModuleOracle, NonFiniteLossError,
                             QueryBudgetExceeded, TensorBatches, Trainer)
from deepzero_oracle.parallel import ChunkError, InlineExecutor, ParallelOracle
from deepzero_oracle.theta import assign_gradient

# One process start method per run, to keep the file's run time down (each pool start imports
# torch). forkserver (torch preloaded) by default; DEEPZERO_TEST_MP_CONTEXT=spawn checks spawn.
PROCESSES = os.environ.get("DEEPZERO_TEST_MP_CONTEXT", "forkserver")
EXECUTORS = ["inline", "threads", PROCESSES, "dask-executor", "dask-client"]
# a different chunking per executor: results must not depend on it either
CHUNK_SIZES = {"inline": None, "threads": 64, PROCESSES: 100, "dask-executor": None,
               "dask-client": 40}


# -- things shipped to workers (module level or plain data, so they pickle) -------------------


def small_cnn():
    """388 parameters: two conv layers and a linear head on 8x8 images."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 10))


class Bumpy:
    """A non-quadratic float32 black-box loss of theta [dim] that carries its own data."""

    def __init__(self, dim, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(dim, 16, generator=g)
        self.b = torch.randn(dim, generator=g)

    def __call__(self, theta):
        return torch.tanh(theta @ self.A).pow(2).sum() + 0.1 * (theta - self.b).pow(2).sum()


class FailsAt:
    """Raises when coordinate ``where`` of theta is moved off zero."""

    def __init__(self, where):
        self.where = where

    def __call__(self, theta):
        if theta[self.where] != 0:
            raise ValueError(f"boom at coordinate {self.where}")
        return theta.sum()


class NanAt:
    """NaN when coordinate ``where`` of theta is moved off zero, else the sum of theta."""

    def __init__(self, where):
        self.where = where

    def __call__(self, theta):
        return theta.sum() * (float("nan") if theta[self.where] != 0 else 1.0)


class Recording(cf.Executor):
    """Delegates to another executor, recording each task's pickled argument size."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def submit(self, fn, /, *args, **kwargs):
        self.sizes.append((getattr(args[-1], "kind", None), len(pickle.dumps((args, kwargs)))))
        return self.inner.submit(fn, *args, **kwargs)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_client():
    import distributed
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def pools():
    made = {}

    def get(name):
        if name not in made:
            if name == "threads":
                made[name] = cf.ThreadPoolExecutor(2)
            else:
                context = mp.get_context(name)
                if name == "forkserver":  # workers fork with torch already imported
                    context.set_forkserver_preload(["torch", "deepzero_oracle.parallel"])
                made[name] = cf.ProcessPoolExecutor(2, mp_context=context)
        return made[name]

    yield get
    for pool in made.values():
        pool.shutdown(cancel_futures=True)


@pytest.fixture
def executor(request, pools):
    """``(name, executor)`` for the parametrised name."""
    name = request.param
    if name == "inline":
        return name, InlineExecutor()
    if name.startswith("dask"):
        client = request.getfixturevalue("dask_client")
        return name, (client.get_executor(pure=False) if name == "dask-executor" else client)
    return name, pools(name)


@pytest.fixture(scope="module")
def cnn_case():
    """A bound float32 CNN oracle factory, theta, a mask, and the reference gradients
    (forward CGE on all coordinates, central CGE on the mask) computed inline in one chunk."""
    torch.manual_seed(0)
    learner = small_cnn().eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))

    def make():
        return ModuleOracle(copy.deepcopy(learner), F.cross_entropy).bind(x, y)

    theta = make().theta()
    mask = torch.rand(theta.numel(), generator=torch.Generator().manual_seed(2)) < 0.3
    ref = ParallelOracle(make(), chunk_size=10**9)
    forward = CGE(mu=1e-2).estimate(ref, theta)
    central = CGE(mu=1e-2, difference="central").estimate(ref, theta, mask=mask)
    assert ref.last_chunks == [(0, int(mask.sum()))]
    # the plain oracle (its own memory-sized chunking) agrees to float32 accuracy
    plain = make()
    torch.testing.assert_close(forward, CGE(mu=1e-2).estimate(plain, theta), rtol=0, atol=1e-4)
    torch.testing.assert_close(central, CGE(mu=1e-2, difference="central").estimate(
        plain, theta, mask=mask), rtol=0, atol=1e-4)
    return make, theta, mask, forward, central


# -- executor choice does not change the gradient ---------------------------------------------


@pytest.mark.parametrize("executor", EXECUTORS, indirect=True)
def test_cge_on_a_cnn_is_bitwise_the_same_on_every_executor(executor, cnn_case):
    name, executor = executor
    make, theta, mask, forward, central = cnn_case
    inner = make()
    with ParallelOracle(inner, executor, chunk_size=CHUNK_SIZES[name], block=16) as oracle:
        assert torch.equal(CGE(mu=1e-2).estimate(oracle, theta), forward)
        assert len(oracle.last_chunks) > 1  # really split
        # two requests at the same theta (plus and minus mu): mu travels per task
        got = CGE(mu=1e-2, difference="central").estimate(oracle, theta, mask=mask)
        assert torch.equal(got, central)
        assert oracle.queries == (oracle.dim + 1) + 2 * int(mask.sum())
    assert inner.queries == 0  # counted once, on the wrapper, never by worker copies


@pytest.mark.parametrize("executor", EXECUTORS, indirect=True)
def test_rge_on_a_callable_is_bitwise_the_same_on_every_executor(executor):
    name, executor = executor
    dim, q = 300, 48
    fn = Bumpy(dim)
    theta = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    rge = RGE(q=q, mu=1e-2, antithetic=True)
    # reference: inline, one chunk, directions as a matrix
    reference = ParallelOracle(CallableOracle(fn, dim), chunk_size=10**9)
    dirs = reference.seeded_directions(q, seed=5).matrix()
    want = rge.estimate(reference, theta, directions=dirs.clone())  # a matrix: shipped as one
    assert torch.equal(want, rge.estimate(CallableOracle(fn, dim), theta, directions=dirs))

    oracle = ParallelOracle(CallableOracle(fn, dim), executor, chunk_size=8, block=4)
    seeded = oracle.seeded_directions(q, seed=5)
    assert torch.equal(seeded.matrix(), dirs)
    shipped = oracle.stats["payload_bytes"]
    got = rge.estimate(oracle, theta, directions=seeded)  # shipped as (seed, q) only
    assert torch.equal(got, want)
    if oracle.transport != "live":  # the recipe is far smaller than the [q, dim] matrix
        assert oracle.stats["payload_bytes"] - shipped < dirs.numel() * dirs.element_size()
    got = rge.estimate(oracle, theta, directions=dirs.clone())
    assert torch.equal(got, want)
    assert oracle.queries == 2 * (2 * q)
    oracle.close()


def seeded_rge_run(oracle, x, y, mask, steps=3, batch=16):
    """A short seeded RGE training loop (no Trainer): final theta [dim] and queries spent."""
    rge, generator = RGE(q=24, mu=1e-2), torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(oracle.parameters(), lr=0.5)
    for step in range(steps):
        oracle.bind(x[step * batch : (step + 1) * batch], y[step * batch : (step + 1) * batch])
        grad = rge.estimate(oracle, oracle.theta(), mask=mask, generator=generator)
        assign_gradient(oracle.parameters(), grad)
        opt.step()
    return oracle.theta(), oracle.queries


@pytest.mark.parametrize("executor", ["threads", PROCESSES], indirect=True)
def test_a_seeded_rge_training_run_is_bitwise_the_same_inline_and_on_an_executor(executor):
    name, executor = executor
    torch.manual_seed(0)
    learner = small_cnn().eval()
    x, y = torch.rand(48, 1, 8, 8), torch.randint(0, 10, (48,))

    def plain():  # evaluates 8 directions per call, as the ParallelOracle's blocks do
        return ModuleOracle(copy.deepcopy(learner), F.cross_entropy, max_batch=8)

    start = plain().theta()
    mask = torch.rand(start.numel(), generator=torch.Generator().manual_seed(4)) < 0.5
    for keep in (None, mask):
        want, want_queries = seeded_rge_run(plain(), x, y, keep)
        assert not torch.equal(want, start)  # it trained
        oracle = ParallelOracle(plain(), executor, chunk_size=8)
        got, got_queries = seeded_rge_run(oracle, x, y, keep)
        assert len(oracle.last_chunks) == 3  # the directions really were split
        assert torch.equal(got, want)
        assert got_queries == want_queries == 3 * (24 + 1)
        assert oracle.oracle.queries == 0  # counted on the wrapper only
        oracle.close()


# -- what travels, and how often ----------------------------------------------------------------


def test_heavy_payload_travels_once_per_step_tasks_carry_only_ranges(pools, cnn_case):
    make, theta, mask, forward, central = cnn_case
    executor = Recording(pools(PROCESSES))
    oracle = ParallelOracle(make(), executor, transport="spool", workers=2, chunk_size=64, block=16)
    assert torch.equal(CGE(mu=1e-2).estimate(oracle, theta), forward)
    # step 2: new theta, same data -> only the request payload (theta + coordinates) is new
    CGE(mu=1e-2).estimate(oracle, theta + 0.01)
    assert oracle.stats["payloads_shipped"] == 3  # state once, one request per theta
    per_payload = oracle.stats["payload_bytes"] / 3
    assert per_payload > 5_000  # the learner + data batch really are heavy ...
    # ... and no task carries them: coordinate tasks hold a position range, the one-theta
    # loss request its one row
    assert max(size for kind, size in executor.sizes if kind == "coordinate") < 1_000
    row = theta.numel() * theta.element_size()
    assert max(size for kind, size in executor.sizes if kind == "rows") < 1_000 + row
    # each worker process loads a payload at most once (2 workers x 3 payloads)
    assert 3 <= oracle.stats["worker_loads"] <= 6 < oracle.stats["tasks"]
    # a batch of thetas: each task carries its own rows, not the whole batch
    thetas = theta + 0.01 * torch.randn(96, theta.numel())
    executor.sizes.clear()
    values = oracle.losses(thetas)
    assert oracle.last_chunks == [(0, 64), (64, 96)]
    assert sum(size for _, size in executor.sizes) < 2 * 1_000 + 96 * row
    assert torch.equal(values, ParallelOracle(make(), block=16).losses(thetas))
    oracle.close()


def test_budget_is_enforced_before_anything_is_submitted():
    executor = Recording(InlineExecutor())
    oracle = ParallelOracle(CallableOracle(Bumpy(20), 20, budget=30), executor, transport="bytes")
    theta = torch.zeros(20)
    assert oracle.budget == 30
    oracle.coordinate_losses(theta, torch.arange(20), 1e-2)
    with pytest.raises(QueryBudgetExceeded, match="needs 20 queries but only 10"):
        oracle.coordinate_losses(theta, torch.arange(20), 1e-2)
    assert len(executor.sizes) == len(oracle.last_chunks)  # nothing more was submitted
    assert oracle.queries == 20 and oracle.stats["requests"] == 1
    oracle.losses(torch.zeros(10, 20))  # exactly the rest is fine
    assert oracle.queries == 30
    with pytest.raises(QueryBudgetExceeded):
        oracle.loss(theta)


def test_a_worker_error_names_its_chunk_and_only_finished_chunks_count():
    oracle = ParallelOracle(CallableOracle(FailsAt(13), 40), chunk_size=8, block=4)
    expected = (r"coordinate chunk 2/5 \(positions 8\.\.15 .*coordinates 8\.\.15\) "
                r".*ValueError: boom at coordinate 13")
    with pytest.raises(ChunkError, match=expected) as info:
        oracle.coordinate_losses(torch.zeros(40), torch.arange(40), 1.0)
    assert (info.value.chunk, info.value.start, info.value.stop) == (1, 8, 16)
    assert isinstance(info.value.__cause__, ValueError)
    assert oracle.queries == 32  # the inline executor ran the other four chunks


def test_a_non_finite_answer_is_refused_and_every_chunk_that_ran_counts():
    oracle = ParallelOracle(CallableOracle(NanAt(13), 40), chunk_size=8, block=4)
    coords = torch.arange(40).flip(0)  # positions are in the sorted request
    expected = r"1 of 8 losses were NaN or Inf \(first at query 13 of"
    with pytest.raises(NonFiniteLossError, match=expected):
        oracle.coordinate_losses(torch.zeros(40), coords, 1.0)
    assert oracle.queries == 40  # the inline executor ran all five chunks: all were spent


@pytest.mark.parametrize("executor", [PROCESSES, "dask-executor"], indirect=True)
def test_a_worker_error_in_another_process_names_its_chunk(executor):
    name, executor = executor
    oracle = ParallelOracle(CallableOracle(FailsAt(13), 40), executor, chunk_size=8, block=4)
    coords = torch.arange(40).flip(0)  # any order: chunks are over the sorted request
    expected = r"chunk 2/5 .*coordinates 8\.\.15\).*boom at coordinate 13"
    with pytest.raises(ChunkError, match=expected):
        oracle.coordinate_losses(torch.zeros(40), coords, 1.0)
    assert oracle.queries <= 32 and oracle.queries % 8 == 0
    # the pool and the wrapper still work afterwards
    values = oracle.coordinate_losses(torch.zeros(40), coords[coords != 13], 1.0)
    assert torch.equal(values, torch.ones(39))
    oracle.close()


def test_an_oracle_that_cannot_pickle_fails_before_submitting():
    import threading

    lock = threading.Lock()
    executor = Recording(cf.ThreadPoolExecutor(1))
    oracle = ParallelOracle(CallableOracle(lambda t, lock=lock: t.sum(), 3), executor)
    with pytest.raises(TypeError, match="does not pickle"):
        oracle.coordinate_losses(torch.zeros(3), [0, 1], 0.1)
    assert executor.sizes == [] and oracle.queries == 0
    executor.inner.shutdown()


# -- chunk sizing -------------------------------------------------------------------------------


def test_chunks_are_whole_blocks_and_worth_min_chunk_seconds():
    oracle = ParallelOracle(CallableOracle(Bumpy(8), 8), workers=2, block=4, min_chunk_seconds=0.05)
    # nothing measured yet: spread over workers x tasks_per_worker
    chunks = oracle._plan("coordinate", 200)
    assert len(chunks) == 8 and chunks[0] == (0, 28) and chunks[-1] == (196, 200)
    oracle.seconds_per_query["coordinate"] = 0.001  # 1 ms a query -> >= 50 queries a task
    for count in (200, 1000, 3):
        chunks = oracle._plan("coordinate", count)
        assert chunks[0][0] == 0 and chunks[-1][1] == count
        assert all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))
        assert all(a % 4 == 0 for a, _ in chunks)
        assert all(b - a >= 50 for a, b in chunks[:-1])
    assert len(oracle._plan("coordinate", 1000)) == 8  # big requests still use every worker
    oracle.seconds_per_query["coordinate"] = 0.2  # slow queries: one block a task is plenty
    assert oracle._plan("coordinate", 20) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    oracle.chunk_size = 10  # explicit: rounded up to whole blocks
    assert oracle._plan("coordinate", 30) == [(0, 12), (12, 24), (24, 30)]


# -- fits the rest of the engine ----------------------------------------------------------------


def test_trainer_takes_a_parallel_oracle_unchanged(pools):
    torch.manual_seed(0)
    learner = small_cnn().eval()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    results = []
    for wrap in (False, True):
        oracle = ModuleOracle(copy.deepcopy(learner), F.cross_entropy)
        if wrap:
            oracle = ParallelOracle(oracle, pools("threads"), chunk_size=200)
            assert oracle.bind(x, y) is oracle and oracle.dim == oracle.oracle.dim
        opt = torch.optim.SGD(oracle.parameters(), lr=0.1)
        Trainer(oracle, CGE(mu=1e-2), opt, progress=False).fit(TensorBatches(x, y, batch_size=16), epochs=1)
        results.append((oracle.theta(), oracle.queries))
    # same float32 math (up to chunk composition): equal to rounding after two SGD steps
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    assert results[0][1] == results[1][1] == 2 * (results[0][0].numel() + 1)


def dask_loaded(theta):
    return torch.tensor(float(any(m.split(".")[0] in ("dask", "distributed") for m in sys.modules)))


def test_dask_stays_optional_at_import(pools):
    # a fresh worker process imports deepzero_oracle.parallel (and this module, without its
    # fixtures) to run a chunk: Dask must not have come along
    oracle = ParallelOracle(CallableOracle(dask_loaded, 2), pools(PROCESSES), chunk_size=1, block=1)
    assert torch.equal(oracle.losses(torch.zeros(4, 2)), torch.zeros(4))
    oracle.close()


class Traced:
    """A black box holding a torch.fx GraphModule: unpickling it re-traces the module."""

    def __init__(self, seed):
        deep = nn.Sequential(small_cnn(), *[nn.Identity() for _ in range(200)])  # slow to trace
        self.gm = torch.fx.symbolic_trace(deep)
        self.x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __call__(self, theta):
        return self.gm(self.x * theta[0]).sum()


def test_thread_pool_never_loads_a_payload_while_another_chunk_runs_modules(pools):
    # Re-tracing patches nn.Module.__call__ process-wide: a module called by another thread
    # meanwhile fails ("module is not installed as a submodule"). Without the load gate this
    # fails on nearly every step: one thread loads the new state while the other, which
    # loaded it for the one-theta request, already evaluates.
    for step in range(5):
        oracle = ParallelOracle(CallableOracle(Traced(step), 4), pools("threads"), chunk_size=1,
                                block=1)
        oracle.loss(torch.ones(4))
        assert oracle.losses(torch.ones(32, 4)).shape == (32,)


def torch_threads(theta):
    return torch.tensor(float(torch.get_num_threads()))


def test_worker_threads_applies_to_worker_processes_only(pools):
    before = torch.get_num_threads()
    inline = ParallelOracle(CallableOracle(torch_threads, 2), worker_threads=before + 1)
    assert torch.equal(inline.losses(torch.zeros(3, 2)), torch.full((3,), float(before)))
    spawned = ParallelOracle(CallableOracle(torch_threads, 2), pools(PROCESSES), worker_threads=1,
                             chunk_size=1, block=1)
    assert torch.equal(spawned.losses(torch.zeros(6, 2)), torch.ones(6))
    assert torch.get_num_threads() == before
    spawned.close()
