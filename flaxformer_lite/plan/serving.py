"""The serving engine's programs compiled ahead of time for a TPU slice: `plan --serve`.

    report = plan_serve(cfg, topology.parse("v5e-4"), devices, max_batch=8, max_len=2048)

The engine (inference/engine.py) runs two programs: `_prefill`, one prompt chunk into one
slot of its KV-cache pool, and `_step`, one token for every slot. Both are compiled here
with abstract inputs on the slice: the parameters sharded by the run's rules, the pool's
slots split over the data-parallel chips (where they divide), everything else replicated.
The report gives per-chip memory (parameters, the KV-cache pool, each program's
temporaries), whether each program fits, and roofline estimates per token.

The layers are compiled unrolled (model.scan_layers off): XLA's cost analysis counts a
loop's body once, and a serving model's layers are the same arrays either way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from flaxformer_lite.config import Config, ConfigError
from flaxformer_lite.inference import engine
from flaxformer_lite.models import build_model, init_params
from flaxformer_lite.plan.planner import compile_program, gib, msec, shard_bytes
from flaxformer_lite.plan.topology import Topology
from flaxformer_lite.runtime import parallel


def engine_programs(model, params, max_batch: int, max_len: int, chunk: int) -> dict[str, tuple]:
    """{"prefill": ..., "step": ...}, each (program, its static arguments, params, the
    KV-cache pool, the other arguments): the engine's two jitted programs with abstract
    arguments in their current signatures; the step at its largest bucket (every slot).
    `params` is the abstract {'params': ...} tree. The one place that knows those
    signatures outside the engine."""
    slots = -(-max_len // chunk) * chunk  # as Engine rounds its cache up to whole chunks
    shape_model = build_model(dataclasses.replace(model.cfg, max_len=max(model.cfg.max_len, slots)))
    pool, layout = engine.pool_layout(shape_model, max_batch, slots)
    V = model.cfg.vocab_size
    spec = jax.ShapeDtypeStruct
    logits = spec((max_batch, V), jnp.float32)
    tables = (spec((max_batch, V), jnp.bool_), spec((max_batch, V), jnp.int32), spec((max_batch, V), jnp.float32))
    i32, f32 = (lambda *s: spec(s, jnp.int32)), (lambda *s: spec(s, jnp.float32))
    prefill = (i32(), i32(), i32(chunk), i32(chunk), i32(), i32(engine.MAX_LOGIT_BIAS), f32(engine.MAX_LOGIT_BIAS))
    B = max_batch
    # ... then the grammar's packed next-token masks and which slots they constrain.
    step = (spec((B,), jnp.bool_), i32(B), f32(B), i32(B), f32(B), spec((B,), jnp.bool_), f32(B), f32(B), f32(B),
            spec((B,), jnp.uint32), i32(B), i32(B), i32(B, engine.mask_words(V)), spec((B,), jnp.bool_))
    return {"prefill": (engine._prefill, (model, layout), params, pool, (logits, tables, *prefill)),
            "step": (engine._step, (model,), params, pool, (logits, tables, *step))}


def _placed(tree, sharding_of):
    """Abstract arrays `tree` placed by `sharding_of(array)`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def plan_serve(cfg: Config, topo: Topology, devices: list, *, max_batch: int, max_len: int, chunk: int = 64) -> dict:
    """The report of the engine's programs for `cfg`'s model on `topo` (module docstring): JSON-able."""
    model_cfg = dataclasses.replace(cfg.model, scan_layers=False)
    if model_cfg.family != "decoder":
        raise ConfigError(f"plan --serve: the engine serves decoder-only models; model.family={model_cfg.family}")
    if not 1 <= max_len <= model_cfg.max_len:
        raise ConfigError(f"plan --serve: --max-len {max_len} must be in [1, model.max_len={model_cfg.max_len}]")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    mesh = parallel.make_mesh(cfg.parallel, devices=devices)
    chip = topo.chip
    slot_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    slot_axes = parallel.BATCH_AXES if max_batch % slot_shards == 0 else None
    model = build_model(model_cfg)
    with parallel.use_mesh(mesh, cfg.parallel):
        params = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                              parallel.param_shardings(mesh, cfg))
        programs = engine_programs(model, params, max_batch, max_len, chunk)
        replicated = NamedSharding(mesh, PartitionSpec())
        by_slot = NamedSharding(mesh, PartitionSpec(slot_axes))
        compiled, pool_bytes = {}, 0
        for name, (program, statics, p, pool, rest) in programs.items():
            pool = _placed(pool, lambda x: by_slot)
            rest = _placed(rest, lambda x: by_slot if x.ndim and x.shape[0] == max_batch else replicated)
            pool_bytes = shard_bytes(pool)
            compiled[name] = compile_program(program, (*statics, p, pool, *rest), {})
    param_bytes = shard_bytes(params)
    report = {
        "config": cfg.name,
        "topology": {"name": topo.name, "libtpu": topo.libtpu_name, "chips": topo.chips, "version": topo.version,
                     "hbm_gib": chip.hbm_bytes / 2**30, "peak_bf16_flops": chip.peak_bf16_flops},
        "mesh": dict(zip(parallel.MESH_AXES, parallel.mesh_shape(cfg.parallel, len(devices)))),
        "serve": {"max_batch": max_batch, "max_len": max_len, "chunk": chunk, "slots_split": slot_axes is not None,
                  "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype},
        "memory_per_chip": {"parameters": param_bytes, "kv_cache_pool": pool_bytes, "hbm": chip.hbm_bytes},
        "programs": {},
    }
    tokens = {"prefill": chunk, "step": max_batch}  # tokens one call of the program handles
    for name, c in compiled.items():
        if not c.fits:
            report["programs"][name] = {"fits": False, "compiler_says": c.over}
            continue
        roofline = max(c.flops / chip.peak_bf16_flops, c.bytes_accessed / chip.hbm_bytes_per_s)
        report["programs"][name] = {
            "fits": c.memory["total"] <= chip.hbm_bytes, "total": c.memory["total"], "temporaries": c.memory["temp"],
            "margin": chip.hbm_bytes - c.memory["total"], "flops_per_chip": c.flops, "bytes_per_chip": c.bytes_accessed,
            "compiler_seconds": c.optimal_seconds if c.optimal_seconds > 0 else None,
            "roofline_seconds": roofline, "tokens_per_call": tokens[name],
            "roofline_seconds_per_token": roofline / tokens[name], "roofline_tokens_per_s": tokens[name] / roofline,
            "collectives": {k: v["count"] for k, v in c.collectives.items() if v["count"]},
        }
    report["fits"] = all(p["fits"] for p in report["programs"].values())
    return report


def format_serve_report(r: dict) -> str:
    """The serving report as text: every time is labelled an estimate."""
    t, s, m = r["topology"], r["serve"], r["memory_per_chip"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"plan --serve: {r['config']} on {t['name']} ({t['chips']} chips of TPU {t['version']}, {t['libtpu']}), "
        f"mesh {mesh}",
        f"engine: {s['max_batch']} slots of {s['max_len']} tokens, prompts prefilled {s['chunk']} tokens a chunk, "
        f"{s['dtype']} compute, {s['param_dtype']} parameters"
        + ("" if s["slots_split"] else "; slots not split (max_batch does not divide the data-parallel chips)"),
        f"memory per chip: parameters {gib(m['parameters'])}  KV-cache pool {gib(m['kv_cache_pool'])}  "
        f"of {gib(m['hbm'])} HBM",
    ]
    for name, p in r["programs"].items():
        if not p["fits"] and "compiler_says" in p:
            lines.append(f"  {name}: DOES NOT FIT: libtpu refused to compile it ({p['compiler_says']})")
            continue
        per = "prompt token" if name == "prefill" else "generated token (all slots decoding)"
        lines.append(
            f"  {name}: total {gib(p['total'])} (temporaries {gib(p['temporaries'])}): "
            + ("fits" if p["fits"] else f"DOES NOT FIT, {gib(-p['margin'])} over")
            + f"; roofline estimate {msec(p['roofline_seconds'])} a call, "
            f"{msec(p['roofline_seconds_per_token'])} a {per}, "
            f"estimated {p['roofline_tokens_per_s']:.4g} tokens/s")
    return "\n".join(lines)
