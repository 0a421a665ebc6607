"""`bench train`: our jitted training step against transformers' GPT-2 + torch AdamW, same weights.

One process, one run: both steps train the same randomly initialised GPT-2 (built in
transformers, loaded here through interop.hf) on the same batch with the same AdamW
settings, on the same device; a square matmul, timed before the rounds and once in
each, measures the peak the MFU is taken against (the best of those runs). It also times compilation against depth (scan on and off) and reads XLA's
compiled temp memory for each remat policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

from flaxformer_lite.bench.steps import compiled_steps, random_batch, run_config, step_seconds, torch_step, train_parts
from flaxformer_lite.runtime.flags import non_negative_int, positive_int

# The default shape: GPT-2 at a size two CPU cores train in milliseconds a step.
SHAPE_DEFAULTS = {"layers": 4, "d_model": 256, "heads": 4, "vocab": 8192, "seq_len": 256, "batch": 8}
REMAT_POLICIES = ("none", "full", "dots_with_no_batch_dims_saveable")
PEAK_REPEATS = 5  # matmul peak runs before the rounds; one more runs in each round


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Model shape, workload and which parts of the benchmark to run."""
    parser.add_argument("--preset", help="take the shape from this GPT-2-style preset (e.g. gpt2_small); "
                                         "the shape flags below override it")
    for name, default in SHAPE_DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive_int, help=f"default {default} (or the preset's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype; parameters and optimizer state stay float32 on both sides")
    parser.add_argument("--attention-impl", choices=("xla", "auto", "cudnn"), default="xla",
                        help="ours: 'auto' is jax.nn.dot_product_attention's XLA path, 'cudnn' its cuDNN "
                             "flash attention (NVIDIA GPU, bfloat16/float16)")
    parser.add_argument("--scan-layers", action="store_true", help="ours: run the layers under nn.scan")
    parser.add_argument("--remat-policy", default="none", help="ours: model.remat_policy of the timed step")
    parser.add_argument("--steps", type=positive_int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="timed rounds per framework, interleaved ours/theirs so load drift hits both")
    parser.add_argument("--warmup", type=positive_int, default=3,
                        help="untimed steps per framework first (the first compiles)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers step (e.g. no CUDA torch)")
    parser.add_argument("--peak-size", type=positive_int, default=2048, help="matrix size of the matmul peak")
    parser.add_argument("--compile-depths", type=positive_int, nargs="*", default=[2, 24],
                        help="layer counts to time compilation at, scan on and off (none: skip)")
    parser.add_argument("--compile-unrolled-max", type=non_negative_int, default=24,
                        help="skip unrolled compiles deeper than this (they take about a minute at 24 on a CPU)")
    parser.add_argument("--memory-layers", type=non_negative_int, default=12, help="depth of the remat memory table (0: skip)")
    parser.add_argument("--memory-d-model", type=positive_int, default=128, help="width of the remat memory table")
    parser.add_argument("--loss-vocab", type=non_negative_int, default=50257,
                        help="vocabulary of the loss memory table, whole logits against train.loss_chunk_size (0: skip)")
    parser.add_argument("--loss-chunk", type=positive_int, default=512, help="tokens per chunk in the loss memory table")
    parser.add_argument("--profile", metavar="DIR",
                        help="also trace --steps of our step into DIR (TensorBoard/Perfetto) and print where the time "
                             "goes, with each matrix multiplication's GFLOP/s (exact with --single-thread)")
    parser.add_argument("--single-thread", action="store_true",
                        help="run the process on one CPU, torch with one thread (Linux); the matmul peak is then "
                             "one CPU's too")
    parser.add_argument("--seed", type=int, default=0)
    from flaxformer_lite.bench.lora import add_lora_arguments

    add_lora_arguments(parser)


def _shape(args: argparse.Namespace) -> dict:
    shape = dict(SHAPE_DEFAULTS)
    if args.preset:
        from flaxformer_lite.config import load_config

        m = load_config(args.preset).model
        if m.family != "decoder" or m.position != "learned" or m.activation != "gelu_tanh":
            raise SystemExit(f"bench train --preset {args.preset}: not a GPT-2-style decoder "
                             "(family decoder, learned positions, gelu_tanh); pick e.g. gpt2_small")
        shape.update(layers=m.num_layers, d_model=m.d_model, heads=m.num_heads, vocab=m.vocab_size,
                     seq_len=m.max_len)
    for name in SHAPE_DEFAULTS:
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    return shape


def _compile_seconds(model_cfg, shape: dict, layers: int, scan: bool) -> float:
    """Seconds to trace, lower and compile our train step at `layers` layers (nothing allocated)."""
    import jax

    from flaxformer_lite.models import init_params
    from flaxformer_lite.train.step import init_train_state

    cfg_l = dataclasses.replace(model_cfg, num_layers=layers, scan_layers=scan)
    _, step, optimizer = train_parts(cfg_l, shape)
    state = jax.eval_shape(lambda: init_train_state(init_params(cfg_l, jax.random.key(0)), optimizer, 0))
    batch = random_batch(shape, 0)
    start = time.perf_counter()
    step.lower(state, batch).compile()
    return time.perf_counter() - start


