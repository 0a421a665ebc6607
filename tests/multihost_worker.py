"""One process of the multi-host tests: joins jax.distributed, runs a sharded forward,
or runs `flaxformer-lite` commands.

Run by tests/test_multihost.py as `python tests/multihost_worker.py OUT_FILE`, or as
`python tests/multihost_worker.py cli DELAY COMMANDS_JSON` (each training step slowed by
DELAY seconds, so that a signal can land mid-run), with the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment set.
"""

import json
import sys

import jax
import numpy as np

import flaxformer_lite as ffl
from flaxformer_lite.models import build_model
from flaxformer_lite.ops import cross_entropy
from flaxformer_lite.runtime import parallel

OVERRIDES = ["model.num_layers=2", "model.d_model=32", "model.d_ff=64", "model.max_len=16",
             "data.seq_len=16", "parallel.data=2", "parallel.fsdp=2"]


def global_batch():
    rng = np.random.default_rng(0)
    return rng.integers(4, 300, (8, 16)).astype(np.int32)


def main(out_file):
    parallel.initialize_distributed()
    cfg = ffl.load_config("gpt_tiny", overrides=OVERRIDES)
    mesh = parallel.make_mesh(cfg.parallel)
    model = build_model(cfg.model)
    ids = global_batch()
    per_process = ids.shape[0] // jax.process_count()
    local = ids[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    with parallel.use_mesh(mesh, cfg.parallel):
        params = jax.jit(lambda k: ffl.init_params(cfg.model, k),
                         out_shardings=parallel.param_shardings(mesh, cfg))(jax.random.key(0))
        batch = parallel.shard_batch(mesh, {"ids": local})

        @jax.jit
        def loss_fn(p, x):
            logits = model.apply(p, x).logits
            return cross_entropy(logits[:, :-1], x[:, 1:])[0]

        loss = float(loss_fn(params, batch["ids"]))
    if jax.process_index() == 0:
        with open(out_file, "w") as f:
            json.dump({"loss": loss, "devices": jax.device_count(), "processes": jax.process_count()}, f)


def run_commands(delay, commands):
    """cli.main of each command in turn, in one jax.distributed session; the first
    nonzero exit status, else 0."""
    import time

    from flaxformer_lite import cli

    shard_batch = parallel.shard_batch

    def slow_shard_batch(*args, **kwargs):
        time.sleep(delay)
        return shard_batch(*args, **kwargs)

    parallel.shard_batch = slow_shard_batch
    parallel.initialize_distributed()
    parallel.initialize_distributed = lambda: None  # joined once, for all the commands
    for argv in commands:
        code = cli.main(argv)
        if code:
            return code
    return 0


if __name__ == "__main__":
    # Only as a script: the test imports this module, and these would change the
    # pytest process's own devices.
    jax.config.update("jax_platforms", "cpu")
    if sys.argv[1] == "cli":
        jax.config.update("jax_num_cpu_devices", 1)
        sys.exit(run_commands(float(sys.argv[2]), json.loads(sys.argv[3])))
    jax.config.update("jax_num_cpu_devices", 2)
    main(sys.argv[1])
