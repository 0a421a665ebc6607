"""The pure steps: sums against ops, accumulation, dropout keys, pmap, exact match."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxformer_lite as ffl
from flaxformer_lite import ops
from flaxformer_lite.config import ConfigError
from flaxformer_lite.train import check_objective, init_train_state, make_eval_step, make_optimizer, make_train_step
from flaxformer_lite.train.step import sequence_sums

B, T = 4, 16


@pytest.fixture(scope="module")
def lm(tiny):
    cfg = tiny("gpt_tiny", "model.dropout_rate=0.1")
    model = ffl.build_model(cfg.model)
    params = ffl.init_params(cfg.model, jax.random.key(1))
    rng = np.random.default_rng(0)
    segment_ids = np.sort(rng.integers(0, 3, (B, T)), axis=1)[:, ::-1].astype(np.int32)  # padding at the end
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in np.unique(segment_ids[b]):
            where = segment_ids[b] == s
            positions[b, where] = np.arange(where.sum())
    batch = {
        "input_ids": rng.integers(4, 260, (B, T)).astype(np.int32),
        "labels": rng.integers(4, 260, (B, T)).astype(np.int32),
        "weights": (segment_ids > 0) * rng.integers(0, 2, (B, T)).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": positions,
    }
    return cfg, model, params, batch


def test_eval_sums_match_ops_cross_entropy(lm):
    cfg, model, params, batch = lm
    sums = jax.jit(make_eval_step(model, cfg))(params, batch)
    logits = model.apply(params, batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"]).logits
    _, ref = ops.cross_entropy(logits, batch["labels"], batch["weights"])
    for key in ("loss_sum", "weight_sum", "correct_sum"):
        np.testing.assert_allclose(sums[key], ref[key], rtol=1e-5)
    assert sums["token_count"] == np.count_nonzero(batch["segment_ids"])


@pytest.fixture(scope="module")
def sgd_step(lm):
    """Without dropout, under SGD with rate 1: the update is minus the gradient, so
    gradients compare through params. (cfg, model, state, one jitted step's result)."""
    cfg, _, params, batch = lm
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout_rate=0.0))
    model = ffl.build_model(cfg.model)
    sgd = optax.sgd(1.0)
    state = init_train_state(params, sgd, 0)
    return cfg, model, sgd, state, jax.jit(make_train_step(model, cfg, sgd))(state, batch)


def test_gradient_accumulation_makes_the_same_update(lm, sgd_step):
    batch = lm[3]
    cfg, model, sgd, state, (one, one_sums) = sgd_step
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=4))
    four, four_sums = jax.jit(make_train_step(model, cfg, sgd))(state, batch)
    for key in ("loss_sum", "weight_sum", "correct_sum", "token_count", "grad_norm"):
        np.testing.assert_allclose(four_sums[key], one_sums[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), four.params, one.params)


@pytest.mark.parametrize("overrides", [
    ("train.label_smoothing=0.1", "train.z_loss=1e-3"),  # tied head
    ("model.tie_embeddings=false", "model.tied_logits_scale=true"),
])
def test_chunked_loss_makes_the_same_update(lm, tiny, overrides):
    """train.loss_chunk_size: the same sums and SGD update (so gradients) as whole logits."""
    batch = lm[3]
    cfg = tiny("gpt_tiny", "model.dropout_rate=0.0", *overrides)
    chunked_cfg = tiny("gpt_tiny", "model.dropout_rate=0.0", *overrides, "train.loss_chunk_size=24")  # 64 tokens: 3 chunks
    model, sgd = ffl.build_model(cfg.model), optax.sgd(1.0)
    state = init_train_state(ffl.init_params(cfg.model, jax.random.key(2)), sgd, 0)
    whole, whole_sums = jax.jit(make_train_step(model, cfg, sgd))(state, batch)
    chunked, chunked_sums = jax.jit(make_train_step(model, chunked_cfg, sgd))(state, batch)
    for key in ("loss_sum", "z_loss_sum", "weight_sum", "correct_sum", "token_count", "grad_norm"):
        np.testing.assert_allclose(chunked_sums[key], whole_sums[key], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), chunked.params, whole.params)
    eval_whole = jax.jit(make_eval_step(model, cfg))(state.params, batch)
    eval_chunked = jax.jit(make_eval_step(model, chunked_cfg))(state.params, batch)
    np.testing.assert_allclose(eval_chunked["loss_sum"], eval_whole["loss_sum"], rtol=1e-5)


