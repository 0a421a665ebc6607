"""Faults injected for real: signals to a training subprocess, a NaN batch through the
jitted step, damaged checkpoint files, a failing write, two processes on one workdir."""

import errno
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

import flaxformer_lite as ffl
from flaxformer_lite import cli
from flaxformer_lite.config import ConfigError
from flaxformer_lite.runtime import checkpoint
from flaxformer_lite.train import loop, metrics, safety

# The child runs `flaxformer-lite train` with every step slowed down by STEP_DELAY
# seconds (a sleep before the batch is sharded; the numbers are unchanged), so that a
# signal can land in the middle of the run.
SLOW_CHILD = """
import sys, time
from flaxformer_lite import cli
from flaxformer_lite.runtime import parallel
shard_batch = parallel.shard_batch

def slow_shard_batch(*args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return shard_batch(*args, **kwargs)

parallel.shard_batch = slow_shard_batch
sys.exit(cli.main(sys.argv[2:]))
"""


def _start_child(workdir, overrides, log_path, delay=0.25):
    args = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--set", *overrides]
    log = open(log_path, "w")
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(delay), *args],
                             stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    child.log = log
    return child


def _wait_for_step(child, workdir, step, log_path, timeout=300):
    deadline = time.monotonic() + timeout
    while not [r for r in metrics.read_metrics(workdir) if r["step"] >= step]:
        assert child.poll() is None, pathlib.Path(log_path).read_text()[-3000:]
        assert time.monotonic() < deadline, f"the child never reached step {step}"
        time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leaves(workdir):
    return jax.tree.leaves(checkpoint.load_params(workdir)[1])


def _same_params(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir) if "loss" in r]


# ------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_exits_75_and_resume_is_bit_exact(sig, gpt_run, gpt_cfg, gpt_overrides, tmp_path):
    reference, _ = gpt_run
    workdir, log_path = tmp_path / "run", tmp_path / "child.log"
    child = _start_child(workdir, gpt_overrides, log_path)
    _wait_for_step(child, workdir, 3, log_path)
    signalled_at = max(r["step"] for r in metrics.read_metrics(workdir))
    child.send_signal(sig)
    # More signals while it finishes the step and saves, until that checkpoint is
    # complete (it has its checksums); the child then still writes its summary.
    deadline = time.monotonic() + 300
    while child.poll() is None and not [
        p for p in (workdir / "checkpoints").glob(f"*/{checkpoint.CHECKSUM_FILE}")
        if int(p.parent.name) >= signalled_at
    ]:
        assert time.monotonic() < deadline, "the child did not stop"
        time.sleep(0.1)
        child.send_signal(sig)
    assert child.wait(timeout=300) == safety.EXIT_PREEMPTED, log_path.read_text()[-3000:]
    child.log.close()
    out = log_path.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert f"received {sig.name} again: already stopping" in out
    stopped = [line for line in out.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and f"stopped by {sig.name} at step" in stopped[0], out[-2000:]
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 3 <= step < 20
    assert f"checkpoint saved in {workdir / 'checkpoints' / str(step)}" in stopped[0]
    assert f"--workdir {workdir} --resume" in stopped[0]
    assert json.loads((workdir / "summary.json").read_text())["step"] == step
    assert not (workdir / safety.LOCK_FILE).exists()

    loop.train(gpt_cfg, workdir, resume=True)
    assert _same_params(workdir, reference)
    assert _losses(workdir) == _losses(reference)


# ------------------------------------------------------------------------------- non-finite


def _poisoned_data(monkeypatch, gpt_cfg, bad_index, drop):
    """Make loop.prepare_data's training stream carry NaN weights in its bad_index-th
    batch (drop=False), or leave that batch out (drop=True)."""
    setup = loop.prepare_data(gpt_cfg)
    it = iter(setup.train)
    bad_ids = [next(it) for _ in range(bad_index + 1)][-1]["input_ids"]
    it.close()

    def is_bad(batch):
        return np.array_equal(batch["input_ids"], bad_ids)

    def poison(batch):
        return {**batch, "weights": batch["weights"] * np.float32("nan")} if is_bad(batch) else batch

    real = loop.prepare_data
    def prepare(cfg, **kwargs):
        out = real(cfg, **kwargs)
        out.train = out.train.filter(lambda b: not is_bad(b)) if drop else out.train.map(poison)
        return out

    monkeypatch.setattr(loop, "prepare_data", prepare)


def test_nan_batch_is_skipped_and_the_run_equals_one_without_it(tiny, monkeypatch, tmp_path):
    run = ("gpt_tiny", "train.schedule=constant", "train.log_every=3", "train.eval_every=100",
           "train.checkpoint_every=100")
    cfg = tiny(*run, "train.num_steps=9")
    _poisoned_data(monkeypatch, cfg, bad_index=4, drop=False)
    with pytest.warns(UserWarning, match=r"non-finite loss, gradient or learning rate at step 5: update skipped"):
        loop.train(cfg, tmp_path / "skip")
    records = [r for r in metrics.read_metrics(tmp_path / "skip") if "tokens" in r]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 0]
    assert all(math.isfinite(r["loss"]) for r in records)

    _poisoned_data(monkeypatch, cfg, bad_index=4, drop=True)
    loop.train(tiny(*run, "train.num_steps=8"), tmp_path / "clean")
    assert _same_params(tmp_path / "skip", tmp_path / "clean")


