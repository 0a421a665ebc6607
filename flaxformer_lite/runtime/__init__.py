"""The process and the run: mesh and sharding rules (parallel.py), multi-host start,
checkpoints and the run directory (checkpoint.py), the host's malloc tuning and cache
folder (host.py), and the checked types of command-line flags (flags.py).

Nothing is imported here, so a command's `--help` that needs flags.py starts no JAX.
"""
