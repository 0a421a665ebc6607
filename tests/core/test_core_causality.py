"""Causality by gradients: no output position depends on a later input, for every position scheme."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import (
    B, ENC_DEC_POSITIONS, POSITIONS, T, init, key, model_args, normal, random_ids, random_like, tiny,
)

from flaxformer_lite.models import Stack, build_model


def influence_TT(cfg, causal, has_cross=False):
    """[T,T]: sum |d out[t] / d x[t']| of a one-layer Stack, differentiated w.r.t. its input x_BTD.

    A vjp per output position t (vmapped), with a random cotangent on out[:, t] only.
    """
    stack = Stack(cfg, num_layers=1, causal=causal, has_cross=has_cross)
    x_BTD = normal(1, B, T, cfg.d_model)
    kwargs = dict(valid_BT=jnp.ones((B, T), bool), positions_BT=jnp.broadcast_to(jnp.arange(T), (B, T)))
    if has_cross:
        kwargs.update(encoder_BSD=normal(2, B, T, cfg.d_model),
                      encoder_valid_BS=jnp.ones((B, T), bool))
    params = random_like(jax.eval_shape(lambda: nn.unbox(stack.init(key(0), x_BTD, **kwargs))))
    _, vjp = jax.vjp(lambda x: stack.apply(params, x, **kwargs)[0], x_BTD)
    cotangent_tBTD = normal(3, *x_BTD.shape) * np.eye(T, dtype=np.float32)[:, None, :, None]
    (grad_tBTD,) = jax.vmap(vjp)(cotangent_tBTD)
    return np.abs(np.asarray(grad_tBTD)).sum(axis=(1, 3))


def assert_causal(influence_TT, window=None):
    """Zero (exactly, not merely small) where the query may not look; positive where it may."""
    query, source = np.indices((T, T))
    visible = source <= query
    if window is not None:
        visible &= query - source < window
    np.testing.assert_array_equal(influence_TT[~visible], 0.0)
    assert (influence_TT[visible] > 0).all(), "every visible position should influence the output"


@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_stack_is_causal(position):
    assert_causal(influence_TT(tiny(position=position), causal=True))


@pytest.mark.parametrize("position", ENC_DEC_POSITIONS)
def test_encoder_decoder_decoder_stack_is_causal(position):
    assert_causal(influence_TT(tiny(family="encoder_decoder", position=position), causal=True, has_cross=True))


def test_sliding_window_limits_the_past():
    assert_causal(influence_TT(tiny(position="rope", sliding_window=3), causal=True), window=3)


def test_encoder_stack_sees_the_future():
    """Control: the same measurement finds the bidirectional stack's dependence on later inputs."""
    influence = influence_TT(tiny(position="relative"), causal=False)
    assert (influence > 0).all()


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_changing_later_tokens_leaves_earlier_logits_unchanged(family):
    for position in POSITIONS if family == "decoder" else ENC_DEC_POSITIONS:
        cfg = tiny(family=family, position=position)
        model, params = build_model(cfg), init(cfg)
        ids = random_ids(0, B, T, cfg.vocab_size)
        split_B = (1, 4)  # row b changes from position split_B[b] on
        changed = np.where(np.arange(T)[None] >= np.asarray(split_B)[:, None],
                           random_ids(1, B, T, cfg.vocab_size), ids)
        if family == "decoder":
            a, b = model.apply(params, ids).logits, model.apply(params, changed).logits
        else:  # same source, decoder inputs differ
            a = model.apply(params, *model_args(cfg, ids, ids)).logits
            b = model.apply(params, *model_args(cfg, ids, changed)).logits
        a, b = np.asarray(a), np.asarray(b)
        for row, t in enumerate(split_B):
            np.testing.assert_array_equal(a[row, :t], b[row, :t], err_msg=f"{position} t={t}")
            assert not np.array_equal(a[row, t:], b[row, t:])
