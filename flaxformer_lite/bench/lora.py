"""`bench train --lora RANK`: a LoRA fine-tuning step against a full fine-tune and against
transformers + peft, on a random Llama.

Three figures, each beside the 1-minute load average when it was taken:
- optimizer state: the bytes of our AdamW state with adapters only against a full
  fine-tune's, read from the abstract states (exact, nothing allocated);
- peak RSS: two fresh processes, one per mode, each building the model from its own
  random init, compiling the step and running `--rss-steps` steps; VmHWM of each;
- step time: our jitted LoRA step against a transformers LlamaForCausalLM carrying the
  same adapters through peft (torch AdamW over the adapters), same weights, batch and
  optimizer settings, in one process, in alternating rounds (`bench train`'s method).
  With a --remat-policy other than none, transformers recomputes too (gradient
  checkpointing of every layer, as remat `full` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from flaxformer_lite.bench.steps import compiled_steps, random_batch, run_config, step_seconds, torch_step, train_parts
from flaxformer_lite.runtime.flags import positive_int

# A 0.5B-class Llama (Qwen2-0.5B's widths with a 32k vocabulary), as the LoRA goals name it.
LORA_SHAPE = {"layers": 24, "d_model": 896, "heads": 14, "kv_heads": 2, "d_ff": 4864, "vocab": 32000,
              "seq_len": 512, "batch": 4}
TARGETS = ("query", "key", "value", "out", "wi", "wg", "wo")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags only the LoRA mode reads (the shape flags are bench train's)."""
    parser.add_argument("--lora", type=positive_int, metavar="RANK",
                        help="LoRA mode: rank RANK on every attention and MLP projection of a random Llama "
                             f"(default shape {LORA_SHAPE}); optimizer state and peak RSS against a full fine-tune, "
                             "step time against transformers + peft")
    parser.add_argument("--kv-heads", type=positive_int, help=f"LoRA mode: key/value heads (default {LORA_SHAPE['kv_heads']})")
    parser.add_argument("--d-ff", type=positive_int, help=f"LoRA mode: MLP width (default {LORA_SHAPE['d_ff']})")
    parser.add_argument("--rss-steps", type=positive_int, default=2, help="LoRA mode: steps each peak-RSS process runs")
    parser.add_argument("--base-dtypes", nargs="+", default=[], choices=("bfloat16", "int8", "nf4"), metavar="DTYPE",
                        help="LoRA mode: also a peak-RSS process for a frozen base stored so (model.lora.base_dtype: "
                             "bfloat16, int8, nf4), against the float32 base's; with --rss-steps 2 or more, the "
                             "last step's time too")


def _shape(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in LORA_SHAPE.items()}


def _llama_config(shape: dict, rank: int, scan: bool, remat: str, dtype: str, base_dtype=None):
    """Our ModelConfig of the Llama (LoRA of `rank` on every projection, its frozen base
    stored in base_dtype; rank 0: none)."""
    from flaxformer_lite.config import LoraConfig, load_config

    m = load_config("llama_tiny").model
    return dataclasses.replace(
        m, num_layers=shape["layers"], d_model=shape["d_model"], num_heads=shape["heads"],
        num_kv_heads=shape["kv_heads"], d_ff=shape["d_ff"], vocab_size=shape["vocab"], max_len=shape["seq_len"],
        head_dim=None, tie_embeddings=False, dropout_rate=0.0, attention_dropout_rate=0.0, dtype=dtype,
        param_dtype="float32", scan_layers=scan, remat_policy=remat,
        lora=LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS, base_dtype=base_dtype) if rank else LoraConfig(),
    )


