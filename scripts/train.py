#!/usr/bin/env python
"""Thin launcher: `python scripts/train.py --config configs/gpt_tiny.yaml --workdir runs/x [...]`.

The same as `flaxformer-lite train ...`; all logic is in flaxformer_lite.train.
"""

import sys

from flaxformer_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
