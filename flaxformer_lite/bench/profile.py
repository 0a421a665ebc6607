"""Where a compiled step's time goes: a jax.profiler trace reduced to a table of XLA ops.

Each op's time is summed over the threads (CPU) or streams (GPU) it ran on and divided
by the number of steps (or tokens) traced. Ops are sorted into a phase by the JAX name
XLA keeps in their metadata and into a kind by their name (matrix multiplications,
layout copies and transposes, other fusions). Training phases: forward `jvp(...)`,
backward `transpose(jvp(...))`, anything else (the optimizer and bookkeeping). Decoding
phases: the token loop (`while/body`) and the rest (the prefill). The trace folder opens
in TensorBoard or Perfetto.

Matrix multiplications also get a rate: each one's FLOPs are counted from the compiled
HLO (2 x output elements x contracted elements, for every dot in the op or its fused
computation) and divided by its traced time. XLA:CPU runs some products (the ones it
computes itself rather than hand to its matmul library) on its thread pool after their
op has returned, so with more than one CPU thread their traced time is too short and
their rate too high; `--single-thread` runs everything on one CPU, where op times add up
to the step.
"""

from __future__ import annotations

import collections
import pathlib
import re

# Op-name prefixes of library matrix multiplications: XLA:CPU's YNNPACK/XNNPACK/oneDNN
# fusions and plain dots; cuBLAS/cuDNN/Triton GEMMs on GPU.
MATMUL = ("ynn_fusion", "xnn_fusion", "onednn", "dot", "gemm", "cublas", "cudnn", "triton_gemm", "custom-call")
SKIP = ("ThunkExecutor", "Await", "Threadpool")  # scheduling events around the ops
# Control-flow ops whose events span the ops of their bodies: counting them would count
# those twice.
CONTAINERS = ("while", "conditional", "call")


def _kind(name: str) -> str:
    if name.startswith(MATMUL):
        return "matmul"
    return "copy/transpose" if "copy" in name or "transpose" in name else "other"


def train_phase(op_name: str, in_loop: bool) -> str:
    """Phase of a training-step op from its JAX name."""
    if "transpose(jvp" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "optimizer/other"


def decode_phase(op_name: str, in_loop: bool) -> str:
    """Phase of a `generate` op: inside the token loop (a while loop's body) or not."""
    return "token loop" if in_loop else "prefill/other"


def _loop_ops(hlo: str) -> set[str]:
    """Names of the instructions in any while loop's body or condition, nested calls included.

    Dots XLA emits inside a loop often carry no metadata, so the loop is found from the
    HLO's computations rather than from JAX names.
    """
    members, callees, roots = collections.defaultdict(list), collections.defaultdict(set), set()
    computation = None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line[0].isspace():
            computation = header.group(1)
            continue
        instruction = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = ", line)
        if computation is None or not instruction:
            continue
        members[computation].append(instruction.group(1))
        called = re.findall(r"(?:calls|to_apply|body|condition|branch_computations|true_computation|"
                            r"false_computation)=\{?([%\w.\-, ]+)\}?", line)
        for group in called:
            callees[computation].update(c.strip().lstrip("%") for c in group.split(","))
        if " while(" in line:
            roots.update(re.findall(r"(?:body|condition)=%?([\w.\-]+)", line))
    inside, todo = set(), list(roots)
    while todo:
        c = todo.pop()
        if c not in inside:
            inside.add(c)
            todo.extend(callees[c])
    return {name for c in inside for name in members[c]}


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]", re.M)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", re.M | re.S)


# A cuBLAS or cuBLASLt product on XLA:GPU: its output (first of a tuple that adds the
# workspace), its left operand, and the dimension numbers in its backend config.
_LIBRARY_GEMM = re.compile(
    r'^\s*(?:ROOT )?%?([\w.\-]+) = \(?\w+\[([\d,]*)\].* custom-call\((?:\w+\[[\d,]*\]\S* )?%?([\w.\-]+).*'
    r'custom_call_target="__cublas\$(?:gemm|lt\$matmul)'
)