def test_nan_policy_stop_halts_at_the_bad_step_with_a_finite_checkpoint(tiny, monkeypatch, tmp_path):
    cfg = tiny("gpt_tiny", "train.nan_policy=stop", "train.num_steps=9", "train.log_every=3",
               "train.checkpoint_every=100")
    _poisoned_data(monkeypatch, cfg, bad_index=4, drop=False)
    with pytest.raises(safety.NonFiniteStop, match=r"at step 5: update skipped and run stopped") as stop:
        loop.train(cfg, tmp_path / "run")
    assert stop.value.exit_code == safety.EXIT_NONFINITE
    with checkpoint.manager(tmp_path / "run", read_only=True, best_metric=None) as mngr:
        assert mngr.latest_step() == 6  # the end of the log window that saw step 5
        assert checkpoint.verify_checksums(checkpoint.step_dir(mngr, 6)) == (True, "")
    assert all(np.all(np.isfinite(x)) for x in _leaves(tmp_path / "run"))


def test_a_learning_rate_past_float32s_range_is_a_skipped_step(gpt_run, gpt_overrides, tmp_path):
    reference, _ = gpt_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    # Finite loss and gradients, but the update would not be: the step changes nothing.
    cfg = ffl.load_config("gpt_tiny", overrides=[*gpt_overrides, "train.learning_rate=1e39", "train.num_steps=25"])
    with pytest.warns(UserWarning, match=r"non-finite loss, gradient or learning rate at step 21: update skipped"):
        loop.train(cfg, workdir, resume=True)
    assert sum(r.get("nonfinite_steps", 0) for r in metrics.read_metrics(workdir) if r["step"] > 20) == 5
    assert _same_params(workdir, reference)


def test_a_state_that_is_not_finite_is_not_saved(gpt_run, gpt_cfg, step_fault, tmp_path):
    reference, _ = gpt_run
    workdir = tmp_path / "run"
    step_fault(13, "poison")  # one parameter turns infinite in step 13, once
    with pytest.raises(safety.NonFiniteStop, match=r"the state at step 15 is not finite: not saved") as stop:
        loop.train(gpt_cfg, workdir)
    assert f"checkpoint {workdir / 'checkpoints' / '10'} is intact" in str(stop.value)
    with checkpoint.manager(workdir, read_only=True, best_metric=None) as mngr:
        assert mngr.latest_step() == 10
    assert checkpoint.verify_checksums(workdir / "checkpoints" / "10") == (True, "")
    # The fault was transient: the steps after 10 are trained again to the uninterrupted state.
    loop.train(gpt_cfg, workdir, resume=True)
    assert _same_params(workdir, reference)
    assert _losses(workdir) == _losses(reference)


