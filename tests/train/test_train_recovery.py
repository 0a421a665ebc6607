"""Faults of a longer life, injected for real in `flaxformer-lite train` subprocesses:
a divergence between resumes, a disk that fills up, an unexpected error mid-save."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxformer_lite import cli
from flaxformer_lite.runtime import checkpoint
from flaxformer_lite.train import loop, metrics, safety


def _train(workdir, overrides, *extra, resume=False, prelude="", env=None):
    """`flaxformer-lite train` in a subprocess (after `prelude`, Python run in it first);
    (exit status, its output). A hang fails the test after 300 s."""
    args = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--set", *overrides, *extra]
    args += ["--resume"] if resume else []
    code = f"{prelude}\nimport sys\nfrom flaxformer_lite import cli\nsys.exit(cli.main({args!r}))\n"
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    return done.returncode, done.stdout


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



# ------------------------------------------------------------------------------- full disk


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """Environment that preloads full_disk.c (built here) into a subprocess."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the full-disk injector")
    library = tmp_path_factory.mktemp("full_disk") / "full_disk.so"
    source = pathlib.Path(__file__).with_name("full_disk.c")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"], check=True)
    return {"LD_PRELOAD": str(library)}


# Steps 6-9 wait (a second at most) for the checksums of step 5, which the loop writes
# once it sees that save complete: so the disk fills between the saves of steps 5 and 10.
UNTIL_CHECKSUMS = """
import pathlib, time
from flaxformer_lite.runtime import parallel
shard_batch, calls = parallel.shard_batch, []

def waiting_shard_batch(*args, **kwargs):
    calls.append(1)
    deadline = time.monotonic() + 1
    while 6 <= len(calls) <= 9 and time.monotonic() < deadline:
        if pathlib.Path({workdir!r}, "checkpoints", "5", "checksums.json").exists():
            break
        time.sleep(0.02)
    return shard_batch(*args, **kwargs)

parallel.shard_batch = waiting_shard_batch
"""


def _check_stopped_on_full_disk(workdir, code, err, intact):
    assert code == safety.EXIT_SAVE_FAILED, err[-3000:]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    (line,) = [l for l in err.splitlines() if l.startswith("stopped: ")]
    assert "the disk is full" in line and f"checkpoint {workdir / 'checkpoints' / str(intact)} is intact" in line
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]
    with checkpoint.manager(workdir, read_only=True, best_metric=None) as mngr:
        assert mngr.latest_step() == intact
    assert checkpoint.verify_checksums(workdir / "checkpoints" / str(intact)) == (True, "")
    return line