def _gemm_flops(gemm: re.Match, line: str, dims: dict) -> int:
    """2 x output elements x contracted elements of one cuBLAS custom call."""
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line).group(1)
    flops = 2
    for d in gemm.group(2).split(","):
        flops *= int(d) if d else 1
    for i in re.findall(r"\d+", contracting):
        flops *= dims[gemm.group(3)][int(i)]
    return flops


def _dot_flops(line: str, dims: dict) -> int:
    """2 x output elements x contracted elements of one HLO dot instruction."""
    out = _INSTRUCTION.match(line).group(3)
    lhs = re.search(r" dot\(%?([\w.\-]+)", line).group(1)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
    flops = 2
    for d in out.split(","):
        flops *= int(d) if d else 1
    for i in contracting.split(","):
        flops *= dims[lhs][int(i)] if i else 1
    return flops


def matmul_flops(hlo: str) -> dict[str, int]:
    """Op name -> FLOPs of its matrix multiplications, for each op of a compiled module's text
    that runs as one: a dot, a fusion whose computation holds dots (XLA:CPU's YNNPACK
    fusions, XLA:GPU's Triton GEMMs), or a cuBLAS / cuBLASLt custom call (XLA:GPU)."""
    dims = {m.group(1): [int(d) for d in m.group(3).split(",") if d] for m in _INSTRUCTION.finditer(hlo)}
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo)}
    fused = set(re.findall(r" fusion\(.*?calls=%?([\w.\-]+)", hlo))
    flops = {}
    for name, body in bodies.items():
        if name in fused:
            continue
        for line in body.splitlines():
            gemm = _LIBRARY_GEMM.match(line)
            if gemm:
                flops[gemm.group(1)] = _gemm_flops(gemm, line, dims)
                continue
            head = _INSTRUCTION.match(line)
            if not head:
                continue
            if " dot(" in line:
                flops[head.group(1)] = _dot_flops(line, dims)
            elif " fusion(" in line:
                called = bodies.get(re.search(r"calls=%?([\w.\-]+)", line).group(1), "")
                dots = [d for d in called.splitlines() if " dot(" in d and _INSTRUCTION.match(d)]
                if dots:
                    flops[head.group(1)] = sum(_dot_flops(d, dims) for d in dots)
    return flops


def _dot_shapes(hlo: str) -> dict[str, str]:
    """Op name -> 'lhs x rhs' shapes of each plain dot: a name for dots without metadata."""
    shapes = {m.group(1): f"[{m.group(3)}]" for m in _INSTRUCTION.finditer(hlo)}
    return {m.group(1): " x ".join(shapes.get(o, "?") for o in m.group(2).split(", %"))
            for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[[\d,]*\]\S* dot\(%?([^)]*)\)", hlo, re.M)}


def _short_name(jax_name: str) -> str:
    """A JAX op name without its jit/jvp/transpose wrappers, layer numbers merged into *."""
    name = re.sub(r"^(?:jit\([^)]*\)/)+", "", jax_name)
    name = re.sub(r"^(?:transpose\()?(?:jvp\([^)]*\)|while/body)\)?/", "", name)
    return re.sub(r"layers_\d+/layers_\d+\._sublayer|layers_\d+", "layers_*", name)


def _matmul_rows(per_op: dict, runs: dict, names: dict, flops: dict, phase, in_loop: set,
                 shapes: dict) -> list[dict]:
    """Matmul time and FLOPs a step per JAX name (layer numbers merged), slowest first.

    `per_op` and `runs` are each op's time and number of executions a step (a token loop's
    ops run once per token, the prefill's once per call).
    """
    rows = {}
    for op, ms in per_op.items():
        if op not in flops:
            continue
        key = (phase(names.get(op, ""), op in in_loop), _short_name(names.get(op, "")) or f"dot {shapes.get(op, '')}")
        row = rows.setdefault(key, {"phase": key[0], "jax_name": key[1], "count": 0, "ms_per_step": 0.0,
                                    "flops_per_step": 0, "xla_ops": set()})
        row["count"] += 1
        row["ms_per_step"] += ms
        row["flops_per_step"] += flops[op] * runs[op]
        row["xla_ops"].add(op.split(".")[0])
    out = sorted(rows.values(), key=lambda r: -r["ms_per_step"])
    for row in out:
        row["xla_ops"] = sorted(row["xla_ops"])
        row["flops_per_s"] = row["flops_per_step"] / (row["ms_per_step"] * 1e-3) if row["ms_per_step"] else 0.0
    return out


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


