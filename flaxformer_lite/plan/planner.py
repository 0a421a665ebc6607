"""A run's train step compiled ahead of time for a TPU slice: memory, FLOPs, estimates, collectives.

    report = plan_train(cfg, topology.parse("v5p-8"))          # one compile (plus counting twins)
    report = plan_train(cfg, topo, auto_batch=True)            # the largest global batch that fits

The step is the one `train` runs (train.loop.programs: the same mesh, rules, shardings and
donation), lowered with abstract inputs over the slice's compile-only devices.

Counting. XLA's cost analysis counts a while loop's body once: a scanned layer stack (and
the gradient-accumulation loop) would be counted as one layer. So the FLOPs, bytes, the
compiler's time estimate and the collectives come from "counting twins": the same step
unrolled (scan_layers off, grad_accum_steps 1 over the whole batch) with one and two
groups of layers (a group is one period of model.attention_types), and the total is
extrapolated linearly to the model's depth, which is exact for layers that are alike.
An unrolled config without accumulation is counted from its own compile.

Estimates. The compiler's estimate is cost_analysis()'s `optimal_seconds`; where it is not
positive the roofline (counted FLOPs at the chip's bf16 peak, or counted bytes at its HBM
bandwidth, whichever is slower) stands in. Both are estimates, not measurements, and are
labelled so wherever they are printed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

from flaxformer_lite import ops
from flaxformer_lite.config import Config, ConfigError
from flaxformer_lite.models import flops
from flaxformer_lite.plan.topology import Topology
from flaxformer_lite.runtime import parallel
from flaxformer_lite.train import loop
from flaxformer_lite.train.step import SEQ2SEQ_OBJECTIVES

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _dtype_bytes(name: str) -> int:
    return _BYTES.get(name) or int(name[1:]) // 8


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count", "bytes"}} of the collectives in a compiled module's text; an op's
    bytes are its largest buffer on one chip (the gathered result, the reduced operand)."""
    out = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVES}
    for shapes, kind in _OP.findall(hlo_text):
        sizes = [math.prod(int(d) for d in dims.split(",") if d) * _dtype_bytes(t) for t, dims in _ARRAY.findall(shapes)]
        out[kind]["count"] += 1
        out[kind]["bytes"] += max(sizes, default=0)
    return out


def batch_spec(cfg: Config, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of the objective's batch (train/step.py's contract)."""
    B, T = batch_size, cfg.data.seq_len
    ids = {"input_ids": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32}
    objective = cfg.data.objective
    if objective == "classification":
        return {**{k: ((B, T), d) for k, d in ids.items()}, "label": ((B,), jnp.int32)}
    lm = {**ids, "labels": jnp.int32, "weights": jnp.float32}
    if objective in SEQ2SEQ_OBJECTIVES:
        S = cfg.data.target_len or T
        decoder = {"decoder_input_ids": jnp.int32, "decoder_segment_ids": jnp.int32, "decoder_positions": jnp.int32,
                   "labels": jnp.int32, "weights": jnp.float32}
        return {**{k: ((B, T), d) for k, d in ids.items()}, **{k: ((B, S), d) for k, d in decoder.items()}}
    if objective == "dpo":
        return {f"{side}_{k}": ((B, T), d) for side in ("chosen", "rejected") for k, d in lm.items()}
    return {k: ((B, T), d) for k, d in lm.items()}


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Compiled:
    """One compile's figures: memory per chip and its cost analysis as XLA counts it."""

    memory: dict[str, int]
    flops: float
    bytes_accessed: float
    optimal_seconds: float
    collectives: dict[str, dict[str, float]]
    state_bytes: dict[str, int]
    over: Optional[str] = None  # libtpu's message when the program does not fit the chip's HBM

    @property
    def fits(self) -> bool:
        return self.over is None