def _temp_memory(model_cfg, shape: dict, policy: str, scan: bool, loss_chunk_size=None) -> int:
    """Compiled temp bytes of forward + backward (value_and_grad of the training loss)."""
    import jax

    from flaxformer_lite.models import build_model, init_params
    from flaxformer_lite.train.step import loss_and_sums

    cfg_p = dataclasses.replace(model_cfg, remat_policy=policy, scan_layers=scan)
    cfg = run_config(cfg_p, shape, loss_chunk_size)
    model = build_model(cfg_p)
    params = jax.eval_shape(lambda: init_params(cfg_p, jax.random.key(0)))

    def loss(p, batch):
        return loss_and_sums(model, cfg, p, batch, deterministic=True, rng=None)[0]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, random_batch(shape, 0)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def run_train(args: argparse.Namespace) -> dict:
    """Time both training steps side by side; compile time vs depth; temp memory per remat policy.
    With --lora: the LoRA figures instead (bench.lora)."""
    if args.lora:
        from flaxformer_lite.bench.lora import run_lora

        return run_lora(args)
    import jax

    from flaxformer_lite.interop import hf
    from flaxformer_lite.models import count_params, flops
    from flaxformer_lite.train.step import init_train_state

    shape = _shape(args)
    B, T = shape["batch"], shape["seq_len"]
    backend = jax.default_backend()
    # Our model comes from transformers' random GPT-2 (same weights on both sides).
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"bench train builds its GPT-2 in transformers (PyTorch): pip install -e '.[test]' ({e})")
    config = transformers.GPT2Config(
        vocab_size=shape["vocab"], n_positions=T, n_embd=shape["d_model"], n_layer=shape["layers"],
        n_head=shape["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=shape["vocab"] - 1, eos_token_id=shape["vocab"] - 1,
    )
    torch.manual_seed(args.seed)
    theirs = transformers.GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        model_cfg, params = hf.load(
            folder, dtype=args.dtype, attention_impl=args.attention_impl, scan_layers=args.scan_layers,
            remat_policy=args.remat_policy,
        )
    flops_per_token = flops.training_flops_per_token(model_cfg, T)
    # The peak is sampled again in every round, beside the steps: a slow moment of a shared
    # machine at the start would otherwise inflate every MFU of the run.
    time_peak = flops.matmul_timer(args.dtype, args.peak_size)
    peak_seconds = [time_peak() for _ in range(PEAK_REPEATS)]

    cfg, step, optimizer = train_parts(model_cfg, shape)
    batch = jax.device_put(random_batch(shape, args.seed))
    step_c, compile_s, ours = compiled_steps(step, init_train_state(params, optimizer, args.seed), batch)
    rounds = {"ours": []}
    ours(args.warmup)
    theirs_step = theirs_sync = None
    if not args.no_torch:
        device = torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")
        theirs = theirs.to(device).train()
        theirs_step, theirs_sync = torch_step(theirs, cfg, random_batch(shape, args.seed), device, args.dtype)
        rounds["transformers"] = []

        def run_theirs(n):
            for _ in range(n):
                theirs_step()
            theirs_sync()

        run_theirs(args.warmup)
    for _ in range(args.rounds):
        rounds["ours"].append(step_seconds(ours, args.steps))
        if theirs_step is not None:
            rounds["transformers"].append(step_seconds(run_theirs, args.steps))
        peak_seconds.append(time_peak())
    peak = flops.matmul_flops_from_seconds(args.peak_size, min(peak_seconds))

    def figures(times):
        s = statistics.median(times)
        tps = B * T / s
        return {"ms_per_step": 1e3 * s, "tokens_per_s": tps, "mfu": flops.mfu(tps, flops_per_token, peak),
                "ms_per_step_rounds": [1e3 * t for t in times]}

    steps = {name: figures(times) for name, times in rounds.items()}
    steps["ours"]["compile_s"] = compile_s
    if "transformers" in steps:
        steps["transformers"].update(version=transformers.__version__, torch=torch.__version__,
                                     torch_threads=torch.get_num_threads(), device=str(device))

    profile = None
    if args.profile:
        from flaxformer_lite.bench.profile import profile_step

        profile = profile_step(step_c, ours, args.steps, args.profile)

    compile_rows = []
    for layers in args.compile_depths:
        for scan in (True, False):
            if not scan and layers > args.compile_unrolled_max:
                continue
            compile_rows.append({"layers": layers, "scan": scan, "seconds": _compile_seconds(model_cfg, shape, layers, scan)})

    memory_rows = []
    if args.memory_layers:
        mem_cfg = dataclasses.replace(model_cfg, num_layers=args.memory_layers, d_model=args.memory_d_model,
                                      d_ff=4 * args.memory_d_model)
        for scan in (False, True):
            for policy in REMAT_POLICIES:
                memory_rows.append({"layers": args.memory_layers, "d_model": args.memory_d_model, "scan": scan,
                                    "policy": policy, "temp_bytes": _temp_memory(mem_cfg, shape, policy, scan)})

    loss_rows = []
    if args.loss_vocab:
        loss_cfg = dataclasses.replace(model_cfg, vocab_size=args.loss_vocab)
        loss_shape = dict(shape, vocab=args.loss_vocab)
        for chunk in (None, args.loss_chunk):
            loss_rows.append({"vocab": args.loss_vocab, "loss_chunk_size": chunk,
                              "temp_bytes": _temp_memory(loss_cfg, loss_shape, "none", args.scan_layers, chunk)})

    results = {
        "benchmark": "train",
        "model": {**shape, "parameters": count_params(params), "flops_per_token": flops_per_token},
        "run": {"dtype": args.dtype, "attention_impl": args.attention_impl, "scan_layers": args.scan_layers,
                "remat_policy": args.remat_policy, "steps_per_round": args.steps, "rounds": args.rounds,
                "single_thread": args.single_thread,
                "optimizer": dataclasses.asdict(cfg.train) | {"schedule": "constant"}},
        "matmul_peak": {"flops_per_s": peak, "dtype": args.dtype, "size": args.peak_size,
                        "seconds_samples": peak_seconds},
        "steps": steps,
        "compile": compile_rows,
        "memory": memory_rows,
        "loss_memory": loss_rows,
        "profile": profile,
        "jax": {"version": jax.__version__, "backend": backend, "device": str(jax.devices()[0]),
                "xla_flags": os.environ.get("XLA_FLAGS", "")},
    }
    if "transformers" in steps:
        results["speedup"] = steps["ours"]["tokens_per_s"] / steps["transformers"]["tokens_per_s"]
    print(_train_report(results))
    return results


def _train_report(r: dict) -> str:
    m, run, s = r["model"], r["run"], r["steps"]
    lines = [
        f"GPT-2 {m['layers']} layers, d_model {m['d_model']}, {m['heads']} heads, vocab {m['vocab']}, "
        f"T {m['seq_len']}, batch {m['batch']} ({m['parameters']:,} parameters, "
        f"{m['flops_per_token'] / 1e6:.1f} MFLOP/token); {run['dtype']}, AdamW; {r['jax']['device']}",
        f"matmul peak ({r['matmul_peak']['size']}^3 {run['dtype']}): {r['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s",
        "",
        "| step | tokens/s | ms/step | MFU |",
        "|---|---|---|---|",
    ]
    for name, v in s.items():
        label = ("flaxformer_lite (jit, optax)" if name == "ours" else
                 f"transformers {v['version']} (torch {v['torch']}, {v['torch_threads']} threads)")
        lines.append(f"| {label} | {v['tokens_per_s']:,.0f} | {v['ms_per_step']:.1f} | {100 * v['mfu']:.1f}% |")
    if "speedup" in r:
        lines += ["", f"ours / transformers: {r['speedup']:.2f}x tokens/s"]
    lines += [f"our step compiles in {s['ours']['compile_s']:.1f} s"]
    if r["compile"]:
        lines += ["", "| layers | scan | compile s |", "|---|---|---|"]
        lines += [f"| {c['layers']} | {'yes' if c['scan'] else 'no'} | {c['seconds']:.1f} |" for c in r["compile"]]
    if r["memory"]:
        first = r["memory"][0]
        lines += ["", f"compiled temp memory, forward + backward, {first['layers']} layers, d_model {first['d_model']}:",
                  "", "| scan | remat policy | temp MiB |", "|---|---|---|"]
        lines += [f"| {'yes' if x['scan'] else 'no'} | {x['policy']} | {x['temp_bytes'] / 2**20:.0f} |"
                  for x in r["memory"]]
    if r["profile"]:
        from flaxformer_lite.bench.profile import format_profile

        lines += format_profile(r["profile"], r["matmul_peak"]["flops_per_s"])
    if r["loss_memory"]:
        lines += ["", f"compiled temp memory, forward + backward, vocab {r['loss_memory'][0]['vocab']:,} "
                      f"(B {m['batch']}, T {m['seq_len']}):",
                  "", "| train.loss_chunk_size | temp MiB |", "|---|---|"]
        lines += [f"| {x['loss_chunk_size'] or 'none (whole logits)'} | {x['temp_bytes'] / 2**20:.0f} |"
                  for x in r["loss_memory"]]
    return "\n".join(lines)
