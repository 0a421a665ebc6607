"""Where a compiled step's time goes: a jax.profiler trace reduced to a table of XLA ops.

Each op's time is summed over the threads (CPU) or streams (GPU) it ran on and divided
by the number of steps traced. Ops are sorted into a phase by the JAX name XLA keeps in
their metadata (forward `jvp(...)`, backward `transpose(jvp(...))`, anything else: the
optimizer and bookkeeping) and into a kind by their name (matrix multiplications, layout
copies and transposes, other fusions). The trace folder opens in TensorBoard or Perfetto.
"""

from __future__ import annotations

import collections
import pathlib
import re

# Op-name prefixes of library matrix multiplications: XLA:CPU's YNNPACK/XNNPACK/oneDNN
# fusions and plain dots; cuBLAS/cuDNN/Triton GEMMs on GPU.
MATMUL = ("ynn_fusion", "xnn_fusion", "onednn", "dot", "gemm", "cublas", "cudnn", "triton_gemm", "custom-call")
SKIP = ("ThunkExecutor", "Await", "Threadpool")  # scheduling events around the ops


def _kind(name: str) -> str:
    if name.startswith(MATMUL):
        return "matmul"
    return "copy/transpose" if "copy" in name or "transpose" in name else "other"


def _phase(op_name: str) -> str:
    if "transpose(jvp" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "optimizer/other"


def _op_events(trace_dir: pathlib.Path):
    """(op name, nanoseconds) of every XLA op execution in the trace."""
    import jax

    files = sorted(trace_dir.glob("**/*.xplane.pb"))
    if not files:
        raise RuntimeError(f"no .xplane.pb under {trace_dir}: the profiler wrote no trace")
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "XLA Ops" or "XLAEigen" in line.name or "PjRtCpuClient" in line.name:
                for event in line.events:
                    if not any(word in event.name for word in SKIP):
                        yield event.name, event.duration_ns


def profile_step(compiled, run_steps, steps: int, trace_dir: str | pathlib.Path, top: int = 15) -> dict:
    """Trace `run_steps(steps)` (which runs `compiled` and blocks) and tabulate its ops."""
    import jax

    trace_dir = pathlib.Path(trace_dir)
    with jax.profiler.trace(str(trace_dir)):
        run_steps(steps)
    hlo = compiled.as_text()
    names = dict(re.findall(r"\n\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo))
    per_op = collections.Counter()
    for name, ns in _op_events(trace_dir):
        per_op[name] += ns / steps / 1e6
    total = sum(per_op.values())
    split = collections.Counter()
    for name, ms in per_op.items():
        split[(_phase(names.get(name, "")), _kind(name))] += ms
    return {
        "trace_dir": str(trace_dir),
        "op_ms_per_step": total,
        "split": [{"phase": p, "kind": k, "ms_per_step": ms} for (p, k), ms in sorted(split.items())],
        "top_ops": [{"op": name, "ms_per_step": ms, "kind": _kind(name), "jax_name": names.get(name, "")}
                    for name, ms in per_op.most_common(top)],
    }


def format_profile(p: dict) -> list[str]:
    """Markdown tables of a profile_step result."""
    total = p["op_ms_per_step"]
    lines = ["", f"profile ({p['trace_dir']}): {total:.0f} ms of XLA ops a step, summed over threads", "",
             "| phase | kind | ms/step | share |", "|---|---|---|---|"]
    lines += [f"| {s['phase']} | {s['kind']} | {s['ms_per_step']:.1f} | {100 * s['ms_per_step'] / total:.0f}% |"
              for s in p["split"]]
    lines += ["", "| op | kind | ms/step | JAX name |", "|---|---|---|---|"]
    lines += [f"| {o['op']} | {o['kind']} | {o['ms_per_step']:.1f} | {o['jax_name'][-70:]} |" for o in p["top_ops"]]
    return lines
