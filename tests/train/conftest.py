"""Shared tiny runs: a 1-layer d=32 GPT trained 20 steps once per session."""

import pytest

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