def compile_step(cfg: Config, devices: list) -> Compiled:
    """Compile `cfg`'s train step for `devices`; ConfigError if the mesh does not fit them."""
    mesh = parallel.make_mesh(cfg.parallel, devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = cfg.train.grad_accum_steps
    if cfg.data.batch_size % (shards * accum):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the {shards} data-parallel "
                          f"chips times train.grad_accum_steps={accum}")
    with parallel.use_mesh(mesh, cfg.parallel):
        prog = loop.programs(cfg, mesh)
        sharding = parallel.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                 for k, (shape, dtype) in batch_spec(cfg, cfg.data.batch_size).items()}
        state = prog.abstract
        state_bytes = {"params": shard_bytes(state.params), "optimizer": shard_bytes(state.opt_state),
                       "reference": shard_bytes(state.ref_params), "batch": shard_bytes(batch)}
        return compile_program(prog.train_step, (prog.abstract, batch), state_bytes)


def compile_program(program, args: tuple, state_bytes: dict[str, int]) -> Compiled:
    """A jitted `program` compiled for abstract `args` (placed on the slice): its figures."""
    try:
        compiled = program.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        # libtpu refuses a program larger than the chip's HBM: that is the plan's answer.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Compiled({}, 0.0, 0.0, 0.0, {}, state_bytes, over=str(e).splitlines()[0])
    stats = compiled.memory_analysis()
    memory = {k: int(getattr(stats, f"{k}_size_in_bytes"))
              for k in ("argument", "output", "alias", "temp", "generated_code")}
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(memory, float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                    float(cost.get("optimal_seconds", 0.0)), collectives(compiled.as_text()), state_bytes)


def _layers(cfg: Config) -> tuple[int, int]:
    m = cfg.model
    return m.num_layers, (m.num_decoder_layers or m.num_layers) if m.family == "encoder_decoder" else 0


def _twin(cfg: Config, encoder_layers: int, decoder_layers: int) -> Config:
    """`cfg` unrolled with the given depth and no accumulation (the whole batch in one pass)."""
    model = dataclasses.replace(cfg.model, scan_layers=False, num_layers=encoder_layers,
                                **({"num_decoder_layers": decoder_layers} if decoder_layers else {}))
    return dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, grad_accum_steps=1))


def _counts(c: Compiled) -> dict[str, float]:
    if not c.fits:  # a twin runs the whole batch in one pass, which accumulation may have avoided
        raise ConfigError(f"plan counts FLOPs on an unrolled twin without accumulation, and it does not fit a chip "
                          f"({c.over}); plan with a smaller data.batch_size to count")
    out = {"flops": c.flops, "bytes_accessed": c.bytes_accessed, "optimal_seconds": c.optimal_seconds}
    for kind, v in c.collectives.items():
        out[f"{kind}.count"], out[f"{kind}.bytes"] = v["count"], v["bytes"]
    return out


