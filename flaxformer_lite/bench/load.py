"""`bench load`: hf.load of a 1B-parameter random Llama, float32 shards on disk, bfloat16 in memory.

Two figures against their goals (docs/interop.md, "Large checkpoints"): the peak resident
memory the load adds to its process, against the bfloat16 parameters' bytes (goal: at
most 1.3x); and the load's time, against reading the same files' bytes (goal: at most 2x).

The checkpoint is written first, with numpy, as shards of --max-shard-size and their
index: names and shapes from transformers' LlamaForCausalLM built on the meta device (no
memory), random values. Each measurement runs in a fresh process (`python -m
flaxformer_lite.bench.load`), once with the host malloc tuned as the CLI tunes it and once
as glibc sets it, so baseline and peak are that process's own; the peak (VmHWM) is reset
through /proc/self/clear_refs right before the load. Cold: the files' pages are first
dropped from the page cache (posix_fadvise DONTNEED on those files only), so reading and
loading both start from the disk; warm: again, from the page cache. The read is plain
reads of every file's bytes into one 16 MiB buffer; the cold one is also timed past the
page cache (O_DIRECT), the way hf.load reads what the cache lacks. Each load is split into its parts, by
the CPU seconds (of all threads) spent in the functions doing them: setup (config.json,
the model's shapes), read (the reading thread's reads), allocate (mapping the parameters'
memory in), convert (`Map.rows_into`: transposes and casts), place (handing the buffers to
JAX); the parts overlap in time, so only their CPU seconds add up.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from flaxformer_lite.bench.measure import status_bytes
from flaxformer_lite.runtime import host

READ_BUFFER_BYTES = 16 << 20


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Checkpoint shape (Llama 3.2 1B's by default) and how it is stored and loaded."""
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--d-ff", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--max-shard-size", default="2GB", help="shard size of the float32 files written")
    parser.add_argument("--param-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--devices", type=int, default=1,
                        help="load onto an fsdp mesh of this many (simulated CPU) devices; 1: the default device")
    parser.add_argument("--folder", metavar="DIR",
                        help="write the checkpoint here and keep it (reused when it matches); default: a temporary "
                             "folder removed after")
    parser.add_argument("--seed", type=int, default=0)


def _hf_config(args: argparse.Namespace):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.d_model // args.heads, max_position_embeddings=8192, tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"], dtype="float32",
    )


def _write_checkpoint(folder: pathlib.Path, args: argparse.Namespace) -> list[pathlib.Path]:
    """The random checkpoint's weight files (written unless `folder` already holds the same)."""
    import torch
    import transformers

    from flaxformer_lite.interop import weights

    config = _hf_config(args)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if name != "lm_head.weight"}
    folder.mkdir(parents=True, exist_ok=True)
    expected = json.dumps({"config": config.to_dict(), "shard": args.max_shard_size, "seed": args.seed}, sort_keys=True)
    stamp = folder / "bench_load.json"
    if stamp.is_file() and stamp.read_text() == expected:
        index = folder / weights.INDEX_FILE
        names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {weights.WEIGHTS_FILE}
        return sorted(folder / name for name in names)
    stamp.unlink(missing_ok=True)
    rng = np.random.default_rng(args.seed)

    def random(shape):
        x = rng.random(shape, np.float32)
        x -= 0.5
        x *= 0.04
        return x

    tensors = {name: weights.Pending(shape, np.dtype(np.float32), lambda s=shape: random(s))
               for name, shape in shapes.items()}
    config.save_pretrained(folder)
    files = weights.write(folder, tensors, args.max_shard_size, total_parameters=sum(map(math.prod, shapes.values())))
    for file in files:  # written through, so the cold reads below can drop the pages
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
    stamp.write_text(expected)
    return files


# ---------------------------------------------------------------------------------- measuring (child process)