def _state_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _optimizer_state_bytes(model_cfg, shape: dict) -> dict:
    """Bytes of the AdamW state (and of the params) with adapters only, and in a full
    fine-tune of the same model without adapters."""
    import jax

    from flaxformer_lite.models import init_params
    from flaxformer_lite.train.optim import make_optimizer
    from flaxformer_lite.train.step import init_train_state

    optimizer = make_optimizer(run_config(model_cfg, shape).train)
    out = {}
    full_cfg = dataclasses.replace(model_cfg, lora=dataclasses.replace(model_cfg.lora, rank=0))
    for name, cfg, adapters_only in (("lora", model_cfg, True), ("full", full_cfg, False)):
        state = jax.eval_shape(lambda: init_train_state(init_params(cfg, jax.random.key(0)), optimizer, 0,
                                                        adapters_only=adapters_only))
        out[name] = {"optimizer_state_bytes": _state_bytes(state.opt_state), "param_bytes": _state_bytes(state.params)}
    return out


# ------------------------------------------------------------------------ peak RSS, per process


def _random_lora_params(model_cfg, seed: int) -> dict:
    """Random LoRA params made one array at a time (normal, std 0.02; B zero), each stored as
    the run stores it: a quantized base is quantized as each kernel is made, as hf.load
    does as it reads, so no float copy of the whole base exists at any time."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from flaxformer_lite.layers import lora
    from flaxformer_lite.layers.common import DTYPES
    from flaxformer_lite.models import init_params

    base_dtype = model_cfg.lora.base_dtype
    float_cfg = dataclasses.replace(model_cfg, lora=dataclasses.replace(model_cfg.lora, base_dtype=None))
    shapes = traverse_util.flatten_dict(jax.eval_shape(lambda: init_params(float_cfg, jax.random.key(0))))
    out = {}
    for i, (key, s) in enumerate(shapes.items()):
        name = str(key[-1])
        w = jax.jit(lambda k, s=s: (0.02 * jax.random.normal(k, s.shape)).astype(s.dtype))(jax.random.key(seed + i))
        if name.endswith("_lora_b"):
            w = jnp.zeros_like(w)
        elif lora.is_adapter(key):
            pass
        elif base_dtype in lora.QUANTIZED and name in lora.AXES:
            lead = w.ndim - len(lora.kernel_shape(model_cfg, name))
            parts = jax.jit(lambda w, name=name, lead=lead: lora.quantized_kernel(name, w, base_dtype, lead))(w)
            out.update({key[:-1] + (part,): value for part, value in parts.items()})
            continue
        elif base_dtype in DTYPES:
            w = w.astype(DTYPES[base_dtype])
        out[key] = jax.block_until_ready(w)
        del w
    return traverse_util.unflatten_dict(out)


def _measure_rss(spec: dict) -> dict:
    """One mode in this fresh process: init, compile, `steps` steps; VmHWM at the end, and
    the last step's seconds when there are two or more."""
    import jax

    from flaxformer_lite.bench.measure import status_bytes
    from flaxformer_lite.models import build_model, init_params
    from flaxformer_lite.train.optim import make_optimizer
    from flaxformer_lite.train.step import init_train_state, make_train_step

    shape, lora = spec["shape"], spec["mode"] == "lora"
    base_dtype = spec.get("base_dtype")
    model_cfg = _llama_config(shape, spec["rank"] if lora else 0, spec["scan"], spec["remat"], spec["dtype"],
                              base_dtype if lora else None)
    cfg = run_config(model_cfg, shape)
    optimizer = make_optimizer(cfg.train)
    baseline = status_bytes("VmRSS")
    params = _random_lora_params(model_cfg, 0) if base_dtype else init_params(model_cfg, jax.random.key(0))
    state = init_train_state(params, optimizer, 0, adapters_only=lora)
    del params
    step = jax.jit(make_train_step(build_model(model_cfg), cfg, optimizer), donate_argnums=0)
    batch = jax.device_put(random_batch(shape, 0))
    start = last = time.perf_counter()
    for _ in range(spec["steps"]):
        last = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss_sum"])
    end = time.perf_counter()
    return {"baseline_rss_bytes": baseline, "peak_rss_bytes": status_bytes("VmHWM"),
            "optimizer_state_bytes": _state_bytes(state.opt_state), "seconds": end - start,
            "last_step_seconds": end - last if spec["steps"] > 1 else None, "loss_sum": float(metrics["loss_sum"])}


