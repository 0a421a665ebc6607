"""Shared test setup: CPU only, 8 simulated devices for sharding tests."""

import os

# Before JAX initialises its backend: tests must not grab a GPU by chance, and the
# sharding tests need several devices on one CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