def counted(cfg: Config, devices: list, compiled: Compiled) -> tuple[dict[str, float], str]:
    """(whole-step counts with every layer and microbatch counted, how they were counted)."""
    enc, dec = _layers(cfg)
    group = len(cfg.model.attention_types or ()) or 1
    if not cfg.model.scan_layers and cfg.train.grad_accum_steps == 1:
        return _counts(compiled), "the step's own compile (unrolled, no accumulation)"
    deep = [n for n in (enc, dec) if n]
    if any(n % group for n in deep) or max(deep) <= 2 * group:
        twin = compile_step(_twin(cfg, enc, dec), devices)
        return _counts(twin), f"an unrolled twin of all {enc + dec} layers"
    # q(e, d) = c + a * e + b * d, e and d in groups of layers; tied when the sides are as deep.
    base = _counts(compile_step(_twin(cfg, group, group if dec else 0), devices))
    more_enc = _counts(compile_step(_twin(cfg, 2 * group, 2 * group if dec == enc else (group if dec else 0)), devices))
    per_enc = {k: more_enc[k] - base[k] for k in base}
    total = {k: base[k] + (enc // group - 1) * per_enc[k] for k in base}
    how = f"unrolled twins of {group} and {2 * group} layers, extrapolated to {enc}"
    if dec and dec != enc:
        more_dec = _counts(compile_step(_twin(cfg, group, 2 * group), devices))
        total = {k: total[k] + (dec // group - 1) * (more_dec[k] - base[k]) for k in base}
        how += f" encoder and {dec} decoder layers"
    elif dec:
        how += " layers a side"
    return total, how + f" (grad_accum_steps={cfg.train.grad_accum_steps} counted as one pass)"


def model_flops(cfg: Config) -> float:
    """flops.py's training FLOPs of one step over the global batch (PaLM's convention)."""
    m, d = cfg.model, cfg.data
    rows = d.batch_size * (2 if d.objective == "dpo" else 1)
    return flops.training_flops_per_token(m, d.seq_len, d.target_len) * flops.tokens_per_sequence(
        m, d.seq_len, d.target_len) * rows


def splash_kernel_counts(cfg: Config) -> dict[str, float]:
    """{"flops", "bytes_accessed"} of the splash kernels in one step over the global batch:
    XLA's cost analysis counts none of a Pallas kernel's work, so they are counted here
    from the tiles the kernel computes (ops.splash_visible_blocks). Per tile and head: the
    forward 4 b^2 H FLOPs (q k^T, p v), the backward 14 (its dq pass recomputes q k^T and
    d p; its dk/dv pass recomputes both and forms dv, dp, dk), and the forward again under
    remat; each pass reads a key and a value tile (2 b H elements) per tile, and the
    backward's dk/dv pass reads a query and an output-gradient tile too."""
    m, d = cfg.model, cfg.data
    rows = d.batch_size * (2 if d.objective == "dpo" else 1)
    T, S = d.seq_len, d.target_len or d.seq_len
    stacks = {"encoder": [(T, False, m.num_layers)], "decoder": [(T, True, m.num_layers)],
              "encoder_decoder": [(T, False, m.num_layers), (S, True, m.decoder_layers)]}[m.family]
    forwards = 2 if m.remat_policy != "none" else 1
    itemsize = jnp.dtype(m.dtype).itemsize
    flops_total = bytes_total = 0.0
    for length, causal, layers in stacks:
        block, _ = ops.splash_block(length)
        tiles = sum(ops.splash_visible_blocks(length, causal=causal, window=m.sliding_window if t == "local" else None)
                    for t in m.layer_attention_types(layers))
        per_head = rows * m.num_heads * tiles
        flops_total += per_head * block * block * m.dim_per_head * (4 * forwards + 14)
        bytes_total += per_head * block * m.dim_per_head * itemsize * (2 * forwards + 6)
    return {"flops": flops_total, "bytes_accessed": bytes_total}


def with_batch(cfg: Config, batch_size: int) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size))


def largest_batch(cfg: Config, devices: list, hbm: int) -> tuple[int, Compiled, dict]:
    """(the largest global batch whose step fits `hbm` per chip, its compile, and the
    smallest batch tried that does not fit: {"global", "total"}, total None where libtpu
    refused the program outright).

    The batch moves in units of one row a data-parallel chip (times the accumulation
    steps). Memory grows nearly linearly with the batch: after a trial that fits, the next
    is where the line through the last two that fit meets `hbm` (at most 8x the largest
    batch known to fit); after one that does not, halfway between; until the largest batch
    that fits and the smallest that does not are one unit apart."""
    mesh_sizes = parallel.mesh_shape(cfg.parallel, len(devices))
    unit = mesh_sizes[0] * mesh_sizes[1] * cfg.train.grad_accum_steps
    runs: dict[int, Compiled] = {}

    def fits(units: int) -> bool:
        runs[units] = compile_step(with_batch(cfg, units * unit), devices)
        return runs[units].fits and runs[units].memory["total"] <= hbm

    if not fits(1):
        raise ConfigError(f"--batch auto: even data.batch_size={unit} (one row a data-parallel chip) does not fit "
                          f"a chip's {hbm / 2**30:.0f} GiB; shard wider (parallel.fsdp, parallel.tensor), use remat "
                          "(model.remat_policy=full) or a larger slice")
    lo, hi, last_fit = 1, None, True
    fitting = [1]
    while hi is None or hi - lo > 1:
        if not last_fit:
            guess = (lo + hi) // 2
        elif len(fitting) < 2:
            guess = 2 * lo
        else:
            (u1, u2) = fitting[-2:]
            m1, m2 = runs[u1].memory["total"], runs[u2].memory["total"]
            slope = max((m2 - m1) / (u2 - u1), 1.0)
            guess = min(u2 + int((hbm - m2) // slope), 8 * lo)
        guess = max(guess, lo + 1) if hi is None else min(max(guess, lo + 1), hi - 1)
        last_fit = fits(guess)
        if last_fit:
            lo = guess
            fitting.append(guess)
        else:
            hi = guess
    over = runs[hi].memory.get("total") if runs[hi].fits else None
    return lo * unit, runs[lo], {"global": hi * unit, "total": over}


def plan_train(cfg: Config, topo: Topology, devices: list, *, auto_batch: bool = False,
               hbm_bytes: Optional[int] = None) -> dict:
    """The report of `cfg`'s train step on `topo` (see the module docstring): JSON-able.
    `hbm_bytes`: the HBM a chip has for the run, if less than all of it (what fits is
    judged against it)."""
    chip = dataclasses.replace(topo.chip, hbm_bytes=hbm_bytes or topo.chip.hbm_bytes)
    try:
        parallel.mesh_shape(cfg.parallel, len(devices))
    except ConfigError as e:
        raise ConfigError(f"{e}; --topology {topo.name} has {topo.chips} chips") from None
    if auto_batch:
        batch_size, compiled, over = largest_batch(cfg, devices, chip.hbm_bytes)
        cfg = with_batch(cfg, batch_size)
    else:
        compiled, over = compile_step(cfg, devices), None
    tokens = cfg.data.batch_size * flops.tokens_per_sequence(cfg.model, cfg.data.seq_len, cfg.data.target_len)
    state = compiled.state_bytes
    report = {
        "config": cfg.name,
        "topology": {"name": topo.name, "libtpu": topo.libtpu_name, "chips": topo.chips, "version": topo.version,
                     "hbm_gib": chip.hbm_bytes / 2**30, "peak_bf16_flops": chip.peak_bf16_flops},
        "mesh": dict(zip(parallel.MESH_AXES, parallel.mesh_shape(cfg.parallel, len(devices)))),
        "batch": {"global": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "tokens": tokens,
                  "grad_accum_steps": cfg.train.grad_accum_steps, "auto": auto_batch,
                  **({"smallest_over": over} if over else {})},
        "model": {"remat_policy": cfg.model.remat_policy, "scan_layers": cfg.model.scan_layers,
                  "attention_impl": cfg.model.attention_impl, "dtype": cfg.model.dtype},
        "memory_per_chip": {"parameters": state["params"], "optimizer": state["optimizer"],
                            "reference": state["reference"], "batch": state["batch"], "hbm": chip.hbm_bytes},
        "fits": compiled.fits,
    }
    if not compiled.fits:
        return {**report, "compiler_says": compiled.over}
    counts, how = counted(cfg, devices, compiled)
    splash = cfg.model.attention_impl == "splash"
    if splash:
        kernels = splash_kernel_counts(cfg)
        for key in ("flops", "bytes_accessed"):
            counts[key] += kernels[key] / topo.chips
        counts["optimal_seconds"] = 0.0  # the compiler's estimate leaves the kernels out too
        how += "; the splash kernels' FLOPs counted from their tiles"
    mem = compiled.memory
    report["memory_per_chip"].update(
        arguments=mem["argument"], temporaries=mem["temp"], outputs_not_aliased=mem["output"] - mem["alias"],
        code=mem["generated_code"], total=mem["total"], margin=chip.hbm_bytes - mem["total"])
    report["fits"] = mem["total"] <= chip.hbm_bytes
    model = model_flops(cfg)
    counted_flops = counts["flops"] * topo.chips
    roofline = max(counts["flops"] / chip.peak_bf16_flops, counts["bytes_accessed"] / chip.hbm_bytes_per_s)
    compiler = counts["optimal_seconds"] if counts["optimal_seconds"] > 0 else None
    step_s = compiler or roofline
    if splash:
        xla = plan_train(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl="xla")),
                         topo, devices, hbm_bytes=hbm_bytes)
        # Rooflines on both sides: the compiler's estimate leaves the kernels out.
        xla_s = xla.get("estimate", {}).get("roofline_seconds")
        report["attention"] = {"splash_roofline_seconds": roofline, "xla_roofline_seconds": xla_s,
                               "xla_fits": xla["fits"], "splash_over_xla": roofline / xla_s if xla_s else None}
    return {
        **report,
        "flops": {"counted": counted_flops, "counted_per_chip": counts["flops"], "model": model,
                  "counted_over_model": counted_flops / model if model else None, "counted_by": how},
        "estimate": {
            "compiler_seconds": compiler, "roofline_seconds": roofline, "step_seconds": step_s,
            "source": "compiler (optimal_seconds)" if compiler else "roofline (compiler's estimate not positive)",
            "tokens_per_s": tokens / step_s, "mfu": model / topo.chips / step_s / chip.peak_bf16_flops,
        },
        "collectives": {k: {"count": int(counts[f"{k}.count"]), "bytes_per_chip": counts[f"{k}.bytes"]}
                        for k in COLLECTIVES if counts[f"{k}.count"]},
    }


def gib(n: Optional[float]) -> str:
    """Bytes in GiB, or MiB / KiB below one GiB (tiny presets)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def msec(seconds: Optional[float]) -> str:
    """Seconds in milliseconds, or "-" for none."""
    return "-" if seconds is None else f"{seconds * 1e3:.4g} ms"


def format_report(r: dict) -> str:
    """The report as text: every compiler or roofline figure says that it is an estimate."""
    t, b, m = r["topology"], r["batch"], r["memory_per_chip"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    head = [
        f"plan: {r['config']} on {t['name']} ({t['chips']} chips of TPU {t['version']}, {t['libtpu']}), mesh {mesh}",
        f"batch: {b['global']} x {b['seq_len']} ({b['tokens']} tokens a step"
        + (", the largest that fits" if b["auto"] else "")
        + (f"; {b['smallest_over']['global']} does not" if "smallest_over" in b else "") + f"), grad_accum_steps {b['grad_accum_steps']}, "
        + f"remat {r['model']['remat_policy']}, attention {r['model']['attention_impl']}",
    ]
    if "compiler_says" in r:
        return "\n".join(head + [
            f"DOES NOT FIT a chip's {gib(m['hbm'])} HBM: libtpu refused to compile it ({r['compiler_says']})",
            f"  parameters {gib(m['parameters'])}  optimizer state {gib(m['optimizer'])}  batch {gib(m['batch'])} a chip",
        ])
    f, e = r["flops"], r["estimate"]
    lines = head + [
        "memory per chip (compiled):",
        f"  parameters {gib(m['parameters'])}  optimizer state {gib(m['optimizer'])}"
        + (f"  reference {gib(m['reference'])}" if m["reference"] else "") + f"  batch {gib(m['batch'])}",
        f"  arguments {gib(m['arguments'])}  temporaries {gib(m['temporaries'])}  outputs {gib(m['outputs_not_aliased'])}"
        f"  code {gib(m['code'])}",
        f"  total {gib(m['total'])} of {gib(m['hbm'])} HBM: "
        + (f"fits, {gib(m['margin'])} to spare" if r["fits"] else f"DOES NOT FIT, {gib(-m['margin'])} over"),
        f"FLOPs a step (all chips): counted {f['counted']:.3e} ({f['counted_by']}); flops.py {f['model']:.3e}"
        + (f"; ratio {f['counted_over_model']:.3f}" if f["counted_over_model"] else ""),
        f"estimated step time {msec(e['step_seconds'])} from the {e['source']}; estimated {e['tokens_per_s']:.4g} "
        f"tokens/s, estimated MFU {e['mfu'] * 100:.1f}% of bf16 peak (compiler estimate {msec(e['compiler_seconds'])}, "
        f"roofline estimate {msec(e['roofline_seconds'])})",
        *([] if "attention" not in r else [
            f"attention: splash's roofline estimate {msec(r['attention']['splash_roofline_seconds'])} "
            f"against xla attention's {msec(r['attention']['xla_roofline_seconds'])}"
            + (f" (ratio {r['attention']['splash_over_xla']:.2f})" if r["attention"]["splash_over_xla"] else "")
            + ("" if r["attention"]["xla_fits"] else "; xla attention DOES NOT FIT")]),
        "collectives a step (count, bytes per chip): " + (", ".join(
            f"{k} {v['count']} ({gib(v['bytes_per_chip'])})" for k, v in r["collectives"].items()) or "none"),
    ]
    return "\n".join(lines)
