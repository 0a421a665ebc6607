"""Multi-head attention: self or cross, GQA, RoPE, and a KV cache for decoding."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.layers.common import constrain, kernel_init, param

CACHE_AXES = ("batch", "kv_length", "kv_heads", "head_dim")


class MultiHeadAttention(nn.Module):
    """Projections around ops.dot_product_attention.

    Self-attention when `kv_BSD` is None, cross-attention otherwise. With `decode=True`
    the keys and values live in the 'cache' collection:
      - self-attention writes the new K/V at slot `cache_index` and attends over all
        S = max slots (the caller's mask hides unwritten and future slots);
      - cross-attention computes K/V from `kv_BSD` when given (the prefill call) and
        reads them back from the cache when `kv_BSD` is None (each later step).
    The cache holds K (not N) heads, so GQA saves cache memory as well.
    """

    cfg: ModelConfig
    is_cross: bool = False
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        kv_BSD: Optional[jax.Array] = None,
        *,
        mask: Optional[jax.Array] = None,
        bias: Optional[jax.Array] = None,
        q_positions_BT: Optional[jax.Array] = None,
        cache_index: Optional[jax.Array] = None,
        return_weights: bool = False,
    ):
        cfg = self.cfg
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        init = kernel_init(cfg)
        zeros = nn.initializers.zeros
        wq = param(self, "query", init, (D, N, H), ("embed", "heads", "head_dim"), self.cfg)
        wo = param(self, "out", init, (N, H, D), ("heads", "head_dim", "embed"), self.cfg)
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, wq)
        if cfg.use_bias:
            q_BTNH = q_BTNH + param(self, "query_bias", zeros, (N, H), ("heads", "head_dim"), cfg)
        if cfg.position == "rope" and not self.is_cross:
            q_BTNH = ops.rope(q_BTNH, q_positions_BT, cfg.rope_theta)

        source_BSD = x_BTD if not self.is_cross else kv_BSD
        k_BSKH = v_BSKH = None
        if source_BSD is not None:
            wk = param(self, "key", init, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
            wv = param(self, "value", init, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
            k_BSKH = jnp.einsum("BSD,DKH->BSKH", source_BSD, wk)
            v_BSKH = jnp.einsum("BSD,DKH->BSKH", source_BSD, wv)
            if cfg.use_bias:
                k_BSKH = k_BSKH + param(self, "key_bias", zeros, (K, H), ("kv_heads", "head_dim"), cfg)
                v_BSKH = v_BSKH + param(self, "value_bias", zeros, (K, H), ("kv_heads", "head_dim"), cfg)
            if cfg.position == "rope" and not self.is_cross:
                k_BSKH = ops.rope(k_BSKH, q_positions_BT, cfg.rope_theta)

        if self.decode:
            k_BSKH, v_BSKH = self._update_cache(k_BSKH, v_BSKH, cache_index)

        k_BSKH = constrain(k_BSKH, CACHE_AXES)
        v_BSKH = constrain(v_BSKH, CACHE_AXES)
        dropout_rng = None
        if not self.deterministic and cfg.attention_dropout_rate > 0:
            dropout_rng = self.make_rng("dropout")
        out_BTNH, weights_BNTS = ops.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, bias, mask,
            scale=None if cfg.scale_attention else 1.0,
            implementation=cfg.attention_impl,
            return_weights=return_weights,
            dropout_rate=cfg.attention_dropout_rate,
            dropout_rng=dropout_rng,
        )
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, wo)
        if cfg.use_bias:
            out_BTD = out_BTD + param(self, "out_bias", zeros, (D,), ("embed",), cfg)
        return out_BTD, weights_BNTS

    def _update_cache(self, k_BSKH, v_BSKH, cache_index):
        """Write new K/V into the cache (or read cross K/V back); return what to attend to."""
        filled = self.has_variable("cache", "key")
        if k_BSKH is None and not filled:
            raise ValueError("cross-attention cache is empty: pass the encoder output on the first call")
        zeros = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
        shape, dt = (k_BSKH.shape, k_BSKH.dtype) if k_BSKH is not None else (None, None)
        cached_k = self.variable("cache", "key", zeros, shape, dt)
        cached_v = self.variable("cache", "value", zeros, shape, dt)
        if self.is_cross:
            if k_BSKH is not None:  # prefill: store the encoder's K/V once
                cached_k.value, cached_v.value = k_BSKH, v_BSKH
            return cached_k.value, cached_v.value
        if not filled:  # init call: the cache was just created with max_len slots
            return k_BSKH, v_BSKH
        start = (0, cache_index, 0, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BSKH.astype(cached_k.value.dtype), start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BSKH.astype(cached_v.value.dtype), start)
        return cached_k.value, cached_v.value