@pytest.mark.parametrize("lora", [[], ["model.lora.rank=4"]], ids=["full", "lora"])
def test_bfloat16_params_train_in_bfloat16(lm, tiny, lora):
    """model.param_dtype=bfloat16 under AdamW: the step keeps every parameter's and moment's
    dtype (a float32 gradient would make the skip-on-non-finite branches disagree) and moves
    what it trains."""
    cfg = tiny("llama_tiny" if lora else "gpt_tiny", "model.dropout_rate=0.0", "model.param_dtype=bfloat16", *lora)
    model, optimizer = ffl.build_model(cfg.model), make_optimizer(cfg.train)
    params = ffl.init_params(cfg.model, jax.random.key(3))
    state = init_train_state(params, optimizer, 0, adapters_only=bool(lora))
    batch = {k: v for k, v in lm[3].items()}
    new, sums = jax.jit(make_train_step(model, cfg, optimizer))(state, batch)
    assert np.isfinite(sums["loss_sum"]) and sums["nonfinite"] == 0
    dtypes = lambda tree: [x.dtype for x in jax.tree.leaves(tree)]  # noqa: E731
    assert dtypes(new.params) == dtypes(state.params) and dtypes(new.opt_state) == dtypes(state.opt_state)
    assert {d for d in dtypes(new.params) if jnp.issubdtype(d, jnp.floating)} == {jnp.dtype(jnp.bfloat16)}
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))]
    assert any(moved) and (not lora or not all(moved))  # LoRA: the base stays as it was


def test_loss_chunk_size_needs_causal_lm(tiny):
    with pytest.raises(ConfigError, match="train.loss_chunk_size=64 applies to data.objective=causal_lm"):
        tiny("t5_tiny", "train.loss_chunk_size=64")


def test_dropout_key_is_a_function_of_seed_and_step(lm):
    cfg, model, params, batch = lm
    opt = make_optimizer(cfg.train)
    step = jax.jit(make_train_step(model, cfg, opt))
    state = init_train_state(params, opt, seed=0)
    loss = lambda s: float(step(s, batch)[1]["loss_sum"])
    assert loss(state) == loss(state)  # same seed and step: bit-identical
    assert loss(state) != loss(state.replace(step=state.step + 1))  # a new mask each step
    assert loss(state) != loss(init_train_state(params, opt, seed=1))


def test_step_under_pmap_with_axis_name_equals_one_device(lm, sgd_step):
    batch = lm[3]
    cfg, model, sgd, state, (single, single_sums) = sgd_step
    pstep = jax.pmap(
        make_train_step(model, cfg, sgd, axis_name="data"), axis_name="data", in_axes=(None, 0),
        devices=jax.devices()[:2],
    )
    halves = jax.tree.map(lambda x: x.reshape(2, B // 2, *x.shape[1:]), batch)
    multi, multi_sums = pstep(state, halves)
    np.testing.assert_allclose(multi_sums["loss_sum"][0], single_sums["loss_sum"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-7), multi.params, single.params)


def test_sequence_exact_match_counts_each_packed_sequence():
    rng = np.random.default_rng(0)
    V = 7
    labels = rng.integers(0, V, (3, 10))
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 3, 3, 3, 3, 0, 0]])
    weights = (segments > 0).astype(np.float32)
    predicted = labels.copy()
    predicted[0, 4] = (labels[0, 4] + 1) % V  # breaks sequence 2 of row 0
    predicted[2, 0] = (labels[2, 0] + 1) % V  # breaks sequence 1 of row 2
    predicted[1, 9] = (labels[1, 9] + 1) % V
    weights[1, 9] = 0.0  # ... but that token is not scored: row 1 stays right
    logits = jax.nn.one_hot(predicted, V) + 0.01 * rng.random((3, 10, V))
    sums = sequence_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), jnp.asarray(segments))
    expected_right = 0
    for b in range(3):
        for s in set(segments[b]) - {0}:
            tokens = (segments[b] == s) & (weights[b] > 0)
            expected_right += bool((predicted[b][tokens] == labels[b][tokens]).all())
    assert int(sums["seq_count"]) == 2 + 1 + 3
    assert int(sums["seq_correct_sum"]) == expected_right


@pytest.mark.parametrize(
    "preset, objective",
    [("gpt_tiny", "masked_lm"), ("bert_tiny", "causal_lm"), ("t5_tiny", "classification"), ("gpt_tiny", "copy")],
)
def test_objective_and_family_must_agree(tiny, preset, objective):
    cfg = tiny(preset, f"data.objective={objective}")
    with pytest.raises(ConfigError, match=f"data.objective={objective} needs model.family"):
        check_objective(cfg)
