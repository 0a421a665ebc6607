"""`flaxformer-lite viz`: attention plots of a run or an HF folder, or position-encoding plots.

    flaxformer-lite viz --workdir runs/gpt_tiny --text "The quick brown fox" --out viz/
    flaxformer-lite viz --positions --config t5_tiny --out viz/positions

Reading run directories and HF folders is this module's job; the plots (plots.py) take a
config and parameters. JAX is imported inside `run_viz`, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional

from flaxformer_lite.errors import EXIT_BAD_INPUT
from flaxformer_lite.runtime.flags import non_negative_int, positive_int


def add_viz_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite viz` (attention by default, --positions for position encodings)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--workdir", help="a run directory (config.yaml + checkpoints)")
    source.add_argument("--hf", help="a local HuggingFace model folder (config.json + safetensors)")
    source.add_argument("--config", help="--positions only: a YAML config or preset name (a fresh init)")
    parser.add_argument("--positions", action="store_true",
                        help="plot the position encoding (tables, similarities, biases) instead of attention")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override --config keys, e.g. --set model.position=alibi")
    parser.add_argument("--text", help="the input text (attention plots)")
    parser.add_argument("--target", default=None, help="decoder text (attention plots, encoder-decoder models)")
    parser.add_argument("--out", required=True, help="folder for the PNGs (and index.html)")
    parser.add_argument("--step", type=non_negative_int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--length", type=positive_int, default=None,
                        help="--positions: positions to draw (default: model.max_len)")


def _argument_problem(args: argparse.Namespace) -> Optional[str]:
    if args.set and not args.config:
        return "--set overrides --config keys: add --config, or drop --set"
    if args.positions:
        if not (args.config or args.workdir or args.hf):
            return "viz --positions needs --config CONFIG (a fresh init), --workdir RUN or --hf DIR"
        if args.text is not None or args.target is not None:
            return "--text/--target are for attention plots: drop them with --positions"
        return None
    if args.config:
        return "attention plots need trained weights: use --workdir or --hf (or add --positions)"
    if not (args.workdir or args.hf):
        return "viz needs --workdir RUN or --hf DIR (or --positions --config CONFIG)"
    if args.text is None:
        return "viz needs --text (the input whose attention to plot), or --positions"
    if args.length is not None:
        return "--length is for --positions plots"
    return None


def _run_positions(args: argparse.Namespace) -> int:
    from flaxformer_lite.config import load_config
    from flaxformer_lite.runtime import checkpoint
    from flaxformer_lite.viz.plots import plot_positions

    try:
        if args.config:
            cfg, params, source = load_config(args.config, overrides=args.set).model, None, None
        elif args.workdir:
            run_cfg, params = checkpoint.load_params(args.workdir, step=args.step)
            cfg = run_cfg.model
            source = f"run {args.workdir}, " + ("latest step" if args.step is None else f"step {args.step}")
        else:
            from flaxformer_lite.interop import hf

            cfg, params = hf.load(args.hf)
            source = f"HF folder {args.hf}"
        written = plot_positions(cfg, args.out, params, source=source, length=args.length)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and HFError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {', '.join(p.name for p in written)} to {args.out}")
    return 0


def run_viz(args: argparse.Namespace) -> int:
    """Attention plots (PNGs + index.html) or, with --positions, position-encoding plots."""
    problem = _argument_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.positions:
        return _run_positions(args)
    import jax
    import jax.numpy as jnp

    from flaxformer_lite import data
    from flaxformer_lite.runtime import checkpoint
    from flaxformer_lite.viz.plots import visualize

    if args.workdir:
        run_cfg, params = checkpoint.load_params(args.workdir, step=args.step)
        cfg, tokenizer = run_cfg.model, data.load_tokenizer(run_cfg.data.tokenizer)
    else:
        from flaxformer_lite.interop import hf

        cfg, params = hf.load(args.hf)
        tokenizer = data.load_tokenizer(args.hf)
    params = jax.tree.map(jnp.asarray, params)
    written = visualize(cfg, params, tokenizer, args.text, args.out, target=args.target)
    print(f"wrote {len(written)} files to {args.out}; open {pathlib.Path(args.out) / 'index.html'}")
    return 0
