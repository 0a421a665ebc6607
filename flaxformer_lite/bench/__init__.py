"""`flaxformer-lite bench NAME`: named benchmarks, each printing its figures (JSON with --json).

A benchmark is a module of this package and an entry in BENCHMARKS, name -> (module,
prefix, help), as in cli.COMMANDS: its module defines `add_<prefix>_arguments(parser)`
and `run_<prefix>(args) -> dict`, which prints a report and returns JSON-able results.
Add one by adding a module and an entry.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pathlib
import platform

from flaxformer_lite.bench.measure import one_cpu
from flaxformer_lite.runtime import host

BENCHMARKS = {
    "decode": (
        "flaxformer_lite.bench.decode", "decode",
        "greedy decoding on a random GPT-2: tokens/s against transformers' generate, per-token time by position",
    ),
    "load": (
        "flaxformer_lite.bench.load", "load",
        "hf.load of a 1B random Llama, float32 shards into bfloat16: peak host RSS and time against reading the files",
    ),
    "train": (
        "flaxformer_lite.bench.train", "train",
        "training step on a random GPT-2 against transformers + torch AdamW: tokens/s, MFU, compile time, remat memory",
    ),
    "eval": (
        "flaxformer_lite.bench.lm_eval", "lm_eval",
        "eval --tasks against lm-eval's own hf model on a local multiple-choice task, same random Llama folder: "
        "seconds per round and accuracy",
    ),
    "serve": (
        "flaxformer_lite.bench.serve", "serve",
        "the HTTP server under N concurrent streaming clients against one at a time: tokens/s, TTFT, ITL, "
        "compilations and memory over many requests",
    ),
}


def _entry(name: str):
    module, prefix, _ = BENCHMARKS[name]
    module = importlib.import_module(module)
    return getattr(module, f"add_{prefix}_arguments"), getattr(module, f"run_{prefix}")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per benchmark, each with its own flags and --json."""
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, (_, _, help_text) in BENCHMARKS.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        bench_parser.add_argument("--json", metavar="FILE", help="also write the results here as JSON")
        _entry(name)[0](bench_parser)


def run_bench(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; write its results to --json if given."""
    load_before = os.getloadavg()[0]
    with contextlib.suppress(ImportError):  # the benchmark says what it needs
        import transformers

        transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bars
    single = getattr(args, "single_thread", False)
    with one_cpu() if single else contextlib.nullcontext():
        cpus_used = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        results = _entry(args.benchmark)[1](args)
    # Other work on a shared machine moves every figure: record how busy it was.
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpus_used": cpus_used,
        "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        # Both frameworks share the process, so both run with the same allocator settings.
        "host_malloc_tuned": host.malloc_tuned(),
    }
    print(f"machine: {os.cpu_count()} CPUs ({cpus_used} used), 1-minute load average {load_before:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; host malloc "
          + ("tuned for both frameworks (flaxformer_lite.runtime.host)" if host.malloc_tuned() else "as glibc sets it"))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