def _rss_child(spec: dict) -> dict:
    load = round(os.getloadavg()[0], 2)
    done = subprocess.run([sys.executable, "-m", "flaxformer_lite.bench.lora", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench train --lora: the {spec['mode']} peak-RSS process failed:\n{done.stderr[-4000:]}")
    return {"load_average_1m": load, **json.loads(done.stdout.strip().splitlines()[-1])}


# --------------------------------------------------------------------------- step time, one process


def _peft_model(theirs, model_cfg, params, folder: str):
    """theirs with our adapters, through a PEFT folder (interop.peft), trainable."""
    import peft

    from flaxformer_lite.interop.peft import save_adapters

    save_adapters(model_cfg, params, folder, model_type="llama")
    return peft.PeftModel.from_pretrained(theirs, folder, is_trainable=True)


def run_lora(args: argparse.Namespace) -> dict:
    """The three LoRA figures (see the module docstring); with --no-torch the two memory
    figures only. Prints a report."""
    import jax

    from flaxformer_lite.models import flops

    shape, rank = _shape(args), args.lora
    model_cfg = _llama_config(shape, rank, args.scan_layers, args.remat_policy, args.dtype)
    full_cfg = dataclasses.replace(model_cfg, lora=dataclasses.replace(model_cfg.lora, rank=0))
    optimizer_bytes = _optimizer_state_bytes(model_cfg, shape)
    if not args.no_torch:
        _import_theirs()  # checked before minutes of work
    spec = {"shape": shape, "rank": rank, "scan": args.scan_layers, "remat": args.remat_policy, "dtype": args.dtype,
            "steps": args.rss_steps}
    rss = {mode: _rss_child({**spec, "mode": mode}) for mode in ("lora", "full")}
    bases = {}
    if args.base_dtypes:  # the float32 base made as the others are (one array at a time), for a like comparison
        for base_dtype in ("float32", *args.base_dtypes):
            bases[base_dtype] = _rss_child({**spec, "mode": "lora", "base_dtype": base_dtype})
    lora_params = optimizer_bytes["lora"]["param_bytes"] // 4
    results = {
        "benchmark": "train --lora",
        "model": {**shape, "parameters": optimizer_bytes["full"]["param_bytes"] // 4,
                  "adapter_parameters": lora_params - optimizer_bytes["full"]["param_bytes"] // 4,
                  "lora_rank": rank, "lora_targets": list(TARGETS),
                  "flops_per_token": flops.training_flops_per_token(model_cfg, shape["seq_len"]),
                  "full_flops_per_token": flops.training_flops_per_token(full_cfg, shape["seq_len"])},
        "run": {"dtype": args.dtype, "scan_layers": args.scan_layers, "remat_policy": args.remat_policy,
                "steps_per_round": args.steps, "rounds": args.rounds, "rss_steps": args.rss_steps},
        "optimizer_state": {**optimizer_bytes, "ratio": optimizer_bytes["lora"]["optimizer_state_bytes"]
                            / optimizer_bytes["full"]["optimizer_state_bytes"]},
        "peak_rss": {**rss, "ratio": rss["lora"]["peak_rss_bytes"] / rss["full"]["peak_rss_bytes"]},
        "base_dtypes": bases,
        "steps": None,
        "profile": None,
        "jax": {"version": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0])},
    }
    if not args.no_torch:
        results.update(_step_times(args, shape, rank, results["model"]["flops_per_token"]))
    print(_report(results))
    return results


def _import_theirs():
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"bench train --lora compares with transformers + peft (PyTorch): pip install -e '.[test]' "
                         f"({e}); --no-torch measures the memory figures only")
    return peft, torch, transformers


