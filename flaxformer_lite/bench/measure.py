"""Measuring helpers every benchmark shares: wall times (median, interleaved between
frameworks), this process's memory, and pinning the process to one CPU.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time


def _set_affinity(cpus: set) -> None:
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(thread), cpus)


@contextlib.contextmanager
def one_cpu():
    """Run every thread of this process (XLA's pools, torch's) on one CPU, torch with one
    thread; restore both after.

    XLA's own flags for this (`--xla_cpu_multi_thread_eigen=false`) leave its matmul
    library on every CPU; pinning the process does not. On one CPU, a traced step's op
    times add up to the step (bench.profile). Linux only.
    """
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        raise SystemExit("--single-thread pins the process to one CPU, which needs Linux (os.sched_setaffinity); "
                         "run without it")
    try:
        import torch
    except ImportError:  # the benchmark says what it needs
        torch = None
    threads = torch.get_num_threads() if torch else None
    before = os.sched_getaffinity(0)
    _set_affinity({min(before)})
    if torch:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        _set_affinity(before)
        if torch:
            torch.set_num_threads(threads)


def status_bytes(key: str) -> int:
    """A byte count of this process's /proc/self/status (VmRSS, VmHWM, ...; Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls (fn blocks until its result exists)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(fns: dict, repeats: int) -> dict:
    """name -> wall times of `repeats` rounds, each round calling every fn once in turn.

    Load on a shared machine drifts over seconds; taking the frameworks' timings in
    alternation, not one block after the other, makes that drift hit each side alike.
    """
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
