"""Shared tiny runs: a 1-layer d=32 GPT trained 20 steps once per session."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

import flaxformer_lite as ffl
from flaxformer_lite.train import loop, metrics

# Small enough that a step takes milliseconds; batch 8 splits over the 8 simulated devices.
TINY = (
    "model.num_layers=1", "model.d_model=32", "model.d_ff=64", "model.num_heads=2", "model.max_len=32",
    "data.seq_len=32", "data.batch_size=8", "train.eval_batches=2", "train.warmup_steps=5",
    "train.learning_rate=0.01", "train.time_budget_s=null", "train.num_samples=0",
)
GPT_RUN = (
    "train.num_steps=20", "train.log_every=1", "train.eval_every=10", "train.checkpoint_every=5",
    "train.num_samples=2", "train.sample_len=8",
)


@pytest.fixture(scope="session")
def tiny():
    """tiny(preset, *overrides) -> a CPU-test-sized Config of that preset."""
    return lambda preset, *overrides: ffl.load_config(preset, overrides=TINY + tuple(overrides))


@pytest.fixture(scope="session")
def gpt_overrides():
    """The --set overrides of the session's GPT run, for subprocesses."""
    return list(TINY + GPT_RUN)


@pytest.fixture(scope="session")
def gpt_cfg(gpt_overrides):
    return ffl.load_config("gpt_tiny", overrides=gpt_overrides)


@pytest.fixture(scope="session")
def gpt_run(gpt_cfg, tmp_path_factory):
    """(workdir, summary) of one uninterrupted 20-step run."""
    workdir = tmp_path_factory.mktemp("gpt") / "run"
    return workdir, loop.train(gpt_cfg, workdir)


@pytest.fixture
def on_batch(monkeypatch):
    """on_batch(n, action): from now on, loop.train calls action() as its training stream
    draws the n-th batch (counted over the runs of the test; once), in the loop's thread:
    a signal, or an error in the data pipeline, at a chosen step."""
    def install(n, action):
        real, drawn = loop.prepare_data, []

        def count(batch):
            drawn.append(1)
            if len(drawn) == n:
                action()
            return batch

        def prepare(cfg, **kwargs):
            setup = real(cfg, **kwargs)
            setup.train = setup.train.map(count)
            return setup

        monkeypatch.setattr(loop, "prepare_data", prepare)
    return install


@pytest.fixture(scope="session")
def records():
    """records(workdir) -> its metrics.jsonl without each record's timing (tokens_per_s,
    mfu), which no two runs share."""
    return lambda workdir: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
                            for r in metrics.read_metrics(workdir)]


@pytest.fixture
def step_fault(monkeypatch):
    """step_fault(n, kind): once, while the compiled train step computes step n, after its
    state was donated to it, a host callback inside the program either raises ("raise":
    as a bug or a device fault would) or turns one parameter non-finite ("poison": as a
    flipped bit would). The run's cached programs are rebuilt around it, and again after."""
    def install(n, kind):
        real, fired = loop.make_train_step, []

        def hit(step):
            if int(step) != n - 1 or fired:
                return False
            fired.append(step)
            return True

        def fail(step, _):
            if hit(step):
                raise RuntimeError("a fault inside the step")

        def poison(step):
            return np.float32(np.inf if hit(step) else 0.0)

        def make(*args, **kwargs):
            step_fn = real(*args, **kwargs)

            def train_step(state, batch):
                new, sums = step_fn(state, batch)
                if kind == "raise":  # after the gradients' all-reduce: no device waits for a failed one
                    io_callback(fail, None, state.step, sums["grad_norm"])
                    return new, sums
                leaves, tree = jax.tree.flatten(new.params)
                leaves[0] = leaves[0] + io_callback(poison, jax.ShapeDtypeStruct((), jnp.float32), state.step)
                return new.replace(params=jax.tree.unflatten(tree, leaves)), sums
            return train_step

        monkeypatch.setattr(loop, "make_train_step", make)
        loop.programs.cache_clear()
    yield install
    loop.programs.cache_clear()