def profile_step(compiled, run_steps, steps: int, trace_dir: str | pathlib.Path, top: int = 15,
                 phase=train_phase, unit: str = "step") -> dict:
    """Trace `run_steps(steps)` (which runs `compiled` and blocks) and tabulate its ops.

    Times are per `unit` (`steps` of them ran); `phase(jax_name, in_loop)` names an op's
    row. Control-flow ops (`while`, `conditional`) are left out: their bodies' ops are
    counted instead.
    """
    import jax

    trace_dir = pathlib.Path(trace_dir)
    with jax.profiler.trace(str(trace_dir)):
        run_steps(steps)
    hlo = compiled.as_text()
    names = dict(re.findall(r"\n\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo))
    in_loop = _loop_ops(hlo)
    flops = matmul_flops(hlo)
    per_op, runs = collections.Counter(), collections.Counter()
    for name, ns in _op_events(trace_dir):
        if not name.split(".")[0] in CONTAINERS:
            per_op[name] += ns / steps / 1e6
            runs[name] += 1 / steps
    total = sum(per_op.values())
    split = collections.Counter()
    for name, ms in per_op.items():
        split[(phase(names.get(name, ""), name in in_loop), _kind(name))] += ms
    return {
        "trace_dir": str(trace_dir),
        "unit": unit,
        "op_ms_per_step": total,
        "split": [{"phase": p, "kind": k, "ms_per_step": ms} for (p, k), ms in sorted(split.items())],
        "top_ops": [{"op": name, "ms_per_step": ms, "kind": _kind(name), "jax_name": names.get(name, ""),
                     "in_loop": name in in_loop}
                    for name, ms in per_op.most_common(top)],
        "matmuls": _matmul_rows(per_op, runs, names, flops, phase, in_loop, _dot_shapes(hlo)),
    }


def format_profile(p: dict, peak_flops_per_s: float | None = None) -> list[str]:
    """Markdown tables of a profile_step result; matmul rates as a share of the peak if given."""
    total, unit = p["op_ms_per_step"], p.get("unit", "step")
    lines = ["", f"profile ({p['trace_dir']}): {total:.2f} ms of XLA ops a {unit}, summed over threads", "",
             f"| phase | kind | ms/{unit} | share |", "|---|---|---|---|"]
    lines += [f"| {s['phase']} | {s['kind']} | {s['ms_per_step']:.2f} | {100 * s['ms_per_step'] / total:.0f}% |"
              for s in p["split"]]
    lines += ["", f"| op | kind | ms/{unit} | JAX name |", "|---|---|---|---|"]
    lines += [f"| {o['op']} | {o['kind']} | {o['ms_per_step']:.2f} | {o['jax_name'][-70:]} |" for o in p["top_ops"]]
    if p.get("matmuls"):
        peak = f" | % of peak ({peak_flops_per_s / 1e9:.0f} GFLOP/s)" if peak_flops_per_s else ""
        lines += ["", "matrix multiplications by JAX name (layers merged), slowest first:", "",
                  f"| phase | JAX name | ops | XLA op | ms/{unit} | GFLOP/{unit} | GFLOP/s{peak} |",
                  "|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
        for m in p["matmuls"]:
            rate = m["flops_per_s"] / 1e9
            share = f" | {100 * m['flops_per_s'] / peak_flops_per_s:.0f}%" if peak_flops_per_s else ""
            lines.append(f"| {m['phase']} | {m['jax_name'][-60:]} | {m['count']} | {', '.join(m['xla_ops'])} | "
                         f"{m['ms_per_step']:.2f} | {m['flops_per_step'] / 1e9:.3f} | {rate:.1f}{share} |")
        if peak_flops_per_s and any(m["flops_per_s"] > 1.5 * peak_flops_per_s for m in p["matmuls"]):
            lines += ["", "Rates far above the peak: those ops ran on XLA's thread pool after their traced "
                          "event ended; --single-thread times them whole."]
    return lines
