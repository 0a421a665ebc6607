"""Shared test setup: CPU only, 8 simulated devices for sharding tests."""

import os

# Before JAX initialises its backend: tests must not grab a GPU by chance, and the
# sharding tests need several devices on one CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Corpora prepared on the fly go to a temporary cache, not the user's ~/.cache
    (subprocesses inherit the variable)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLAXFORMER_LITE_CACHE", str(tmp_path_factory.mktemp("data_cache")))
        yield
