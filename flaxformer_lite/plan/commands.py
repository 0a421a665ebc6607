"""`flaxformer-lite plan`: a run's programs compiled ahead of time for a TPU slice.

    flaxformer-lite plan --config llama3_tiny --topology v5e-4
    flaxformer-lite plan --init-from path/to/hf_dir --topology v5p-8 --batch auto --json
    flaxformer-lite plan --config llama3_tiny --topology v5e-4 --serve --max-batch 8 --max-len 128

Needs libtpu (the `[tpu]` extra) and no TPU chip. JAX is imported inside `run_plan`,
after libtpu's environment defaults are set (plan.topology.libtpu_environment).
"""

from __future__ import annotations

import argparse
import json

from flaxformer_lite.errors import UserError


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite plan`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML run config, or a preset name (llama3_tiny)")
    source.add_argument("--init-from", metavar="HF_DIR", help="a local HF folder whose model to plan for")
    parser.add_argument("--topology", required=True,
                        help="a TPU slice as Cloud TPU names it: v4-8, v5e-8 (v5litepod-8), v5p-64, v6e-16, ... "
                        "(or libtpu's v5e:2x2); a multi-host slice compiles as one slice")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set parallel.fsdp=-1 parallel.data=1 model.remat_policy=full")
    parser.add_argument("--batch", choices=["config", "auto"], default="config",
                        help="config: data.batch_size as given; auto: the largest global batch that fits")
    parser.add_argument("--serve", action="store_true",
                        help="plan the serving engine (its prefill and decode-step programs) instead of training")
    parser.add_argument("--max-batch", type=int, default=8, help="--serve: sequences decoded together (KV-cache slots)")
    parser.add_argument("--max-len", type=int, default=None, help="--serve: tokens a slot holds (default model.max_len)")
    parser.add_argument("--chunk", type=int, default=64, help="--serve: prompt tokens prefilled per engine step")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _config(args: argparse.Namespace):
    from flaxformer_lite.config import ConfigError, load_config

    if args.config:
        return load_config(args.config, overrides=args.set)
    from flaxformer_lite.interop import hf
    from flaxformer_lite.interop.commands import hf_run_config

    if not hf.is_hf_folder(args.init_from):
        raise UserError(f"--init-from {args.init_from}: not an HF folder (config.json and *.safetensors)")
    try:
        model_cfg = hf.read_model_config(args.init_from)
    except hf.HFError as e:
        raise ConfigError(f"--init-from {e}") from None
    # A plan needs the model's shapes only: no tokenizer is read.
    return hf_run_config(args.init_from, model_cfg, overrides=args.set, tokenizer="byte")


def run_plan(args: argparse.Namespace) -> int:
    """Compile and print the plan; bad input raises a UserError (one line from cli.main)."""
    from flaxformer_lite.plan import topology

    topo = topology.parse(args.topology)
    topology.libtpu_environment(topo)
    cfg = _config(args)
    devices = topology.compile_devices(topo)
    from flaxformer_lite.plan import planner

    if args.serve:
        from flaxformer_lite.plan import serving

        if min(args.max_batch, args.chunk, args.max_len or 1) < 1:
            raise UserError(f"--max-batch {args.max_batch}, --chunk {args.chunk} and --max-len {args.max_len} "
                            "must be positive")
        report = serving.plan_serve(cfg, topo, devices, max_batch=args.max_batch,
                                    max_len=args.max_len or cfg.model.max_len, chunk=args.chunk)
        print(json.dumps(report, indent=2) if args.json else serving.format_serve_report(report))
        return 0
    report = planner.plan_train(cfg, topo, devices, auto_batch=args.batch == "auto")
    print(json.dumps(report, indent=2) if args.json else planner.format_report(report))
    return 0
