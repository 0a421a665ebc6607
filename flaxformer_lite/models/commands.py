"""`flaxformer-lite summary`: parameters, FLOPs and memory of a config (summary.py).

    flaxformer-lite summary --config gpt2_small --set data.batch_size=8

JAX is imported inside `run_summary`, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from flaxformer_lite.errors import EXIT_BAD_INPUT


def add_summary_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite summary`."""
    parser.add_argument("--config", required=True, help="YAML run config, or a preset name (gpt2_small)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set data.batch_size=8 model.num_layers=24")


def run_summary(args: argparse.Namespace) -> int:
    """`flaxformer-lite summary`: print the report; a bad config prints one error line."""
    from flaxformer_lite.config import ConfigError, load_config
    from flaxformer_lite.models.summary import summary

    try:
        cfg = load_config(args.config, overrides=args.set)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(summary(cfg))
    return 0