def _step_times(args: argparse.Namespace, shape: dict, rank: int, flops_per_token: float) -> dict:
    """Our LoRA step against transformers + peft with the same weights and adapters, in this
    process, alternating rounds; results' steps, speedup, matmul_peak, load, profile."""
    import jax

    from flaxformer_lite.interop import hf
    from flaxformer_lite.layers import lora
    from flaxformer_lite.models import flops, init_params
    from flaxformer_lite.train.step import init_train_state

    peft, torch, transformers = _import_theirs()
    B, T = shape["batch"], shape["seq_len"]
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=T, tie_word_embeddings=False, attention_dropout=0.0,
        bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    theirs = transformers.LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        base_cfg, base = hf.load(folder, dtype=args.dtype, scan_layers=args.scan_layers,
                                 remat_policy=args.remat_policy)
    model_cfg = dataclasses.replace(base_cfg, lora=_llama_config(shape, rank, False, "none", args.dtype).lora)
    # The adapters alone: the base's init is never computed (XLA drops what is not returned).
    adapters = jax.jit(lambda key: lora.split(init_params(model_cfg, key))[0])(jax.random.key(args.seed))
    params = lora.join(adapters, base)
    if args.remat_policy != "none":  # ours recomputes each layer's forward in the backward pass; so does theirs
        theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with tempfile.TemporaryDirectory() as folder:
        theirs = _peft_model(theirs, model_cfg, params, folder).train()
    load_start = round(os.getloadavg()[0], 2)
    time_peak = flops.matmul_timer(args.dtype, args.peak_size)
    peak_seconds = [time_peak()]
    cfg, step, optimizer = train_parts(model_cfg, shape)
    batch = jax.device_put(random_batch(shape, args.seed))
    state = init_train_state(params, optimizer, args.seed, adapters_only=True)
    del params, base, adapters
    step_c, compile_s, ours = compiled_steps(step, state, batch)
    del state
    theirs_step, theirs_sync = torch_step(theirs, cfg, random_batch(shape, args.seed), torch.device("cpu"), args.dtype)

    def run_theirs(n):
        for _ in range(n):
            theirs_step()
        theirs_sync()

    ours(args.warmup)
    run_theirs(args.warmup)
    rounds = {"ours": [], "transformers": []}
    for _ in range(args.rounds):
        rounds["ours"].append(step_seconds(ours, args.steps))
        rounds["transformers"].append(step_seconds(run_theirs, args.steps))
        peak_seconds.append(time_peak())
    load_end = round(os.getloadavg()[0], 2)
    peak = flops.matmul_flops_from_seconds(args.peak_size, min(peak_seconds))

    def figures(times):
        s = statistics.median(times)
        return {"ms_per_step": 1e3 * s, "tokens_per_s": B * T / s, "mfu": flops.mfu(B * T / s, flops_per_token, peak),
                "ms_per_step_rounds": [1e3 * t for t in times]}

    steps = {name: figures(times) for name, times in rounds.items()}
    steps["ours"]["compile_s"] = compile_s
    steps["transformers"].update(version=transformers.__version__, torch=torch.__version__, peft=peft.__version__,
                                 torch_threads=torch.get_num_threads(),
                                 gradient_checkpointing=args.remat_policy != "none")
    profile = None
    if args.profile:
        from flaxformer_lite.bench.profile import profile_step

        profile = profile_step(step_c, ours, args.steps, args.profile)
    return {
        "steps": steps,
        "speedup": steps["ours"]["tokens_per_s"] / steps["transformers"]["tokens_per_s"],
        "step_load_average_1m": {"start": load_start, "end": load_end},
        "matmul_peak": {"flops_per_s": peak, "dtype": args.dtype, "size": args.peak_size,
                        "seconds_samples": peak_seconds},
        "profile": profile,
    }