def test_disk_full_between_saves_stops_at_once(gpt_overrides, full_disk, tmp_path):
    workdir = tmp_path / "run"
    # Full once step 5 is complete, with its checksums.
    env = {**full_disk, "FFL_FULL_DIR": str(workdir), "FFL_FULL_FROM": f"/5/{checkpoint.CHECKSUM_FILE}",
           "FFL_FULL_BYTES": "0"}
    code, err = _train(workdir, [*gpt_overrides, "train.num_samples=0"], env=env,
                       prelude=UNTIL_CHECKSUMS.format(workdir=str(workdir)))
    line = _check_stopped_on_full_disk(workdir, code, err, intact=5)
    assert f"could not write {workdir / metrics.METRICS_FILE} at step " in line
    # What was written before is all there.
    steps = [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and 5 <= len(steps) < 10


def test_disk_full_during_a_save_keeps_the_previous(gpt_run, gpt_cfg, gpt_overrides, full_disk, tmp_path):
    reference, _ = gpt_run
    workdir = tmp_path / "run"
    env = {**full_disk, "FFL_FULL_DIR": str(workdir), "FFL_FULL_FROM": "/10.orbax-checkpoint-tmp/",
           "FFL_FULL_BYTES": "2000"}
    code, err = _train(workdir, gpt_overrides, env=env)
    _check_stopped_on_full_disk(workdir, code, err, intact=5)

    # Space freed: the resumed run is the uninterrupted one.
    loop.train(gpt_cfg, workdir, resume=True)
    leaves = [jax.tree.leaves(checkpoint.load_params(w)[1]) for w in (workdir, reference)]
    assert all(np.array_equal(a, b) for a, b in zip(*leaves))


# ------------------------------------------------------------------------------- unexpected errors


@pytest.mark.parametrize("bad_batch", [11, 13])
def test_an_unexpected_error_keeps_every_step_and_resume_is_bit_exact(bad_batch, gpt_run, gpt_cfg, on_batch, records,
                                                                       tmp_path, capsys):
    reference, _ = gpt_run
    workdir = tmp_path / "run"

    def bug():
        raise RuntimeError("a bug in the data pipeline")

    on_batch(bad_batch, bug)
    with pytest.raises(RuntimeError, match="a bug in the data pipeline"):
        loop.train(gpt_cfg, workdir)
    out = capsys.readouterr().out
    last = bad_batch - 1
    if last == 10:  # the batch after the save of step 10 began: that save is completed
        assert "error at step 10: the checkpoint in flight was completed" in out, out
    else:  # and a last checkpoint keeps the steps after it
        assert f"error at step {last}: " in out, out
        assert f"a last checkpoint of step {last} was saved in {workdir / 'checkpoints' / str(last)}" in out, out
    assert _steps(workdir) == sorted({5, 10, last}) and not list((workdir / "checkpoints").glob("*tmp*"))
    assert checkpoint.verify_checksums(workdir / "checkpoints" / str(last)) == (True, "")

    loop.train(gpt_cfg, workdir, resume=True)
    leaves = [jax.tree.leaves(checkpoint.load_params(w)[1]) for w in (workdir, reference)]
    assert all(np.array_equal(a, b) for a, b in zip(*leaves))
    assert records(workdir) == records(reference)


def test_an_error_inside_the_step_loses_nothing_in_the_result(gpt_run, gpt_cfg, step_fault, records, tmp_path, capsys):
    reference, _ = gpt_run
    workdir = tmp_path / "run"
    step_fault(13, "raise")
    with pytest.raises(Exception, match="a fault inside the step"):
        loop.train(gpt_cfg, workdir)
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if l.startswith("error at step ")]
    assert f"checkpoint {workdir / 'checkpoints' / '10'} is intact" in line, line
    assert "the step that failed: no last checkpoint" in line, line
    assert _steps(workdir) == [5, 10] and not list((workdir / "checkpoints").glob("*tmp*"))

    loop.train(gpt_cfg, workdir, resume=True)
    leaves = [jax.tree.leaves(checkpoint.load_params(w)[1]) for w in (workdir, reference)]
    assert all(np.array_equal(a, b) for a, b in zip(*leaves))
    assert records(workdir) == records(reference)


# ------------------------------------------------------------------------------- resume errors


def test_resume_errors_are_one_line_and_change_nothing(gpt_run, gpt_overrides, tmp_path, capsys):
    reference, _ = gpt_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    argv = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--resume", "--set", *gpt_overrides,
            "train.num_steps=30"]

    lines = (workdir / metrics.METRICS_FILE).read_text().splitlines()
    (workdir / metrics.METRICS_FILE).write_text("\n".join([*lines[:2], lines[2][:20], *lines[3:]]) + "\n")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {workdir / metrics.METRICS_FILE}:3: not a JSON record with a step" in err, err
    assert "Traceback" not in err
    (workdir / metrics.METRICS_FILE).write_text("\n".join(lines) + "\n")

    # Without config.yaml nothing tells the model's width but the checkpoint itself, and
    # the newest step has no checksums (killed right after its save): it does not load,
    # but that is the config's misfit, not damage.
    (workdir / checkpoint.CONFIG_FILE).unlink()
    (workdir / "checkpoints" / "20" / checkpoint.CHECKSUM_FILE).unlink()
    assert cli.main([*argv, "model.d_model=64"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume: the checkpoints in" in err and "resume with the run's own config" in err, err
    assert "has shape (32,) in checkpoint 20, (64,) here" in err, err
    assert "Traceback" not in err
    assert not (workdir / checkpoint.CONFIG_FILE).exists()
    assert _steps(workdir) == [10, 15, 20] and not (workdir / checkpoint.QUARANTINE_DIR).exists()