def _drop_cached(files: list[pathlib.Path]) -> None:
    for file in files:
        with open(file, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn) -> tuple[object, float, float]:
    """(fn(), wall seconds, CPU seconds of all this process's threads)."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall, _cpu_seconds() - cpu


def _read(files: list[pathlib.Path]) -> None:
    buffer = bytearray(READ_BUFFER_BYTES)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _read_direct(files: list[pathlib.Path]) -> None:
    """The same bytes read past the page cache, as hf.load reads what the cache lacks."""
    from flaxformer_lite.interop.weights import _File

    buffer = _File.buffer(READ_BUFFER_BYTES)
    for path in files:
        file, size = _File(path), path.stat().st_size
        for offset in range(0, size, READ_BUFFER_BYTES):
            file.read(buffer, offset, min(READ_BUFFER_BYTES, size - offset), "-")
        file.close()


class _Parts:
    """CPU seconds of all threads in each part of hf.load, from wrappers around the
    functions that do each part (in the measuring process only)."""

    def __init__(self):
        from flaxformer_lite.interop import hf, layout, weights

        self.cpu: collections.Counter = collections.Counter()
        self.read_wall = 0.0
        self._lock = threading.Lock()
        self._wrap(weights.Checkpoint, "read", "read")
        self._wrap(host, "empty", "allocate")
        self._wrap(layout.Map, "rows_into", "convert")
        self._wrap(hf, "_place", "place")

    def _wrap(self, owner, attr: str, part: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.cpu[part] += time.thread_time() - cpu
                    if part == "read":
                        self.read_wall += time.perf_counter() - wall

        setattr(owner, attr, timed)

    def take(self, load_cpu: float) -> dict:
        """The parts since the last take; 'other': the rest of the load's CPU seconds."""
        parts = {k: round(self.cpu[k], 4) for k in ("read", "allocate", "convert", "place")}
        parts["other"] = round(load_cpu - sum(self.cpu.values()), 4)
        parts["read_wall"] = round(self.read_wall, 4)
        self.cpu.clear()
        self.read_wall = 0.0
        return parts


