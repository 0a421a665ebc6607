"""Faults of a longer life, injected for real in `flaxformer-lite train` subprocesses:
a divergence between resumes, a disk that fills up, an unexpected error mid-save."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from flaxformer_lite import checkpoint, cli
from flaxformer_lite.train import safety


def _train(workdir, overrides, *extra, resume=False, prelude=""):
    """`flaxformer-lite train` in a subprocess (after `prelude`, Python run in it first);
    (exit status, stderr)."""
    args = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--set", *overrides, *extra]
    args += ["--resume"] if resume else []
    code = f"{prelude}\nimport sys\nfrom flaxformer_lite import cli\nsys.exit(cli.main({args!r}))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    return done.returncode, done.stderr


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / checkpoint.CHECKPOINT_DIR).iterdir() if p.name.isdigit())


def test_best_checkpoint_survives_a_divergence_and_two_resumes(gpt_overrides, tmp_path, capsys):
    workdir = tmp_path / "run"
    run = [*gpt_overrides, "train.num_samples=0", "train.keep_checkpoints=1", "train.eval_every=5"]
    code, err = _train(workdir, [*run, "train.num_steps=10"])
    assert code == 0, err[-3000:]
    with checkpoint.manager(workdir, read_only=True) as mngr:
        best = mngr.best_step()
        best_loss = mngr.metrics(best)["eval_loss"]
    assert best in (5, 10) and np.isfinite(best_loss)
    healthy = checkpoint.load_params(workdir, step=best)[1]

    # The parameters blow up; non-finite steps stop the run, and its checkpoints hold a
    # diverged (finite, useless) state.
    diverge = ["train.learning_rate=1e3", "train.warmup_steps=0", "train.max_nonfinite_streak=3"]
    code, err = _train(workdir, [*run, *diverge], resume=True)
    assert code == safety.EXIT_NONFINITE, err[-3000:]
    (line,) = [l for l in err.splitlines() if l.startswith("stopped: ")]
    assert f"the best checkpoint is {workdir / 'checkpoints' / str(best)}" in line, line
    code, err = _train(workdir, run, resume=True)
    assert code in (0, safety.EXIT_NONFINITE), err[-3000:]

    assert best in _steps(workdir) and max(_steps(workdir)) > 10
    with checkpoint.manager(workdir, read_only=True) as mngr:
        assert mngr.best_step() == best and mngr.metrics(best)["eval_loss"] == best_loss
    assert checkpoint.verify_checksums(workdir / "checkpoints" / str(best)) == (True, "")
    kept = checkpoint.load_params(workdir, step=best)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(healthy)))

    argv = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--set", *run, "--resume", "7"]
    assert cli.main(argv) == 2
    assert f"--resume 7: {workdir / 'checkpoints'} has no checkpoint of step 7" in capsys.readouterr().err

