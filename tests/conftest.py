"""Shared test setup: CPU only, 8 simulated devices for sharding tests."""

import os
import shutil
import tempfile

# Before JAX initialises its backend: tests must not grab a GPU by chance, and the
# sharding tests need several devices on one CPU. The suite's time goes mostly to
# compiling hundreds of tiny programs, so LLVM optimises them less: the decoding-cache and
# learning tests took 105 s instead of 141 s. This changes code generation only (HLO
# passes, buffer assignment and compiled memory figures are the same); benchmarks run
# without it. Subprocesses started by tests inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the test extra, for tests/test_plan.py) compiles for TPU slices without a chip
# and keeps the CPU as JAX's backend under JAX_PLATFORMS=cpu. Its lock file would refuse a
# second process (pytest -n 2, a plan beside a test) without ALLOW_MULTIPLE_LIBTPU_LOAD;
# TPU_WORKER_HOSTNAMES silences its start-up warning.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
# The CLI tunes glibc's malloc for the process it runs in (flaxformer_lite/runtime/host.py); tests
# call it inside pytest's workers, which must keep glibc's defaults. tests/test_host.py
# and the kill-and-resume test turn it on in their own subprocesses.
os.environ.setdefault("FLAXFORMER_LITE_TUNE_MALLOC", "0")


import pytest  # noqa: E402


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run: the xdist workers and the
    `flaxformer-lite` subprocesses inherit the variable, so a program the tests compile
    again and again (the tiny GPT's train step, in a dozen runs) compiles once. It is
    the cache the CLI uses for users (cli.use_compilation_cache); removed at the end."""
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    config.xla_cache_dir = tempfile.mkdtemp(prefix="flaxformer_lite_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config.xla_cache_dir


def pytest_unconfigure(config):
    if getattr(config, "xla_cache_dir", None):
        shutil.rmtree(config.xla_cache_dir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Corpora prepared on the fly go to a temporary cache, not the user's ~/.cache
    (subprocesses inherit the variable)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLAXFORMER_LITE_CACHE", str(tmp_path_factory.mktemp("data_cache")))
        yield
