"""Same model, different execution: scan equals the unrolled loop, remat equals no remat, jit
equals no jit."""

import dataclasses

import chex
import jax
import numpy as np
import pytest
from core_helpers import B, T, assert_tree_close, init, lm_loss, model_args, random_ids, tiny

from flaxformer_lite.models import build_model, init_params, stack_layers, unstack_layers

FAMILY_CONFIGS = {
    "decoder": tiny(family="decoder", num_layers=2, position="rope", activation="swiglu", num_kv_heads=2),
    "encoder_decoder": tiny(family="encoder_decoder", num_layers=2, position="relative", norm="rmsnorm"),
}

# Halves XLA:CPU compile time; these tests compare values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _value_and_grad(cfg, params, ids):
    model = build_model(cfg)

    def loss_fn(p):
        out = model.apply(p, *model_args(cfg, ids), return_attentions=True)
        return lm_loss(out, ids), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, out, grads


def value_and_grad(cfg, params, ids):
    """(loss, ModelOutput with attentions, grads) of the LM loss on ids.

    Scanned models run jitted: eager nn.scan compiles its loop afresh on every call, while
    jit compiles once; unrolled models run eagerly, reusing per-primitive compiles.
    """
    if cfg.scan_layers:
        return jax.jit(_value_and_grad, static_argnums=0, compiler_options=FAST_COMPILE)(cfg, params, ids)
    return _value_and_grad(cfg, params, ids)


@pytest.fixture(scope="module")
def ids():
    return random_ids(0, B, T, 64)


# The encoder family's stack is the encoder_decoder's encoder stack: two families cover it.
@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_scan_equals_unrolled_loop(family, ids):
    cfg = FAMILY_CONFIGS[family]
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    params = init(cfg)
    stacked = stack_layers(params)
    # The converted tree is exactly what a scanned model initialises: names, shapes, dtypes.
    assert jax.tree.map(lambda x: (x.shape, x.dtype), stacked) == jax.tree.map(
        lambda x: (x.shape, x.dtype), jax.eval_shape(lambda: init(scan_cfg)))
    assert_tree_close(unstack_layers(stacked), params, rtol=0, atol=0)

    loss, out, grads = value_and_grad(cfg, params, ids)
    scan_loss, scan_out, scan_grads = value_and_grad(scan_cfg, stacked, ids)
    np.testing.assert_allclose(float(scan_loss), float(loss), rtol=1e-6)
    assert_tree_close(scan_out, out)  # logits, hidden states and per-layer attentions [L,...]
    assert_tree_close(scan_grads, stack_layers(grads))


@pytest.mark.parametrize(
    "family, policy, scan",
    [
        ("decoder", "full", False),
        ("encoder_decoder", "full", False),
        ("decoder", "dots_with_no_batch_dims_saveable", False),
        ("encoder_decoder", "dots_with_no_batch_dims_saveable", False),
        ("decoder", "dots_with_no_batch_dims_saveable", True),  # remat inside nn.scan
    ],
)
def test_remat_equals_no_remat(family, policy, scan, ids):
    cfg = dataclasses.replace(FAMILY_CONFIGS[family], scan_layers=scan)
    params = init(cfg)
    loss, out, grads = value_and_grad(cfg, params, ids)
    remat_loss, remat_out, remat_grads = value_and_grad(dataclasses.replace(cfg, remat_policy=policy), params, ids)
    np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
    assert_tree_close(remat_out, out)
    assert_tree_close(remat_grads, grads)


@pytest.mark.parametrize("scan", [False, True])
def test_full_remat_cuts_compiled_temp_memory(scan, ids):
    # Unrolled, nn.remat used to save nothing on XLA:CPU (models/remat.py says why).
    cfg = dataclasses.replace(FAMILY_CONFIGS["decoder"], num_layers=4, d_model=64, d_ff=256, scan_layers=scan)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    batch = random_ids(1, 4, 64, 64)

    def temp_bytes(policy):
        model = build_model(dataclasses.replace(cfg, remat_policy=policy))
        loss = lambda p: lm_loss(model.apply(p, *model_args(cfg, batch)), batch)  # noqa: E731
        compiled = jax.jit(jax.grad(loss)).lower(params).compile(FAST_COMPILE)
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < temp_bytes("none") / 2

def test_layout_helpers_reject_malformed_trees():
    with pytest.raises(ValueError, match="not layers_0..layers_1"):
        stack_layers({"layers_0": {"w": np.ones(2)}, "layers_2": {"w": np.ones(2)}})
    with pytest.raises(ValueError, match="leading layer axis"):
        unstack_layers({"layers": {"a": np.ones((2, 3)), "b": np.ones((3, 3))}})


class JitEqualsNoJitTest(chex.TestCase):
    """chex.variants runs each test once under jax.jit and once without it."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_and_gradient(self):
        ids = random_ids(0, B, T, 64)
        cfg = FAMILY_CONFIGS["encoder_decoder"]  # both stacks, cross-attention, relative bias
        model, params = build_model(cfg), init(cfg)

        def loss_and_grad(p, x):
            return jax.value_and_grad(lambda p: lm_loss(model.apply(p, *model_args(cfg, x)), x))(p)

        loss, grads = self.variant(loss_and_grad)(params, ids)
        ref_loss, ref_grads = loss_and_grad(params, ids)  # the un-jitted reference
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        assert_tree_close(grads, ref_grads)
