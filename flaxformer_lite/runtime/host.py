"""The host process's memory: keep XLA:CPU's per-step buffers mapped; large host arrays
JAX adopts, mapped in at once (`empty`); and its cache folder (`cache_root`).

On the CPU, every call of a compiled XLA program allocates its temporary buffer (all
intermediate activations of a training step: 405 MiB for the `bench train` GPT-2) and
frees it on return. glibc's malloc serves a block that large with a fresh `mmap` and
unmaps it on free, so each step faults every page of it back in: 110,000 page faults
and about 300 ms of kernel time a step there, a fifth of the CPU time (docs/performance-notes.md,
"The host allocator"). The same holds for PyTorch on the CPU.

`tune_malloc()` makes glibc keep such blocks: one arena for all threads (XLA's worker
threads otherwise get arenas that must `mmap` anything over 64 MiB), no `mmap` for large
blocks, and the top of the heap returned to the system only past 2 GiB free. The step's
buffer is then faulted in once and reused. The cost is memory: freed blocks stay mapped,
so the process would keep the high-water mark of whatever ran before; after every XLA
compilation (the biggest transient user of host memory) `release_free_memory()` (glibc
`malloc_trim`) hands the heap's free pages back to the system. Programs dispatched back
to back would each take a buffer of their own, which the heap then keeps: single-device
programs run in the calling thread (JAX's `jax_cpu_enable_async_dispatch` off), so a
call returns once its buffer is free, and `one_program_at_a_time()` waits for the
program ahead where dispatch stays asynchronous (programs over several devices).

The settings must be made before JAX starts its threads: the command line does it
first thing for the commands that run programs (train, eval, generate, embed, bench).
A library user calls `tune_malloc()` at the top of the script, or sets the same in the
environment before Python starts:

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647

Nothing is changed off glibc (macOS, musl), when JAX has an accelerator plugin to run
on (the big buffers live in device memory there) unless JAX_PLATFORMS=cpu, when the
environment already configures malloc (MALLOC_* variables, glibc.malloc tunables, an
LD_PRELOADed allocator), or with FLAXFORMER_LITE_TUNE_MALLOC=0.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import math
import mmap
import os
import pathlib
import pkgutil
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import numpy as np

TUNE_ENV = "FLAXFORMER_LITE_TUNE_MALLOC"
CACHE_ENV = "FLAXFORMER_LITE_CACHE"
# mallopt parameters (glibc malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
SERVE_TRIM_THRESHOLD = 64 * 2**20  # tune_malloc_for_serving(): free heap top kept at most
# Environment variables through which a user has already chosen the allocator's behaviour.
USER_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                   "MALLOC_TOP_PAD_", "MALLOC_ARENA_TEST")

# jax.monitoring event recorded when a jitted program has been compiled (or loaded from
# the persistent cache); JAX's name for it is jax._src.dispatch.BACKEND_COMPILE_EVENT.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

log = logging.getLogger(__name__)
_tuned = False


@functools.cache
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None  # not glibc: musl, macOS, Windows
    return libc


def _accelerator_plugin() -> bool:
    """Whether JAX will find a GPU/TPU plugin (without starting JAX), unless JAX_PLATFORMS=cpu."""
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower() == "cpu":
        return False
    if importlib.util.find_spec("libtpu") is not None:
        return True
    spec = importlib.util.find_spec("jax_plugins")
    return spec is not None and any(True for _ in pkgutil.iter_modules(spec.submodule_search_locations))


def _skip_reason() -> Optional[str]:
    if os.environ.get(TUNE_ENV, "1") == "0":
        return f"{TUNE_ENV}=0"
    user = [name for name in USER_MALLOC_ENV if name in os.environ]
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        user.append("LD_PRELOAD")
    if user:
        return f"the environment configures malloc ({', '.join(user)})"
    if _accelerator_plugin():
        return "JAX has an accelerator plugin (set JAX_PLATFORMS=cpu to tune for the CPU)"
    return None


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def tune_malloc() -> bool:
    """Make glibc's malloc keep large freed blocks mapped (see the module docstring).

    Returns whether the settings were applied (False: not glibc, or left to the
    environment, or turned off). Call it before JAX runs anything: threads that have
    already allocated keep their own arenas, and a warning says so.
    """
    global _tuned
    if _tuned:
        return True
    libc = _glibc()
    reason = "not glibc" if libc is None else _skip_reason()
    if reason is not None:
        log.info("host malloc left as is: %s", reason)
        return False
    threads = _thread_count()
    if threads > 1:
        log.warning("tune_malloc() called with %d threads running: those that have allocated keep their own "
                    "arenas, and XLA's step buffers may still be mapped afresh every step. Call it before JAX "
                    "runs anything, or set MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 "
                    "MALLOC_TRIM_THRESHOLD_=2147483647 in the environment.", threads)
    for param, value in SETTINGS:
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc mallopt({param}, {value}) failed; set {TUNE_ENV}=0 to leave malloc as is")
    _tuned = True
    import jax  # after mallopt: importing JAX starts a thread

    # A program's outputs are ready a moment before its thread frees the temporary
    # buffer, so a next program dispatched at once took a second buffer (and the heap
    # kept it): run single-device programs in the calling thread, which returns only
    # once the buffer is free. Read when the CPU client is made, so before JAX runs.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    jax.monitoring.register_event_duration_secs_listener(_release_after_compile)
    return True


def _release_after_compile(event: str, duration_secs: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
        release_free_memory()


def tune_malloc_for_serving() -> bool:
    """Serving's malloc: tune_malloc()'s, but free memory beyond SERVE_TRIM_THRESHOLD at
    the top of the heap goes back to the system, as it is freed.

    A server's peaks come from requests (a large body parsed and tokenized, then refused)
    and would otherwise be kept for good: ten refused 2 MB prompts left a server 500 MiB
    larger. A ServingHeap, polled by the server, returns the free pages inside the heap
    too. Returns whether anything was changed (only on top of tune_malloc()).
    """
    if not _tuned:
        return False
    if _glibc().mallopt(M_TRIM_THRESHOLD, SERVE_TRIM_THRESHOLD) != 1:
        raise RuntimeError(f"glibc mallopt({M_TRIM_THRESHOLD}, {SERVE_TRIM_THRESHOLD}) failed; set {TUNE_ENV}=0")
    return True


def resident_bytes() -> int:
    """The process's resident memory (RSS) in bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except OSError:
        return 0


