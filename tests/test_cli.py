"""The command line: every command's --help answers without starting JAX."""

import subprocess
import sys

from flaxformer_lite import cli
from flaxformer_lite.inference import commands, embeddings
from flaxformer_lite.inference.decode import METHODS

_HELP_ALL = """
import sys
from flaxformer_lite import cli
for command in cli.COMMANDS:
    try:
        cli.main([command, "--help"])
    except SystemExit as e:
        assert e.code == 0, (command, e.code)
    heavy = sorted(m for m in ("jax", "flax", "grain", "orbax", "torch") if m in sys.modules)
    assert not heavy, f"flaxformer-lite {command} --help imported {heavy}"
print("usage lines:", sum(1 for _ in cli.COMMANDS))
"""


def test_every_command_help_prints_usage_without_importing_jax():
    out = subprocess.run([sys.executable, "-c", _HELP_ALL], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in cli.COMMANDS:
        assert f"usage: flaxformer-lite {command}" in out.stdout
    assert f"usage lines: {len(cli.COMMANDS)}" in out.stdout


def test_spelled_out_choices_equal_the_library_ones():
    assert commands.DECODE_METHODS == METHODS
    assert commands.EMBED_POOLINGS == embeddings.POOLINGS