@pytest.mark.parametrize("checkpoint_every", [5, 2])
def test_divergence_stops_after_the_streak_limit_with_strict_json(checkpoint_every, gpt_overrides, tmp_path, capsys):
    workdir = tmp_path / "run"
    # The recipe for a diverging run: the loss is NaN from a few steps in.
    code = cli.main(["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--set", *gpt_overrides,
                     "train.learning_rate=1e3", "train.warmup_steps=1", "train.max_nonfinite_streak=3",
                     f"train.checkpoint_every={checkpoint_every}"])
    err = capsys.readouterr().err
    assert code == safety.EXIT_NONFINITE, err[-2000:]
    assert "Traceback" not in err
    assert "3 non-finite steps in a row up to step" in err and "train.max_nonfinite_streak=3" in err
    # No checkpoint was evaluated below the first loss (only the last, diverged one was
    # evaluated): the hint names the newest saved before the 3 non-finite steps, or, with
    # none (every 5 steps), a new run; never --resume of the diverged state.
    (line,) = [l for l in err.splitlines() if l.startswith("stopped: ")]
    since = [r["step"] for r in metrics.read_metrics(workdir) if r.get("nonfinite_steps")][-3]
    with checkpoint.manager(workdir, read_only=True, best_metric=None) as mngr:
        before = [s for s in mngr.all_steps() if s < since]
    assert bool(before) == (checkpoint_every == 2), (since, before)
    if before:
        assert f"{workdir / 'checkpoints' / str(max(before))} is the newest saved before the non-finite steps" in line
        assert f"--resume {max(before)} --set train.learning_rate=..." in line, line
    else:
        assert "so they may all hold the state that diverged: start a new run" in line and "--resume" not in line
    strict = dict(parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    summary = json.loads((workdir / "summary.json").read_text(), **strict)
    assert summary["stopped"].startswith("NonFiniteStop")
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, **strict)
    assert all(np.all(np.isfinite(x)) for x in _leaves(workdir))


# ------------------------------------------------------------------------------- checkpoints


