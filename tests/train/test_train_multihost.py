"""Training in two processes joined by jax.distributed (gloo on CPU): a SIGTERM and a
resume are bit-exact, and checkpoints serve one process or two, whichever wrote them."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxformer_lite import cli
from flaxformer_lite.runtime import checkpoint
from flaxformer_lite.train import metrics, safety

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
import multihost_worker  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- training


def _two_processes(tmp_path, name, commands, delay=0.0):
    """Start `flaxformer-lite` COMMANDS in two jax.distributed processes (one CPU device
    each); their logs go to tmp_path/NAME{0,1}.log."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = []
    for i in range(2):
        log = open(tmp_path / f"{name}{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, multihost_worker.__file__, "cli", str(delay), json.dumps(commands)],
            env={**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": str(i)},
            stdout=log, stderr=subprocess.STDOUT,
        ))
    return procs


def _wait(procs, tmp_path, name):
    codes = [p.wait(timeout=300) for p in procs]
    return codes, [(tmp_path / f"{name}{i}.log").read_text() for i in range(2)]


def _leaves(workdir):
    return jax.tree.leaves(checkpoint.load_params(workdir)[1])


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def run_args(gpt_overrides):
    return [*gpt_overrides, "train.num_steps=12", "train.eval_every=6", "train.checkpoint_every=4",
            "train.num_samples=0"]


@pytest.fixture(scope="module")
def two_process_run(run_args, tmp_path_factory):
    """The workdir of an uninterrupted two-process run."""
    tmp = tmp_path_factory.mktemp("two")
    workdir = tmp / "run"
    codes, logs = _wait(_two_processes(tmp, "ref", [["train", "--config", "gpt_tiny", "--workdir", str(workdir),
                                                      "--set", *run_args]]), tmp, "ref")
    assert codes == [0, 0], logs
    return workdir


def _start_until(tmp_path, name, train, step):
    """Two processes training; returned once step `step` is in metrics.jsonl."""
    procs = _two_processes(tmp_path, name, [train], delay=0.3)
    deadline = time.monotonic() + 300
    while not [r for r in metrics.read_metrics(pathlib.Path(train[4])) if r["step"] >= step]:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.05)
    return procs


def _resume_equals(tmp_path, train, reference):
    codes, logs = _wait(_two_processes(tmp_path, "resumed", [[*train, "--resume"]]), tmp_path, "resumed")
    assert codes == [0, 0], logs
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(train[4]), _leaves(reference)))
    assert _losses(train[4]) == _losses(reference)


def test_two_process_resume_after_sigterm_is_bit_exact(two_process_run, run_args, tmp_path):
    train = ["train", "--config", "gpt_tiny", "--workdir", str(tmp_path / "run"), "--set", *run_args]
    procs = _start_until(tmp_path, "stopped", train, 3)
    procs[1].send_signal(signal.SIGTERM)  # one host gets the notice
    codes, logs = _wait(procs, tmp_path, "stopped")
    assert codes == [safety.EXIT_PREEMPTED] * 2, logs
    (line,) = [l for l in logs[0].splitlines() if l.startswith("stopped: ")]
    assert 3 <= int(line.split(" at step ")[1].split(";")[0]) < 12
    # JAX's preemption service owns SIGTERM here: the process that got it names no other signal.
    (line,) = [l for l in logs[1].splitlines() if l.startswith("stopped: ")]
    assert "stopped by a preemption notice (SIGTERM to one of the processes) at step" in line, line
    _resume_equals(tmp_path, train, two_process_run)


def test_a_dead_peer_loses_nothing_in_the_result(two_process_run, run_args, tmp_path):
    """One process is killed mid-run: the other exits at once (not after JAX's heartbeat
    timeout), naming the intact checkpoint, and resuming both reaches the uninterrupted
    run bit for bit."""
    workdir = tmp_path / "run"
    train = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--set", *run_args]
    procs = _start_until(tmp_path, "killed", train, 6)
    procs[1].kill()
    killed = time.monotonic()
    codes, logs = _wait(procs, tmp_path, "killed")
    assert codes[0] == 1 and time.monotonic() - killed < 60, logs[0][-3000:]
    (line,) = [l for l in logs[0].splitlines() if "error at step " in l]
    assert f"checkpoint {workdir / 'checkpoints'}" in line and "is intact" in line, line
    _resume_equals(tmp_path, train, two_process_run)


def test_a_two_process_checkpoint_serves_one_process(two_process_run, run_args, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(two_process_run, workdir)
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    assert json.loads((workdir / "eval.json").read_text())["step"] == 12
    assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "Lists", "--max-new-tokens", "4"]) == 0
    tuned = tmp_path / "tuned"
    assert cli.main(["train", "--config", "gpt_tiny", "--workdir", str(tuned), "--init-from", str(workdir),
                     "--set", *run_args, "train.num_steps=1"]) == 0
    assert "0 new parameter arrays" in capsys.readouterr().out


def test_a_one_process_checkpoint_serves_two_processes(gpt_run, run_args, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(gpt_run[0], workdir)
    commands = [
        ["eval", "--workdir", str(workdir)],
        ["generate", "--workdir", str(workdir), "--prompt", "Lists", "--max-new-tokens", "4"],
        ["train", "--config", "gpt_tiny", "--workdir", str(tmp_path / "tuned"), "--init-from", str(workdir),
         "--set", *run_args, "train.num_steps=1"],
    ]
    codes, logs = _wait(_two_processes(tmp_path, "served", commands), tmp_path, "served")
    assert codes == [0, 0], logs
    assert json.loads((workdir / "eval.json").read_text())["step"] == 20
    assert "0 new parameter arrays" in logs[0]
