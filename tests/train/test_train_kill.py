"""A process SIGKILLed while saving leaves no checkpoint that a resume would take."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from orbax.checkpoint._src.path import atomicity

from flaxformer_lite.runtime import checkpoint
from flaxformer_lite.train import loop, metrics

# The child trains the session's 20-step run, but holds the save of step 10 open after
# its files are written and before orbax commits them (the rename of its temporary
# directory), and says so through a marker file; the test then kills it. It runs with the
# CLI's malloc settings (host.tune_malloc), so the comparison with the reference run also
# shows they change no figure.
CHILD = """
from flaxformer_lite.runtime import host
assert host.tune_malloc()
import asyncio, json, pathlib, sys
from orbax.checkpoint._src.path import atomicity
import flaxformer_lite as ffl
from flaxformer_lite.train import loop

workdir, marker, overrides = sys.argv[1], pathlib.Path(sys.argv[2]), json.loads(sys.argv[3])
commit = atomicity.AtomicRenameTemporaryPath.finalize

async def stalled_commit(self):
    if self.get_final().name == "10":
        marker.write_text("step 10 written, not committed")
        await asyncio.sleep(3600)
    await commit(self)

atomicity.AtomicRenameTemporaryPath.finalize = stalled_commit
loop.train(ffl.load_config("gpt_tiny", overrides=overrides), workdir)
"""


def test_kill_during_save_then_resume_loses_nothing(gpt_run, gpt_cfg, gpt_overrides, tmp_path):
    reference, _ = gpt_run
    workdir, marker = tmp_path / "run", tmp_path / "saving"
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(workdir), str(marker), json.dumps(gpt_overrides)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, FLAXFORMER_LITE_TUNE_MALLOC="1"),
        )
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the save of step 10"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait()

    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "10" not in saved and "5" in saved
    assert any(name.startswith("10" + atomicity.TMP_DIR_SUFFIX) for name in saved), saved  # the half-made save
    with checkpoint.manager(workdir, read_only=True, best_metric=None) as mngr:
        assert mngr.latest_step() == 5

    loop.train(gpt_cfg, workdir, resume=True)
    final, expected = checkpoint.load_params(workdir)[1], checkpoint.load_params(reference)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected)))
    losses = lambda w: [(r["step"], r["loss"]) for r in metrics.read_metrics(w) if "loss" in r]
    assert losses(workdir) == losses(reference)
