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


def _shard_bytes(tree: Any) -> int:
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
        state_bytes = {"params": _shard_bytes(state.params), "optimizer": _shard_bytes(state.opt_state),
                       "reference": _shard_bytes(state.ref_params), "batch": _shard_bytes(batch)}
        try:
            compiled = prog.train_step.lower(prog.abstract, batch).compile()
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


def with_batch(cfg: Config, batch_size: int) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size))


def largest_batch(cfg: Config, devices: list, hbm: int) -> tuple[int, Compiled]:
    """(the largest global batch whose step fits `hbm` per chip, its compile).

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
    return lo * unit, runs[lo]


def plan_train(cfg: Config, topo: Topology, devices: list, *, auto_batch: bool = False) -> dict:
    """The report of `cfg`'s train step on `topo` (see the module docstring): JSON-able."""
    chip = topo.chip
    try:
        parallel.mesh_shape(cfg.parallel, len(devices))
    except ConfigError as e:
        raise ConfigError(f"{e}; --topology {topo.name} has {topo.chips} chips") from None
    if auto_batch:
        batch_size, compiled = largest_batch(cfg, devices, chip.hbm_bytes)
        cfg = with_batch(cfg, batch_size)
    else:
        compiled = compile_step(cfg, devices)
    tokens = cfg.data.batch_size * flops.tokens_per_sequence(cfg.model, cfg.data.seq_len, cfg.data.target_len)
    state = compiled.state_bytes
    report = {
        "config": cfg.name,
        "topology": {"name": topo.name, "libtpu": topo.libtpu_name, "chips": topo.chips, "version": topo.version,
                     "hbm_gib": chip.hbm_bytes / 2**30, "peak_bf16_flops": chip.peak_bf16_flops},
        "mesh": dict(zip(parallel.MESH_AXES, parallel.mesh_shape(cfg.parallel, len(devices)))),
        "batch": {"global": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "tokens": tokens,
                  "grad_accum_steps": cfg.train.grad_accum_steps, "auto": auto_batch},
        "model": {"remat_policy": cfg.model.remat_policy, "scan_layers": cfg.model.scan_layers,
                  "attention_impl": cfg.model.attention_impl, "dtype": cfg.model.dtype},
        "memory_per_chip": {"parameters": state["params"], "optimizer": state["optimizer"],
                            "reference": state["reference"], "batch": state["batch"], "hbm": chip.hbm_bytes},
        "fits": compiled.fits,
    }
    if not compiled.fits:
        return {**report, "compiler_says": compiled.over}
    counts, how = counted(cfg, devices, compiled)
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


def _gib(n: Optional[float]) -> str:
    """Bytes in GiB, or MiB / KiB below one GiB (tiny presets)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def format_report(r: dict) -> str:
    """The report as text: every compiler or roofline figure says that it is an estimate."""
    t, b, m = r["topology"], r["batch"], r["memory_per_chip"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    head = [
        f"plan: {r['config']} on {t['name']} ({t['chips']} chips of TPU {t['version']}, {t['libtpu']}), mesh {mesh}",
        f"batch: {b['global']} x {b['seq_len']} ({b['tokens']} tokens a step"
        + (", the largest that fits" if b["auto"] else "") + f"), grad_accum_steps {b['grad_accum_steps']}, "
        + f"remat {r['model']['remat_policy']}, attention {r['model']['attention_impl']}",
    ]
    if "compiler_says" in r:
        return "\n".join(head + [
            f"DOES NOT FIT a chip's {_gib(m['hbm'])} HBM: libtpu refused to compile it ({r['compiler_says']})",
            f"  parameters {_gib(m['parameters'])}  optimizer state {_gib(m['optimizer'])}  batch {_gib(m['batch'])} a chip",
        ])
    f, e = r["flops"], r["estimate"]
    lines = head + [
        "memory per chip (compiled):",
        f"  parameters {_gib(m['parameters'])}  optimizer state {_gib(m['optimizer'])}"
        + (f"  reference {_gib(m['reference'])}" if m["reference"] else "") + f"  batch {_gib(m['batch'])}",
        f"  arguments {_gib(m['arguments'])}  temporaries {_gib(m['temporaries'])}  outputs {_gib(m['outputs_not_aliased'])}"
        f"  code {_gib(m['code'])}",
        f"  total {_gib(m['total'])} of {_gib(m['hbm'])} HBM: "
        + (f"fits, {_gib(m['margin'])} to spare" if r["fits"] else f"DOES NOT FIT, {_gib(-m['margin'])} over"),
        f"FLOPs a step (all chips): counted {f['counted']:.3e} ({f['counted_by']}); flops.py {f['model']:.3e}"
        + (f"; ratio {f['counted_over_model']:.3f}" if f["counted_over_model"] else ""),
        f"estimated step time {_ms(e['step_seconds'])} from the {e['source']}; estimated {e['tokens_per_s']:.4g} "
        f"tokens/s, estimated MFU {e['mfu'] * 100:.1f}% of bf16 peak (compiler estimate {_ms(e['compiler_seconds'])}, "
        f"roofline estimate {_ms(e['roofline_seconds'])})",
        "collectives a step (count, bytes per chip): " + (", ".join(
            f"{k} {v['count']} ({_gib(v['bytes_per_chip'])})" for k, v in r["collectives"].items()) or "none"),
    ]
    return "\n".join(lines)
