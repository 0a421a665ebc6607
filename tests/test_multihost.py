"""Two processes joined by jax.distributed (gloo on CPU) compute what one process does."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import flaxformer_lite as ffl
from flaxformer_lite.ops import cross_entropy

sys.path.insert(0, os.path.dirname(__file__))
import multihost_worker  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sharded_loss_equals_single_process(tmp_path):
    out = tmp_path / "result.json"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [
        subprocess.Popen(
            [sys.executable, multihost_worker.__file__, str(out)],
            env={**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(logs)
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and result["devices"] == 4

    cfg = ffl.load_config("gpt_tiny", overrides=multihost_worker.OVERRIDES[:-2])
    ids = multihost_worker.global_batch()
    logits = ffl.build_model(cfg.model).apply(ffl.init_params(cfg.model, jax.random.key(0)), ids).logits
    expected = float(cross_entropy(logits[:, :-1], ids[:, 1:])[0])
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)
