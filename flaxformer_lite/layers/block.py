"""Transformer blocks: self-attention (+ cross-attention) + feed-forward, pre- or post-LN."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.layers.attention import MultiHeadAttention
from flaxformer_lite.layers.basic import FeedForward, Norm
from flaxformer_lite.layers.common import constrain

ACT_AXES = ("batch", "length", "embed")


class EncoderBlock(nn.Module):
    """Self-attention then FFN, each a residual sub-layer.

    Pre-LN: x + f(norm(x)) (GPT-2, T5, LLaMA). Post-LN: norm(x + f(x)) (Vaswani et al.
    2017, BERT). Sandwich: x + post_norm(f(norm(x))) (Gemma 2 and 3). Residual dropout on
    each sub-layer's output. The same block is causal or bidirectional by the mask it is
    given; `causal` says the mask hides later keys, so self-attention may skip them. A
    model with local and global layers passes the local layers' `local_mask` too, and
    each layer its `is_local` flag (traced under nn.scan). `segment_ids_BT` is what the
    splash kernel takes instead of the mask (model.attention_impl=splash; None otherwise).
    DecoderBlock adds cross-attention.

    The call signature (carry first, then arrays, returning (carry, per-layer output))
    is what nn.scan needs; flags are attributes so remat and scan see no Python values.
    """

    cfg: ModelConfig
    deterministic: bool = True
    decode: bool = False
    return_weights: bool = False
    has_cross: bool = False
    causal: bool = False

    def _sublayer(self, x_BTD, fn, name):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        x_BTD = ops.materialize_cotangent(x_BTD)  # the residual gradient, computed once (XLA:CPU)
        if cfg.norm_position == "pre":
            y, aux = fn(Norm(cfg, name=f"{name}_norm")(x_BTD))
            return x_BTD + drop(y), aux
        if cfg.norm_position == "sandwich":
            y, aux = fn(Norm(cfg, name=f"{name}_norm")(x_BTD))
            return x_BTD + drop(Norm(cfg, name=f"{name}_post_norm")(y)), aux
        y, aux = fn(x_BTD)
        return Norm(cfg, name=f"{name}_norm")(x_BTD + drop(y)), aux

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        mask: Optional[jax.Array],
        local_mask: Optional[jax.Array],
        bias: Optional[jax.Array],
        positions_BT: Optional[jax.Array],
        encoder_BSD: Optional[jax.Array],
        cross_mask: Optional[jax.Array],
        cache_index: Optional[jax.Array],
        segment_ids_BT: Optional[jax.Array],
        is_local: Optional[jax.Array],
    ):
        cfg = self.cfg
        if local_mask is not None:
            mask = jnp.where(is_local, local_mask, mask)
        attn = lambda cross, name: MultiHeadAttention(  # noqa: E731
            cfg, is_cross=cross, decode=self.decode, deterministic=self.deterministic,
            causal=self.causal and not cross, name=name,
        )
        self_attn = attn(False, "self_attention")
        x_BTD, self_w = self._sublayer(
            x_BTD,
            lambda h: self_attn(h, mask=mask, bias=bias, q_positions_BT=positions_BT, cache_index=cache_index,
                                return_weights=self.return_weights, is_local=is_local,
                                segment_ids_BT=segment_ids_BT),
            "self_attention",
        )
        weights = {"self": self_w}
        if self.has_cross:
            cross_attn = attn(True, "cross_attention")
            x_BTD, cross_w = self._sublayer(
                x_BTD,
                lambda h: cross_attn(h, encoder_BSD, mask=cross_mask, return_weights=self.return_weights),
                "cross_attention",
            )
            weights["cross"] = cross_w
        ffn = FeedForward(cfg, name="mlp")
        x_BTD, _ = self._sublayer(x_BTD, lambda h: (ffn(h), None), "mlp")
        x_BTD = constrain(x_BTD, ACT_AXES)
        return x_BTD, (weights if self.return_weights else None)


class DecoderBlock(EncoderBlock):
    """EncoderBlock with cross-attention over the encoder output between the two."""

    has_cross: bool = True
