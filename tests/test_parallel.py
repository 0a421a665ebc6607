"""Sharded execution over 8 simulated CPU devices equals one device; mesh errors are clear."""

import re

import jax
import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.config import ConfigError, ParallelConfig
from flaxformer_lite.models import build_model, init_params
from flaxformer_lite.runtime import parallel

TINY = ["model.num_layers=2", "model.d_model=32", "model.d_ff=64", "model.max_len=16", "data.seq_len=16"]


@pytest.mark.parametrize("preset, axes", [
    ("llama_tiny", (-1, 1, 1)), ("llama_tiny", (2, 2, 2)), ("bert_tiny", (1, 4, 2)), ("t5_tiny", (2, 2, 2)),
])
def test_sharded_forward_equals_single_device(preset, axes):
    d, f, t = axes
    cfg = ffl.load_config(preset, overrides=TINY + [
        f"parallel.data={d}", f"parallel.fsdp={f}", f"parallel.tensor={t}", "model.scan_layers=true",
    ])
    mesh = parallel.make_mesh(cfg.parallel)
    assert mesh.devices.size == 8
    model = build_model(cfg.model)
    ids = np.random.default_rng(0).integers(4, 300, (8, 16)).astype(np.int32)
    args = (ids, ids) if cfg.model.family == "encoder_decoder" else (ids,)
    with parallel.use_mesh(mesh, cfg.parallel):
        params = jax.jit(lambda k: init_params(cfg.model, k), out_shardings=parallel.param_shardings(mesh, cfg))(
            jax.random.key(0)
        )
        placed = parallel.shard_batch(mesh, {str(i): a for i, a in enumerate(args)})
        out = jax.jit(lambda p, *xs: model.apply(p, *xs).hidden_states)(params, *placed.values())
    assert out.sharding.is_equivalent_to(parallel.batch_sharding(mesh), out.ndim)
    # Traced outside the mesh: one device, no sharding constraints.
    ref = jax.jit(lambda p, *xs: model.apply(p, *xs).hidden_states)(jax.device_get(params), *args)
    # Sharded matmuls sum in another order: float32 rounding, not a logic difference.
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_param_shardings_follow_the_rules():
    cfg = ffl.load_config("llama_tiny", overrides=TINY + ["parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2"])
    sh = parallel.param_shardings(parallel.make_mesh(cfg.parallel), cfg)["params"]
    layer = sh["decoder"]["layers_0"]
    assert layer["self_attention"]["query"].spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert layer["mlp"]["wo"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert sh["token_embed"]["embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")



def test_init_params_inside_a_mesh():
    # The dummy batch of 1 used to meet the batch axis split 4 ways (data x fsdp).
    cfg = ffl.load_config("llama_tiny", overrides=TINY + ["parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2"])
    mesh = parallel.make_mesh(cfg.parallel)
    with parallel.use_mesh(mesh, cfg.parallel):
        eager = init_params(cfg.model, jax.random.key(1))
        jitted = jax.jit(lambda k: init_params(cfg.model, k), out_shardings=parallel.param_shardings(mesh, cfg))(
            jax.random.key(1)
        )
    embed = jitted["params"]["token_embed"]["embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ref = init_params(cfg.model, jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(eager), jax.device_get(ref))
    # Sharded, the initialisers' float32 arithmetic may round differently in the last bit.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # noqa: E731
    jax.tree.map(close, jax.device_get(jitted), jax.device_get(ref))


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((-1, -1, 1), "at most one of data/fsdp/tensor may be -1"),
        ((3, 1, 1), "data*fsdp*tensor = 3 but there are 8 devices"),
        ((-1, 3, 1), "not divisible by the fixed axes"),
        ((0, 1, 1), "must be positive or -1"),
    ],
)
def test_bad_mesh_shapes_are_named(sizes, message):
    d, f, t = sizes
    with pytest.raises(ConfigError, match=re.escape(message)):
        parallel.mesh_shape(ParallelConfig(data=d, fsdp=f, tensor=t), 8)


def test_rules_name_unknown_mesh_axes():
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        parallel.rules(ParallelConfig(rules=(("batch", "pipeline"),)))


def test_distributed_env_must_be_complete(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
        parallel.initialize_distributed()