def _garble(path):
    """Same size, other bytes."""
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def _largest_file(step_dir, item):
    return max((p for p in (step_dir / item).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _cut_short(step_dir, item):
    """Halve every array data file of `item` (OCDBT's d/ folders): which of them a restore
    reads varies from save to save, and a file it does not read loads fine when cut."""
    cut = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
    assert cut
    for path in cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_corrupt_checkpoints_are_set_aside_and_resume_falls_back(gpt_run, gpt_cfg, records, tmp_path):
    reference, _ = gpt_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    ckpts = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [10, 15, 20]
    _garble(_largest_file(ckpts / "15", "extra"))
    # Step 20 has no checksums (killed right after its save), and its data cut short.
    (ckpts / "20" / checkpoint.CHECKSUM_FILE).unlink()
    _cut_short(ckpts / "20", "params")
    # Killed mid-write: a half line at the end of metrics.jsonl.
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "loss": 1.2')
    with pytest.warns(UserWarning) as warned:
        loop.train(gpt_cfg, workdir, resume=True)
    messages = [str(w.message) for w in warned]
    assert any(f"checkpoint {ckpts / '20'} is unusable" in m and "no readable checksums.json" in m
               and "does not load" in m for m in messages)
    assert any(f"checkpoint {ckpts / '15'} is unusable" in m and "does not match its checksum" in m for m in messages)
    assert any("half-written last line" in m for m in messages)
    assert sorted(p.name for p in (workdir / "corrupt_checkpoints").iterdir()) == ["15", "20"]
    # Resumed from step 10, it trained steps 11-20 again to the same values: nothing is
    # lost in the result, only the time of those steps.
    assert _same_params(workdir, reference)
    assert records(workdir) == records(reference)


def test_unverifiable_or_non_finite_checkpoints_are_skipped(tmp_path):
    params = {"w": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)}
    with checkpoint.manager(tmp_path, keep=5, best_metric=None, async_save=False) as mngr:
        for step, p in ((1, params), (2, {"w": params["w"] * np.nan}), (3, params)):
            checkpoint.save(mngr, step, params=p)
            checkpoint.write_checksums(checkpoint.step_dir(mngr, step))
        # Step 3 lost its checksums (killed right after the save) and half its data: it cannot load.
        (checkpoint.step_dir(mngr, 3) / checkpoint.CHECKSUM_FILE).unlink()
        _cut_short(checkpoint.step_dir(mngr, 3), "params")
        with pytest.warns(UserWarning) as warned:
            step, restored, _, _ = checkpoint.restore_good(mngr)
    assert step == 1 and np.array_equal(restored["w"], params["w"])
    messages = [str(w.message) for w in warned]
    assert "no readable checksums.json" in messages[0] and "does not load" in messages[0]
    assert "non-finite values" in messages[1]


# ------------------------------------------------------------------------------- disk


def test_failed_background_save_stops_cleanly_and_keeps_the_previous(gpt_run, gpt_cfg, gpt_overrides, tmp_path,
                                                                       monkeypatch, capsys):
    reference, _ = gpt_run
    workdir = tmp_path / "run"
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_at_step_10(self):
        if self.get_final().name == "10":
            raise OSError(errno.ENOSPC, "No space left on device")
        await commit(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_step_10)
    code = cli.main(["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--set", *gpt_overrides,
                     "train.keep_checkpoints=1"])
    err = capsys.readouterr().err
    assert code == safety.EXIT_SAVE_FAILED
    assert "Traceback" not in err
    (line,) = [l for l in err.splitlines() if l.startswith("stopped: ")]
    assert "checkpoint of step 10 failed: the disk is full" in line
    assert f"checkpoint {workdir / 'checkpoints' / '5'} is intact" in line
    # It noticed (at a step after 10: the write runs in the background) and saved the
    # state of that step as a last attempt.
    last = int(line.split("a last checkpoint of step ")[1].split()[0])
    assert last > 10 and f"was saved in {workdir / 'checkpoints' / str(last)}" in line
    saved = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert str(last) in saved and "10" not in saved

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", commit)
    loop.train(gpt_cfg, workdir, resume=True)
    assert _same_params(workdir, reference)


# ------------------------------------------------------------------------------- workdir


def test_two_processes_race_for_one_workdir(gpt_overrides, tmp_path):
    workdir = tmp_path / "run"
    overrides = [*gpt_overrides, "train.num_steps=8", "train.num_samples=0"]
    children = [_start_child(workdir, overrides, tmp_path / f"child{i}.log", delay=0.3) for i in range(2)]
    codes = [c.wait(timeout=600) for c in children]
    logs = [(tmp_path / f"child{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 2], logs
    loser = logs[codes.index(2)]
    assert f"error: {workdir} is in use by another run (pid {children[codes.index(0)].pid} on host" in loser
    assert "Traceback" not in loser
    assert [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r] == list(range(1, 9))
    assert not (workdir / safety.LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / safety.LOCK_FILE).write_text(json.dumps({"host": "h", "pid": dead.pid, "since": "then"}))
    with pytest.warns(UserWarning, match=rf"taking over the lock of a run that is gone \(pid {dead.pid} on host h"):
        with safety.WorkdirLock(tmp_path):
            owner = json.loads((tmp_path / safety.LOCK_FILE).read_text())
            assert owner["pid"] == os.getpid()
            with pytest.raises(safety.WorkdirBusy, match=f"pid {os.getpid()}"):
                with safety.WorkdirLock(tmp_path):
                    pass
    assert not (tmp_path / safety.LOCK_FILE).exists()


# ------------------------------------------------------------------------------- small things


def test_a_stop_between_log_steps_resumes_into_the_uninterrupted_records(gpt_overrides, on_batch, records, tmp_path):
    cfg = ffl.load_config("gpt_tiny", overrides=[*gpt_overrides, "train.log_every=4", "train.num_samples=0",
                                                 "train.num_steps=12"])
    loop.train(cfg, tmp_path / "reference")
    workdir = tmp_path / "run"
    # First a stop at step 7, as train.time_budget_s makes one: it evaluates there too.
    loop.train(cfg, workdir, stop_at=7)
    assert [r["step"] for r in metrics.read_metrics(workdir)][-2:] == [7, 7]
    assert threading.current_thread() is threading.main_thread()  # where StopSignals catches it
    on_batch(4, lambda: os.kill(os.getpid(), signal.SIGTERM))  # the resumed run's 4th: step 11
    with pytest.raises(safety.Preempted, match=r"^stopped by SIGTERM at step 11; checkpoint saved in "):
        loop.train(cfg, workdir, resume=True)
    # Its last evaluation was at step 10: summary.json says so beside the step it stopped at.
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["step"], summary["eval_step"]) == (11, 10)
    (evaluated,) = [r for r in metrics.read_metrics(workdir) if "eval_loss" in r]
    assert (evaluated["step"], evaluated["eval_loss"]) == (10, summary["eval_loss"])
    assert [r["step"] for r in metrics.read_metrics(workdir)][-1] == 11  # the window closed early

    loop.train(cfg, workdir, resume=True)
    # One record a step and kind, as without the stops: their windows were reopened (the
    # records at 7 and 11 are gone; the ones at 8 and 12 cover steps 5-8 and 9-12).
    assert records(workdir) == records(tmp_path / "reference")
    assert _same_params(workdir, tmp_path / "reference")


def test_metrics_reader_names_a_damaged_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        metrics.read_metrics(tmp_path)


def test_bad_config_values_name_the_key_and_the_file():
    with pytest.raises(ConfigError, match=r"gpt_tiny.yaml: data.batch_size=-4 must be positive"):
        ffl.load_config("gpt_tiny", overrides=["data.batch_size=-4"])
    # keep_checkpoints=0 would let rotation delete the last good checkpoint.
    with pytest.raises(ConfigError, match=r"train.keep_checkpoints=0 must be positive"):
        ffl.load_config("gpt_tiny", overrides=["train.keep_checkpoints=0"])


def test_two_hosts_stop_at_the_same_step_when_one_is_preempted(gpt_overrides, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device a process
    workdir = tmp_path / "run"
    children = []
    for i in range(2):
        log = open(tmp_path / f"host{i}.log", "w")
        child = subprocess.Popen(
            [sys.executable, "-c", SLOW_CHILD, "0.25", "train", "--config", "gpt_tiny", "--workdir", str(workdir),
             "--set", *gpt_overrides, "train.num_samples=0"],
            stdout=log, stderr=subprocess.STDOUT,
            env={**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": str(i)},
        )
        children.append(child)
    _wait_for_step(children[0], workdir, 3, tmp_path / "host0.log")
    # Only one host gets Ctrl-C, which it passes on to JAX's preemption service as a SIGTERM.
    children[1].send_signal(signal.SIGINT)
    codes = [c.wait(timeout=300) for c in children]
    logs = [(tmp_path / f"host{i}.log").read_text() for i in range(2)]
    assert codes == [safety.EXIT_PREEMPTED] * 2, logs
    steps = []
    for log, by in zip(logs, ["a preemption notice (SIGTERM to one of the processes)", "SIGINT"]):
        (line,) = [l for l in log.splitlines() if l.startswith("stopped: ")]
        assert f"stopped by {by} at step" in line, line
        steps.append(int(line.split(" at step ")[1].split(";")[0]))
    assert steps[0] == steps[1] and 3 <= steps[0] < 20
    with checkpoint.manager(workdir, read_only=True, best_metric=None) as mngr:
        assert mngr.latest_step() == steps[0]