def _report(r: dict) -> str:
    m, o, p, s = r["model"], r["optimizer_state"], r["peak_rss"], r["steps"]

    def added(run):
        return run["peak_rss_bytes"] - run["baseline_rss_bytes"]

    lines = [
        f"Llama {m['layers']} layers, d_model {m['d_model']}, {m['heads']}/{m['kv_heads']} heads, d_ff {m['d_ff']}, "
        f"vocab {m['vocab']}, T {m['seq_len']}, batch {m['batch']} ({m['parameters']:,} parameters); LoRA rank "
        f"{m['lora_rank']} on {', '.join(m['lora_targets'])}: {m['adapter_parameters']:,} adapter parameters "
        f"({100 * m['adapter_parameters'] / m['parameters']:.2f}%); {r['run']['dtype']}, AdamW",
        f"model FLOPs per token: LoRA {m['flops_per_token'] / 1e9:.2f} G, full fine-tune "
        f"{m['full_flops_per_token'] / 1e9:.2f} G",
        "",
        "| figure | LoRA | full fine-tune | ratio | goal | 1-min load |",
        "|---|---|---|---|---|---|",
        f"| optimizer state | {o['lora']['optimizer_state_bytes'] / 2**20:,.1f} MiB | "
        f"{o['full']['optimizer_state_bytes'] / 2**20:,.1f} MiB | {100 * o['ratio']:.2f}% | <= 2% | (exact) |",
        f"| peak RSS ({r['run']['rss_steps']} steps, own process) | {p['lora']['peak_rss_bytes'] / 2**30:.2f} GiB | "
        f"{p['full']['peak_rss_bytes'] / 2**30:.2f} GiB | {100 * p['ratio']:.1f}% | <= 50% | "
        f"{p['lora']['load_average_1m']} / {p['full']['load_average_1m']} |",
        f"| of which above the process after its imports | {added(p['lora']) / 2**30:.2f} GiB | "
        f"{added(p['full']) / 2**30:.2f} GiB | {100 * added(p['lora']) / added(p['full']):.1f}% | | |",
    ]
    if r.get("base_dtypes"):
        bases, ref = r["base_dtypes"], r["base_dtypes"]["float32"]
        lines += ["", "| frozen base (LoRA, own process) | peak RSS | ratio | last step s | ratio | loss | 1-min load |",
                  "|---|---|---|---|---|---|---|"]
        for name, run in bases.items():
            step_s, ref_s = run["last_step_seconds"], ref["last_step_seconds"]
            lines.append(f"| {name} | {run['peak_rss_bytes'] / 2**30:.2f} GiB | "
                         f"{run['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x | "
                         f"{'-' if step_s is None else f'{step_s:.1f}'} | "
                         f"{'-' if step_s is None else f'{step_s / ref_s:.2f}x'} | {run['loss_sum']:.5g} | "
                         f"{run['load_average_1m']} |")
    if s is None:
        return "\n".join(lines)
    t = s["transformers"]
    lines += [
        "",
        "| LoRA step, one process, alternating rounds | tokens/s | ms/step | MFU (LoRA FLOPs) |",
        "|---|---|---|---|",
        f"| flaxformer_lite (jit, optax) | {s['ours']['tokens_per_s']:,.0f} | {s['ours']['ms_per_step']:.0f} | "
        f"{100 * s['ours']['mfu']:.1f}% |",
        f"| transformers {t['version']} + peft {t['peft']} (torch {t['torch']}, {t['torch_threads']} threads) | "
        f"{t['tokens_per_s']:,.0f} | {t['ms_per_step']:.0f} | {100 * t['mfu']:.1f}% |",
        "",
        f"ours / transformers + peft: {r['speedup']:.2f}x tokens/s (goal >= 1.0x); 1-min load "
        f"{r['step_load_average_1m']['start']} at start, {r['step_load_average_1m']['end']} at end; "
        f"matmul peak {r['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s; our step compiles in "
        f"{s['ours']['compile_s']:.1f} s",
    ]
    if r["profile"]:
        from flaxformer_lite.bench.profile import format_profile

        lines += format_profile(r["profile"], r["matmul_peak"]["flops_per_s"])
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_measure_rss(json.loads(sys.argv[1]))))
