"""`prepare --workers 2` killed mid-run, for real: its worker processes go with it."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


def _children(pid: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of `pid`, from /proc."""
    parents = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = (int(fields[1]), fields[19])
    found, frontier = {}, {pid}
    while frontier:
        frontier = {p for p, (ppid, _) in parents.items() if ppid in frontier and p not in found}
        found.update({p: parents[p][1] for p in frontier})
    return found


def _alive(pid: int, started: str) -> bool:
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == started


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_prepare_leaves_no_worker_behind(sig, tmp_path):
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(300)])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(2):
        (corpus / f"{f}.txt").write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(3000)))
    out = tmp_path / "d"
    # Tiny shards, each written and fsynced on its own: a worker needs many seconds for its
    # source, longer than the 5 s allowed below, so one that outlives its parent shows.
    cmd = [sys.executable, "-m", "flaxformer_lite", "prepare", "--corpus", str(corpus), "--out", str(out),
           "--workers", "2", "--shard-tokens", "500", "--no-progress"]
    # Output to a file, not a pipe: workers inherit it, and reading a pipe to its end would
    # wait for them.
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "shards").glob("*.json"))) < 2:  # both workers are writing
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 5
    while any(_alive(p, s) for p, s in workers.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p, s in workers.items() if _alive(p, s)]
    for pid in survivors:  # leave nothing running, even when failing
        os.kill(pid, signal.SIGKILL)
    assert not survivors
    assert not (out / "manifest.json").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert log.read_text().strip().splitlines() == [
            "stopped: prepare got SIGTERM; run it again with the same options to continue"], log.read_text()
    else:
        assert proc.returncode == -signal.SIGKILL
