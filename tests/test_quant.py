"""Reduced-precision frozen bases: NF4 codes (QLoRA), their forward, training and memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import flaxformer_lite as ffl
from flaxformer_lite import ops
from flaxformer_lite.config import ConfigError, LoraConfig
from flaxformer_lite.layers import lora
from flaxformer_lite.train import init_train_state, make_optimizer, make_train_step

TINY = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=256",
        "model.max_len=32", "model.vocab_size=64", "data.seq_len=16", "data.batch_size=4", "model.lora.rank=4",
        "model.lora.targets=[query,key,value,out,wi,wg,wo]"]


def _model(*overrides):
    return ffl.load_config("llama_tiny", overrides=TINY + list(overrides)).model


def _with_base(cfg, base_dtype):
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, base_dtype=base_dtype))


@pytest.mark.parametrize("lead", [0, 1])
def test_nf4_round_trip_error_is_bounded_per_block(lead):
    w = jax.random.normal(jax.random.key(0), (3, 96, 40) if lead else (96, 40)) * 0.02
    codes, absmax = ops.nf4_quantize(w, lead)
    assert codes.dtype == jnp.uint8 and codes.shape == w.shape[:lead] + (60, 32)  # 96*40/64 blocks, 2 codes a byte
    back = ops.nf4_dequantize(codes, absmax, w.shape[lead:])
    assert back.shape == w.shape
    err = np.abs(np.asarray(back - w)).reshape(w.shape[:lead] + (60, 64))
    # Half the widest gap between neighbouring NF4 values (-1 to -0.696), times the block's absmax.
    bound = np.diff(ops.NF4_CODEBOOK).max() / 2 * np.asarray(absmax)[..., None]
    assert np.all(err <= bound + 1e-7)
    # Each block's largest weight is exact (code +-1), and the rest sit mid-way on average.
    flat = np.asarray(w).reshape(err.shape)
    np.testing.assert_allclose(np.abs(flat).max(-1), np.asarray(absmax), rtol=1e-6)
    assert err.mean() < 0.1 * np.abs(flat).mean()
    # NF4's normal quantiles beat 16 evenly spaced levels on normal weights (QLoRA's point).
    levels = np.linspace(-1, 1, 16)
    normed = flat / np.asarray(absmax)[..., None]
    uniform = levels[np.abs(normed[..., None] - levels).argmin(-1)] * np.asarray(absmax)[..., None]
    assert (err ** 2).mean() < 0.9 * ((uniform - flat) ** 2).mean()


def test_nf4_pads_a_last_partial_block_and_packs_the_first_code_high():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 30)), jnp.float32)  # 150 = 2 blocks + 22
    codes, absmax = ops.nf4_quantize(w)
    assert codes.shape == (3, 32) and absmax.shape == (3,)
    first = int(np.argmin(np.abs(ops.NF4_CODEBOOK - float(w[0, 0] / absmax[0]))))
    assert int(codes[0, 0]) >> 4 == first
    assert np.abs(np.asarray(ops.nf4_dequantize(codes, absmax, (5, 30)) - w)).max() < 0.15 * float(absmax.max())


def test_an_nf4_base_forward_is_close_to_the_float_base():
    scan = True  # the stacked [L, ...] kernels quantize layer by layer; the training test runs unrolled ones
    cfg = _model("model.scan_layers=true")
    params = jax.jit(ffl.init_params, static_argnums=0)(cfg, jax.random.key(0))
    nf4 = _with_base(cfg, "nf4")
    quantized = lora.quantize_base(params, nf4)
    flat = traverse_util.flatten_dict(quantized)
    kernels = [k for k in flat if str(k[-1]) in lora.AXES]
    assert len(kernels) == 7 * (1 if scan else 2)
    assert all(flat[k].dtype == jnp.uint8 and k[:-1] + (f"{k[-1]}_absmax",) in flat for k in kernels)
    ids = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    apply = lambda c, p: jax.jit(lambda p, i: ffl.build_model(c).apply(p, i).logits)(p, ids)  # noqa: E731
    exact, approx = apply(cfg, params), apply(nf4, quantized)
    # 4 bits leave a few per cent of relative error in the logits of random weights (int8: under 1%).
    error = float(np.linalg.norm(np.asarray(exact - approx)) / np.linalg.norm(np.asarray(exact)))
    assert 0 < error < 0.15
    # Merging dequantizes: the plain model of the merged weights gives the nf4 forward.
    plain = dataclasses.replace(cfg, lora=LoraConfig())
    np.testing.assert_allclose(apply(plain, lora.merge(quantized, nf4)), approx, atol=1e-5)


def test_a_lora_step_on_an_nf4_base_trains_the_adapters_only():
    cfg = ffl.load_config("llama_tiny", overrides=TINY + ["model.lora.base_dtype=nf4", "train.learning_rate=1e-2",
                                                         "train.warmup_steps=0"])
    params = lora.quantize_base(jax.jit(ffl.init_params, static_argnums=0)(cfg.model, jax.random.key(0)), cfg.model)
    optimizer = make_optimizer(cfg.train)
    state = init_train_state(params, optimizer, 0, adapters_only=True)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 64, (4, 16)).astype(np.int32),
             "labels": rng.integers(0, 64, (4, 16)).astype(np.int32),
             "weights": np.ones((4, 16), np.float32), "segment_ids": np.ones((4, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}
    step = jax.jit(make_train_step(ffl.build_model(cfg.model), cfg, optimizer))
    losses = []
    for _ in range(4):
        state, sums = step(state, batch)
        losses.append(float(sums["loss_sum"]))
    trained, frozen = lora.split(jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, frozen, jax.device_get(lora.split(params)[1]))  # codes untouched
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), trained, jax.device_get(lora.split(params)[0]))
    assert all(jax.tree.leaves(moved)) and losses[-1] < losses[0]


def _step_memory(base_dtypes, *overrides):
    """{base_dtype: memory_analysis()} of the compiled LoRA step of the tiny Llama."""
    base = ffl.load_config("llama_tiny", overrides=TINY + ["model.remat_policy=full", *overrides])
    optimizer = make_optimizer(base.train)
    batch = {k: jax.ShapeDtypeStruct((4, 16), jnp.float32 if k == "weights" else jnp.int32)
             for k in ("input_ids", "labels", "weights", "segment_ids", "positions")}
    memory = {}
    for base_dtype in base_dtypes:
        cfg = dataclasses.replace(base, model=_with_base(base.model, base_dtype))
        state = jax.eval_shape(lambda c=cfg: init_train_state(
            lora.quantize_base(ffl.init_params(c.model, jax.random.key(0)), c.model), optimizer, 0, adapters_only=True))
        step = jax.jit(make_train_step(ffl.build_model(cfg.model), cfg, optimizer), donate_argnums=0)
        memory[base_dtype] = step.lower(state, batch).compile().memory_analysis()
    return memory


def test_a_compiled_step_holds_less_with_each_narrower_base():
    """The step's arguments shrink float32 > bfloat16 > int8 > nf4, and dequantizing inside
    the layers (one layer at a time, scanned and rematerialised) adds no base-sized buffer:
    the int8 and nf4 steps' temporaries stay within 5% of the float32 step's."""
    memory = _step_memory(("float32", "bfloat16", "int8", "nf4"), "model.scan_layers=true")
    arguments = [memory[d].argument_size_in_bytes for d in ("float32", "bfloat16", "int8", "nf4")]
    assert arguments == sorted(arguments, reverse=True) and len(set(arguments)) == 4
    for narrow in ("int8", "nf4"):
        assert memory[narrow].temp_size_in_bytes <= 1.05 * memory["float32"].temp_size_in_bytes
        total = memory[narrow].temp_size_in_bytes + memory[narrow].argument_size_in_bytes
        assert total < memory["float32"].temp_size_in_bytes + memory["float32"].argument_size_in_bytes


def test_an_unrolled_bfloat16_base_converts_layer_by_layer():
    """Unrolled layers (the fine-tune default) convert each bfloat16 kernel inside its own
    layer, so the step's temporaries stay at the float32 step's (ahead of the first layer,
    the converted copies of all layers would add a float32 base)."""
    memory = _step_memory(("float32", "bfloat16"), "model.num_layers=4", "model.d_model=128", "model.d_ff=512")
    assert memory["bfloat16"].argument_size_in_bytes < 0.6 * memory["float32"].argument_size_in_bytes
    assert memory["bfloat16"].temp_size_in_bytes <= 1.05 * memory["float32"].temp_size_in_bytes


def test_a_base_dtype_without_adapters_is_refused():
    with pytest.raises(ConfigError, match="lora.base_dtype=nf4 .*lora.rank=0"):
        ffl.load_config("llama_tiny", overrides=["model.lora.base_dtype=nf4"])



def test_the_lora_bench_makes_its_random_base_as_a_run_stores_it():
    """bench train --lora --base-dtypes: weights made one array at a time, quantized as made,
    in the tree and dtypes a run of that base holds (fresh B zero)."""
    from flaxformer_lite.bench.lora import _random_lora_params

    cfg = _with_base(_model("model.scan_layers=true"), "nf4")
    made = traverse_util.flatten_dict(_random_lora_params(cfg, 0))
    expected = traverse_util.flatten_dict(jax.eval_shape(lambda: ffl.init_params(cfg, jax.random.key(0))))
    assert {k: (v.shape, v.dtype) for k, v in made.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}
    assert all(not np.any(np.asarray(v)) for k, v in made.items() if str(k[-1]).endswith("_lora_b"))
    assert all(np.any(np.asarray(v)) for k, v in made.items() if str(k[-1]).endswith(("_lora_a", "_absmax")))