def _measure(spec: dict) -> dict:
    """One process's figures: read and load, cold then warm; peak RSS of the cold load."""
    tuned = host.tune_malloc() if spec["tune_malloc"] else False
    import jax

    from flaxformer_lite.config import ParallelConfig
    from flaxformer_lite.interop import hf
    from flaxformer_lite.runtime import parallel

    files = [pathlib.Path(f) for f in spec["files"]]
    pcfg = ParallelConfig(data=1, fsdp=-1, tensor=1)
    mesh = parallel.make_mesh(pcfg) if spec["devices"] > 1 else None

    def load():
        return hf.load(spec["folder"], param_dtype=spec["param_dtype"], mesh=mesh, parallel=pcfg)[1]

    parts = _Parts()
    out = {"malloc_tuned": tuned, "devices": len(jax.devices())}
    _drop_cached(files)
    _, out["read_cold_s"], out["read_cold_cpu_s"] = _timed(lambda: _read(files))
    _drop_cached(files)
    _, out["read_direct_s"], out["read_direct_cpu_s"] = _timed(lambda: _read_direct(files))
    _drop_cached(files)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    baseline = status_bytes("VmRSS")
    params, out["load_cold_s"], out["load_cold_cpu_s"] = _timed(load)
    out["load_cold_parts"] = parts.take(out["load_cold_cpu_s"])
    out["baseline_rss_bytes"] = baseline
    out["peak_above_baseline_bytes"] = status_bytes("VmHWM") - baseline
    out["after_above_baseline_bytes"] = status_bytes("VmRSS") - baseline
    out["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
    del params
    gc.collect()
    _read(files)  # the cold load read past the page cache: fill it
    _, out["read_warm_s"], out["read_warm_cpu_s"] = _timed(lambda: _read(files))
    _, out["load_warm_s"], out["load_warm_cpu_s"] = _timed(load)
    out["load_warm_parts"] = parts.take(out["load_warm_cpu_s"])
    return out


def _run_child(spec: dict) -> dict:
    env = dict(os.environ)
    env[host.TUNE_ENV] = "1" if spec["tune_malloc"] else "0"
    if spec["devices"] > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={spec['devices']}"
    done = subprocess.run([sys.executable, "-m", "flaxformer_lite.bench.load", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench load: the measuring process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- report


def run_load(args: argparse.Namespace) -> dict:
    """Write the checkpoint, measure in two fresh processes (malloc tuned, glibc's), report."""
    if not os.path.exists("/proc/self/clear_refs") or not hasattr(os, "posix_fadvise"):
        raise SystemExit("bench load measures with /proc/self/clear_refs and posix_fadvise: Linux only")
    folder = pathlib.Path(args.folder) if args.folder else pathlib.Path(tempfile.mkdtemp(prefix="ffl_bench_load_"))
    try:
        start = time.perf_counter()
        files = _write_checkpoint(folder, args)
        write_s = time.perf_counter() - start
        file_bytes = sum(f.stat().st_size for f in files)
        runs = {}
        for name, tune in (("tuned", True), ("glibc", False)):
            spec = {"folder": str(folder), "files": [str(f) for f in files], "param_dtype": args.param_dtype,
                    "devices": args.devices, "tune_malloc": tune}
            runs[name] = {"load_average_1m": round(os.getloadavg()[0], 2), **_run_child(spec)}
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    param_bytes = runs["tuned"]["param_bytes"]
    print(f"random Llama: {param_bytes // np.dtype(args.param_dtype).itemsize:,} parameters, {file_bytes / 1e9:.2f} GB "
          f"float32 in {len(files)} file(s) (written in {write_s:.0f} s) -> {param_bytes / 1e9:.2f} GB "
          f"{args.param_dtype} on {args.devices} device(s)")
    print("seconds wall (CPU: all threads); cold: the files' pages dropped from the page cache first")
    print(f"{'malloc':7} {'load':>5} {'read cold':>13} {'load cold':>14} {'ratio':>6} {'read warm':>13} "
          f"{'load warm':>14} {'ratio':>6} {'peak RSS added':>15} {'/ params':>9} {'RSS kept':>9}")
    for name, r in runs.items():
        r["cold_ratio"] = round(r["load_cold_s"] / r["read_cold_s"], 2)
        r["warm_ratio"] = round(r["load_warm_s"] / r["read_warm_s"], 2)
        r["peak_ratio"] = round(r["peak_above_baseline_bytes"] / param_bytes, 3)
        cells = [f"{r[f'{what}_s']:5.1f} ({r[f'{what}_cpu_s']:4.1f})" for what in ("read_cold", "load_cold")]
        cells += [f"{r['cold_ratio']:5.2f}x"]
        cells += [f"{r[f'{what}_s']:5.1f} ({r[f'{what}_cpu_s']:4.1f})" for what in ("read_warm", "load_warm")]
        cells += [f"{r['warm_ratio']:5.2f}x"]
        print(f"{name:7} {r['load_average_1m']:5.1f} {cells[0]:>13} {cells[1]:>14} {cells[2]:>6} {cells[3]:>13} "
              f"{cells[4]:>14} {cells[5]:>6} {r['peak_above_baseline_bytes'] / 1e9:12.2f} GB "
              f"{r['peak_ratio']:8.2f}x {r['after_above_baseline_bytes'] / 1e9:6.2f} GB")
        print(f"{'':13} read cold past the page cache (O_DIRECT, as the load reads): {r['read_direct_s']:.1f} s "
              f"({r['read_direct_cpu_s']:.1f} CPU): the cold load took {r['load_cold_s'] / r['read_direct_s']:.2f}x that")
        for when in ("cold", "warm"):
            p = r[f"load_{when}_parts"]
            print(f"{'':13} {when} load, CPU s by part: read {p['read']:.1f} (the reading went on {p['read_wall']:.1f} s "
                  f"of the load's {r[f'load_{when}_s']:.1f}), allocate {p['allocate']:.1f}, convert {p['convert']:.1f}, "
                  f"place {p['place']:.1f}, other (setup, JAX) {p['other']:.1f}")
    print("goals: peak RSS added at most 1.3x the parameters' bytes; load at most 2x the read")
    return {"model": {"layers": args.layers, "d_model": args.d_model, "d_ff": args.d_ff, "heads": args.heads,
                      "kv_heads": args.kv_heads, "vocab": args.vocab, "param_dtype": args.param_dtype},
            "files": len(files), "file_bytes": file_bytes, "param_bytes": param_bytes, "write_s": round(write_s, 1),
            "runs": runs}


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