class ServingHeap:
    """Hands free heap pages back whenever the process has grown `slack` bytes past its
    size when made (after the server's warm-up): `poll()` it every second or so.

    malloc_trim walks the heap's free chunks; it is polled rather than called per request
    because a server does not know when a request's memory (its body, its tokens, parsed
    by other libraries) has been freed.
    """

    def __init__(self, slack: int = SERVE_TRIM_THRESHOLD):
        self.baseline, self.slack, self.trims = resident_bytes(), slack, 0

    def poll(self) -> bool:
        """Trim if grown (see the class); returns whether it trimmed."""
        if not _tuned or resident_bytes() <= self.baseline + self.slack:
            return False
        self.trims += 1
        return release_free_memory()


def malloc_tuned() -> bool:
    """Whether tune_malloc() applied its settings in this process."""
    return _tuned


def one_program_at_a_time(running: Any) -> None:
    """Wait for `running` (a dispatched program's outputs) when tune_malloc() is on.

    XLA:CPU takes a program's temporary buffer from malloc as the program starts and
    frees it as it ends. Programs dispatched back to back (a training loop's steps,
    evaluation batches) start before the one ahead has freed its buffer, so each takes a
    new one; on the tuned heap those stay mapped, and `gpt_tiny` kept four 255 MiB step
    buffers. Waiting for the program ahead keeps fewer: its outputs are ready a moment
    before its thread frees the buffer, which is why tune_malloc() also makes
    single-device programs run in the calling thread (they have ended when the call
    returns, and this wait costs nothing); the wait matters for programs over several
    devices, which are still dispatched asynchronously. Make the next inputs before the
    wait, so the host's work still overlaps the device's.
    Nothing is waited for with glibc's defaults or on an accelerator.
    """
    if _tuned and running is not None:
        import jax

        jax.block_until_ready(running)


def release_free_memory() -> bool:
    """Return the heap's free pages to the system (glibc malloc_trim) when tune_malloc() is on.

    With the tuned settings nothing else shrinks the heap, so a process keeps what a
    phase once needed (tune_malloc() calls this after every XLA compilation; call it
    after loading a large checkpoint, say). The next use of a released block faults its
    pages in again. Returns whether anything was done.
    """
    if not _tuned:
        return False
    _glibc().malloc_trim(0)
    return True


# Below this, empty() takes its memory from malloc: a mapping of its own is not worth a system call.
POPULATE_MIN_BYTES = 1 << 20


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """np.empty, 64-byte aligned, and mapped in before it is written.

    Aligned, a CPU device adopts the array without a copy (`jax.device_put`; numpy's own
    large arrays start 16 bytes into a page, and are copied). Mapped in: an array of
    POPULATE_MIN_BYTES or more is a mapping of its own made with MAP_POPULATE, so the
    kernel provides all its pages in one call instead of one page fault per 4 KiB as they
    are first written: on the 2-core VM of BENCHMARKS.md 0.36 to 0.44 CPU seconds a GB
    against 0.7 to 1.9 (docs/performance-notes.md, "Loading a checkpoint"). The mapping
    goes back to the system when the array (or whatever adopted it) is freed, whatever
    the malloc settings. Elsewhere than Linux, only the alignment.
    """
    import numpy as np  # here: numpy's BLAS starts threads, and tune_malloc() must come before any

    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size >= POPULATE_MIN_BYTES and hasattr(mmap, "MAP_POPULATE"):
        pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        return np.frombuffer(pages, dtype, math.prod(shape)).reshape(shape)
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size].view(dtype).reshape(shape)


def cache_root() -> pathlib.Path:
    """$FLAXFORMER_LITE_CACHE, else $XDG_CACHE_HOME/flaxformer_lite, else ~/.cache/flaxformer_lite.

    Prepared corpora (data/preparation.py) and XLA's compiled programs (cli.py) live under it.
    """
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "flaxformer_lite"
