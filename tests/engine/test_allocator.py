"""retain_freed_memory: freed tensor pages are reused instead of faulted in again."""

import functools
import os
import subprocess
import sys

import pytest

from deepzero_oracle import retain_freed_memory
from deepzero_oracle.allocator import OPT_OUT

# 20 rounds of allocating, writing and freeing 64 MiB; prints whether retaining took effect, the
# page faults the rounds took, and the fast path's chunk budget before and after
ROUNDS = """
import resource, torch
from deepzero_oracle import retain_freed_memory
from deepzero_oracle.allocator import freed_memory_retained
from deepzero_oracle.fastpath import default_working_set
retained_before, chunks_before = freed_memory_retained(), default_working_set()
applied = retain_freed_memory()
torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults, retained_before, chunks_before, freed_memory_retained(), default_working_set())
"""


@functools.lru_cache(maxsize=None)
def _rounds(env_value: str) -> tuple[str, ...]:
    env = dict(os.environ, **{OPT_OUT: env_value})
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, check=True)
    return tuple(out.stdout.split())


def _faults(env_value: str) -> tuple[str, int]:
    applied, faults = _rounds(env_value)[:2]
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is a Linux feature")
def test_retained_memory_is_reused_without_page_faults():
    applied, retained = _faults("")
    if applied != "True":
        pytest.skip("this C library has no mallopt (not glibc)")
    skipped, default = _faults("default")
    assert skipped == "False"
    # by default each round maps 64 MiB afresh (16,384 pages of 4 KiB); retained, it reuses them
    assert default > 20 * 8000, default
    assert retained < default / 10, (retained, default)


@pytest.mark.parametrize("limit_mb", [0, -1, 2048])
def test_a_limit_outside_what_mallopt_takes_is_refused(limit_mb):
    with pytest.raises(ValueError, match="1..2047"):
        retain_freed_memory(limit_mb)


def test_the_opt_out_variable_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT, "default")
    assert retain_freed_memory() is False


@pytest.mark.parametrize("env_value", ["", "default"])
def test_chunks_grow_to_the_whole_cache_only_while_freed_memory_is_retained(env_value):
    applied, _, retained_before, before, retained_after, after = _rounds(env_value)
    assert retained_before == "False" and retained_after == applied
    # large blocks come back as fresh pages unless retained: chunks stay at a quarter then
    assert float(after) == (4 * float(before) if applied == "True" else float(before))
    if env_value == "default":
        assert applied == "False"
