"""LoRA: the forward equals merged weights', only adapters train, scan, meshes and decoding."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

import flaxformer_lite as ffl
from flaxformer_lite.config import LoraConfig
from flaxformer_lite.layers import lora
from flaxformer_lite.runtime import parallel
from flaxformer_lite.train import init_train_state, make_optimizer, make_train_step
from flaxformer_lite.train.loop import programs

ALL = "model.lora.targets=[query,key,value,out,wi,wg,wo]"
TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=64",
        "model.max_len=32", "data.seq_len=16", "data.batch_size=8", "model.lora.rank=4", ALL]


def _cfg(*overrides):
    return ffl.load_config("llama_tiny", overrides=TINY + list(overrides))


def _init(model_cfg):
    return jax.jit(ffl.init_params, static_argnums=0)(model_cfg, jax.random.key(0))


def _randomised(params, seed=1):
    """Adapters with random B too (a fresh B is zero, which would hide a wrong product)."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return traverse_util.unflatten_dict({
        k: 0.2 * jax.random.normal(key, v.shape, v.dtype) if lora.is_adapter(k) else v
        for key, (k, v) in zip(keys, flat.items())
    })


def _base(cfg):
    return dataclasses.replace(cfg, lora=LoraConfig())


def _logits(cfg, params, ids):
    return jax.jit(lambda p, i: ffl.build_model(cfg).apply(p, i).logits)(params, ids)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_forward_equals_the_merged_weights_forward(scan):
    cfg = _cfg(f"model.scan_layers={str(scan).lower()}", "model.remat_policy=full").model
    params = _randomised(_init(cfg))
    ids = jax.random.randint(jax.random.key(2), (2, 16), 3, cfg.vocab_size)
    with_adapters = _logits(cfg, params, ids)
    merged = _logits(_base(cfg), lora.merge(params, cfg), ids)
    base = _logits(_base(cfg), lora.split(params)[1], ids)
    np.testing.assert_allclose(with_adapters, merged, atol=1e-5)
    assert np.abs(np.asarray(with_adapters - base)).max() > 1e-2  # the adapters do change the output


def test_fresh_adapters_change_nothing_and_sit_beside_each_target():
    cfg = _cfg("model.lora.targets=[query,wo]", "model.lora.base_dtype=bfloat16").model
    params = _init(cfg)
    flat = traverse_util.flatten_dict(params)
    adapters = {k[-1] for k in flat if lora.is_adapter(k)}
    assert adapters == {"query_lora_a", "query_lora_b", "wo_lora_a", "wo_lora_b"}
    assert {str(v.dtype) for k, v in flat.items() if lora.is_adapter(k)} == {"float32"}
    assert {str(v.dtype) for k, v in flat.items() if not lora.is_adapter(k)} == {"bfloat16"}
    ids = jax.random.randint(jax.random.key(2), (2, 8), 3, cfg.vocab_size)
    np.testing.assert_array_equal(_logits(cfg, params, ids), _logits(_base(cfg), lora.split(params)[1], ids))


def test_an_int8_base_is_weight_only_per_channel_and_merges_exactly():
    cfg = _cfg()
    int8 = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, base_dtype="int8"))
    params = _randomised(_init(cfg.model))
    quantized = lora.quantize_base(params, int8)
    query = quantized["params"]["decoder"]["layers_0"]["self_attention"]
    assert query["query"].dtype == np.int8 and query["query_scale"].shape == query["query"].shape[1:]
    assert int(np.abs(np.asarray(query["query"])).max()) == 127  # each output channel's largest weight
    ids = jax.random.randint(jax.random.key(2), (2, 16), 3, cfg.model.vocab_size)
    exact, approx = _logits(cfg.model, params, ids), _logits(int8, quantized, ids)
    assert 0 < np.abs(np.asarray(exact - approx)).max() < 0.02 * np.abs(np.asarray(exact)).max()
    np.testing.assert_allclose(approx, _logits(_base(int8), lora.merge(quantized, int8), ids), atol=1e-5)


@pytest.mark.parametrize("base_dtype", ["null", "int8"])
def test_training_updates_adapters_only(base_dtype):
    cfg = _cfg("train.learning_rate=1e-2", "train.warmup_steps=0", "model.lora.dropout=0.1",
               f"model.lora.base_dtype={base_dtype}")
    model, optimizer = ffl.build_model(cfg.model), make_optimizer(cfg.train)
    params = _init(cfg.model)
    state = init_train_state(params, optimizer, 0, adapters_only=True)
    # The optimizer state holds the adapters' moments only: nothing of the base's size.
    adapters, base = lora.split(params)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(3, cfg.model.vocab_size, (8, 16)).astype(np.int32),
        "labels": rng.integers(3, cfg.model.vocab_size, (8, 16)).astype(np.int32),
        "weights": np.ones((8, 16), np.float32), "segment_ids": np.ones((8, 16), np.int32),
        "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
    }
    step = jax.jit(make_train_step(model, cfg, optimizer))
    first_loss = None
    for _ in range(4):
        state, sums = step(state, batch)
        first_loss = first_loss if first_loss is not None else float(sums["loss_sum"])
    trained, frozen = lora.split(jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, frozen, jax.device_get(base))  # bit-identical base
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), trained, jax.device_get(adapters))
    assert all(jax.tree.leaves(changed))  # every A and B moved (A once B was no longer zero)
    assert float(sums["loss_sum"]) < first_loss


def test_a_lora_run_shards_over_a_mesh_and_keeps_its_base():
    cfg = _cfg("parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2")
    mesh = parallel.make_mesh(cfg.parallel)
    rng = np.random.default_rng(1)
    batch = {"input_ids": rng.integers(3, 300, (8, 16)).astype(np.int32),
             "labels": rng.integers(3, 300, (8, 16)).astype(np.int32),
             "weights": np.ones((8, 16), np.float32), "segment_ids": np.ones((8, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
    with parallel.use_mesh(mesh, cfg.parallel):
        prog = programs(cfg, mesh)
        state = prog.init(jax.random.key(0))
        base = jax.device_get(lora.split(state.params)[1])
        query_a = state.params["params"]["decoder"]["layers_0"]["self_attention"]["query_lora_a"]
        assert query_a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
        state, sums = prog.train_step(state, parallel.shard_batch(mesh, batch))
        assert np.isfinite(float(sums["loss_sum"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(lora.split(state.params)[1]), base)


def test_generate_uses_the_adapters_without_merging():
    cfg = _cfg().model
    params = _randomised(_init(cfg))
    prompt = [[5, 9, 11, 4], [7, 3, 8, 12]]
    out = ffl.generate(ffl.build_model(cfg), params, prompt, max_new_tokens=8, method="greedy")
    merged = ffl.generate(ffl.build_model(_base(cfg)), lora.merge(params, cfg), prompt, max_new_tokens=8,
                          method="greedy")
    np.testing.assert_array_equal(out.tokens, merged.tokens)
