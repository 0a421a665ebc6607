"""flaxformer_lite.runtime.host: glibc malloc keeps large freed blocks mapped, so a block freed and
allocated again (XLA:CPU's step buffer) costs no page faults; settings are left alone where
the user or the platform says so."""

import mmap
import os
import resource
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from flaxformer_lite.runtime import host

glibc = pytest.mark.skipif(host._glibc() is None, reason="glibc's malloc only (Linux)")

# A worker thread mallocs a 128 MiB block, writes every page and frees it, three times,
# as XLA's threads do with a step's temporary buffer (numpy is no stand-in: it asks for
# huge pages); the child prints the page faults of the last two rounds. Under glibc's
# defaults each round maps the block afresh: 65,536 faults here, fewer where the kernel
# gives every mapping huge pages.
CHILD = """
import ctypes, resource, threading
from flaxformer_lite.runtime import host
tuned = host.tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def rounds():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(128 * 2**20)
        ctypes.memset(block, 1, 128 * 2**20)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start(); worker.join()
print(tuned, faults[1] + faults[2])
"""
PAGES = 2 * 128 * 2**20 // 4096  # pages written in the two rounds counted


def _child(**env):
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run_env.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD], env=run_env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@glibc
def test_tuned_malloc_reuses_a_freed_block_without_page_faults():
    tuned, faults = _child(FLAXFORMER_LITE_TUNE_MALLOC="1", JAX_PLATFORMS="cpu")
    default, default_faults = _child(FLAXFORMER_LITE_TUNE_MALLOC="0")
    assert tuned and not default
    assert faults < PAGES // 100, faults
    assert default_faults > faults, (default_faults, faults)  # glibc maps the block afresh each round


@glibc
@pytest.mark.parametrize("env, reason", [
    ({"FLAXFORMER_LITE_TUNE_MALLOC": "0"}, "FLAXFORMER_LITE_TUNE_MALLOC=0"),
    ({"MALLOC_ARENA_MAX": "4"}, "MALLOC_ARENA_MAX"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "LD_PRELOAD"),
])
def test_left_alone_where_the_environment_decides(monkeypatch, env, reason):
    monkeypatch.setenv("FLAXFORMER_LITE_TUNE_MALLOC", "1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert reason in host._skip_reason()
    assert host.tune_malloc() is False and host.malloc_tuned() is False
    assert host.release_free_memory() is False  # nothing to undo on an untuned heap


def test_accelerator_plugins_keep_glibc_defaults_unless_jax_is_told_cpu(monkeypatch):
    monkeypatch.setenv("FLAXFORMER_LITE_TUNE_MALLOC", "1")
    monkeypatch.setattr(host.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    monkeypatch.setenv("JAX_PLATFORMS", "")
    assert "accelerator plugin" in host._skip_reason()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host._skip_reason() is None


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setenv("FLAXFORMER_LITE_TUNE_MALLOC", "1")
    monkeypatch.setattr(host, "_glibc", lambda: None)
    assert host.tune_malloc() is False


WAIT_CHILD = """
import jax, jax.numpy as jnp
from flaxformer_lite.runtime import host
tuned = host.tune_malloc()
x = jax.random.normal(jax.random.key(0), (512, 512))
running = jax.jit(lambda a: jnp.tanh(a @ a) @ a)(x)
host.one_program_at_a_time(running)
print(tuned, running.is_ready())
"""


@glibc
def test_one_program_at_a_time_waits_for_the_program_ahead_on_a_tuned_heap():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(FLAXFORMER_LITE_TUNE_MALLOC="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", WAIT_CHILD], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr
    host.one_program_at_a_time(None)  # nothing dispatched yet: nothing to wait for


# A program with a temporary buffer several times its output: when the call returns
# (no wait), the program has run and its buffer is back in the heap, so the next one
# reuses it rather than taking another that the tuned heap would keep.
RETURN_CHILD = """
import ctypes, jax, jax.numpy as jnp
from flaxformer_lite.runtime import host
tuned = host.tune_malloc()
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
step = jax.jit(lambda a: jnp.tanh(jnp.tanh(a @ a) @ a) @ a)
x = jax.random.normal(jax.random.key(0), (1024, 1024))
temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
jax.block_until_ready(step(x))
before = libc.mallinfo2().uordblks
y = step(x)
print(tuned, y.is_ready(), temp, libc.mallinfo2().uordblks - before - y.nbytes)
"""


@glibc
@pytest.mark.skipif(not hasattr(host._glibc(), "mallinfo2"), reason="glibc 2.33 or later (mallinfo2)")
def test_on_a_tuned_heap_a_program_has_freed_its_buffer_when_its_call_returns():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(FLAXFORMER_LITE_TUNE_MALLOC="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", RETURN_CHILD], env=env, capture_output=True, text=True, check=True)
    tuned, ready, temp, held = out.stdout.split()
    assert (tuned, ready) == ("True", "True"), out.stdout + out.stderr
    assert int(temp) >= 4 * 2**20 and int(held) < int(temp) // 4, out.stdout


def test_empty_is_aligned_adopted_by_jax_and_mapped_in_before_it_is_written():
    rng = np.random.default_rng(0)
    small = host.empty((3, 5), np.float32)
    big = host.empty((4, host.POPULATE_MIN_BYTES), ml_dtypes.bfloat16)  # 8 MiB
    assert (small.shape, small.dtype, big.shape, big.dtype) == ((3, 5), np.float32, (4, host.POPULATE_MIN_BYTES),
                                                                ml_dtypes.bfloat16)
    assert small.ctypes.data % 64 == 0 and big.ctypes.data % 64 == 0
    values = rng.standard_normal(big.shape).astype(big.dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    big[...] = values
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if hasattr(mmap, "MAP_POPULATE"):
        assert faults < big.nbytes // mmap.PAGESIZE // 100, faults
    placed = jax.device_put(big)
    assert placed.unsafe_buffer_pointer() == big.ctypes.data  # adopted, not copied
    np.testing.assert_array_equal(np.asarray(placed), values)
