"""model.attention_impl=splash: the Pallas splash kernel (interpret mode on this CPU) gives
xla attention's logits and gradients; what it cannot take is refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from flaxformer_lite import ops
from flaxformer_lite.config import ConfigError, load_config, validate_model
from flaxformer_lite.models import build_model, init_params

# Gemma 2's shape, scanned: GQA (4 heads, 2 kv heads), soft-capped logits, a local layer
# (window 32, chosen per layer by lax.cond under the scan) and a global one. 136 tokens pad
# to one kernel tile of 256.
OVERRIDES = ["model.num_layers=2", "model.scan_layers=true", "model.vocab_size=64"]
B, T = 2, 136


def test_splash_equals_xla_in_logits_and_gradients():
    cfg = load_config("gemma2_tiny", overrides=OVERRIDES).model
    xla, splash = build_model(cfg), build_model(dataclasses.replace(cfg, attention_impl="splash"))
    params = init_params(cfg, jax.random.key(0))
    ids_BT = jax.random.randint(jax.random.key(1), (B, T), 1, cfg.vocab_size)
    # Two packed documents and padding (segment 0) in row 0; one document in row 1.
    seg_BT = jnp.array([[1] * 60 + [2] * 70 + [0] * 6, [1] * T])
    pos_BT = jnp.stack([jnp.concatenate([jnp.arange(60), jnp.arange(70), jnp.zeros(6, int)]), jnp.arange(T)])
    weights_V = jax.random.normal(jax.random.key(2), (cfg.vocab_size,))

    def loss(p, model):
        logits = model.apply(p, ids_BT, segment_ids=seg_BT, positions=pos_BT).logits
        return jnp.sum(logits * weights_V * (seg_BT != 0)[..., None]), logits

    (_, want), want_grads = jax.value_and_grad(loss, has_aux=True)(params, xla)
    (_, got), got_grads = jax.value_and_grad(loss, has_aux=True)(params, splash)
    assert jnp.abs(got - want).max() < 1e-5
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert jnp.abs(g - w).max() <= 1e-4 * (1 + jnp.abs(w).max())
    # Without segment ids the tokens' validity is the kernel's segment ids: real positions agree.
    valid_BT = seg_BT != 0
    real = valid_BT[..., None]
    got = splash.apply(params, ids_BT, attention_mask=valid_BT).logits
    want = xla.apply(params, ids_BT, attention_mask=valid_BT).logits
    assert jnp.abs((got - want) * real).max() < 1e-5


def test_splash_tiles_skip_what_the_static_mask_hides():
    assert ops.splash_block(136) == (256, 256) and ops.splash_block(8192) == (512, 8192)
    assert ops.splash_visible_blocks(8192, causal=True) == 16 * 17 // 2
    assert ops.splash_visible_blocks(8192, causal=False) == 256
    # A 512-token window reaches one tile back: the diagonal and the tile before it.
    assert ops.splash_visible_blocks(8192, causal=True, window=512) == 16 + 15


@pytest.mark.parametrize("override, names", [
    ("model.position=alibi", "model.position=alibi"),
    ("model.attention_dropout_rate=0.1", "model.attention_dropout_rate=0.1"),
])
def test_what_splash_cannot_take_is_refused_by_name(override, names):
    cfg = load_config("llama_tiny", overrides=[override]).model
    with pytest.raises(ConfigError, match=f"model.attention_impl=splash cannot take {names}.*attention_impl=xla"):
        validate_model(dataclasses.replace(cfg, attention_impl="splash"))
