"""Multi-head attention: self or cross, GQA, RoPE, q/k norms, soft-capping, and a KV cache for decoding."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.layers import lora
from flaxformer_lite.layers.basic import Norm
from flaxformer_lite.layers.common import constrain, kernel_init, param

KV_AXES = ("batch", "kv_length", "kv_heads", "head_dim")
# The cache's rows are (batch, kv head) pairs, batch-major. Their own logical axis,
# `cache_rows`, is split over (data, fsdp, tensor) by default: where the batch divides
# data*fsdp and the kv heads divide tensor, a device then holds exactly the rows of its
# batch slice and its heads, as the [B,S,K,H] layout split over batch and kv_heads did.
CACHE_AXES = ("cache_rows", "kv_length", "head_dim")


def rope_frequencies(cfg: ModelConfig, is_local: Optional[jax.Array] = None) -> jax.Array:
    """[H/2] RoPE inverse frequencies of a layer: the local base on local layers, if it has one."""
    H = cfg.dim_per_head
    scaling = {} if cfg.rope_scaling is None else dataclasses.asdict(cfg.rope_scaling)
    inv_freq_J = ops.rope_frequencies(H, cfg.rope_theta, **scaling)
    if cfg.rope_local_theta is None or is_local is None:
        return jnp.asarray(inv_freq_J)
    return jnp.where(is_local, ops.rope_frequencies(H, cfg.rope_local_theta), inv_freq_J)


class MultiHeadAttention(nn.Module):
    """Projections around ops.dot_product_attention.

    Self-attention when `kv_BSD` is None, cross-attention otherwise. With `decode=True`
    the keys and values live in the 'cache' collection:
      - self-attention writes the new K/V at slot `cache_index` and attends over all
        S = max slots (the caller's mask hides unwritten and future slots); a vector
        `cache_index` [B] gives each row its own slot, and then the cache may hold more
        rows than the call (the serving engine's pool): the call's are its first ones;
      - cross-attention computes K/V from `kv_BSD` when given (the prefill call) and
        reads them back from the cache when `kv_BSD` is None (each later step).
    The cache holds K (not N) heads, so GQA saves cache memory as well, as B*K rows of
    [S, H] (ops.cache_rows: each decoding step reads them in place).

    `is_local` (a bool, traced under nn.scan) says the layer is a local one, whose RoPE
    may have its own base (cfg.rope_local_theta); the caller's mask holds its window.
    """

    cfg: ModelConfig
    is_cross: bool = False
    decode: bool = False
    deterministic: bool = True
    causal: bool = False  # self-attention whose mask hides later keys: blocks above the diagonal are skipped

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
        is_local: Optional[jax.Array] = None,
        segment_ids_BT: Optional[jax.Array] = None,
    ):
        cfg = self.cfg
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        init = kernel_init(cfg)
        zeros = nn.initializers.zeros
        wq = param(self, "query", init, (D, N, H), ("embed", "heads", "head_dim"), cfg, anchor=x_BTD)
        wo = param(self, "out", init, (N, H, D), ("heads", "head_dim", "embed"), cfg, anchor=x_BTD)
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        if qkv_bias:
            bq = param(self, "query_bias", zeros, (N, H), ("heads", "head_dim"), cfg)
        source_BSD = x_BTD if not self.is_cross else kv_BSD
        k_BSKH = v_BSKH = None
        if source_BSD is not None:
            wk = param(self, "key", init, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg, anchor=source_BSD)
            wv = param(self, "value", init, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg, anchor=source_BSD)
            if qkv_bias:
                bk = param(self, "key_bias", zeros, (K, H), ("kv_heads", "head_dim"), cfg)
                bv = param(self, "value_bias", zeros, (K, H), ("kv_heads", "head_dim"), cfg)

        if self.decode and not self.is_cross:
            # One [D, (N+2K)H] product instead of three: a decoding step is matrix-vector
            # products, each a pass over its weight plus a fixed cost. XLA hoists the
            # concatenation out of the token loop (docs/performance-notes.md, "Decoding").
            w_DE = jnp.concatenate([wq.reshape(D, N * H), wk.reshape(D, K * H), wv.reshape(D, K * H)], axis=1)
            qkv_BTE = jnp.einsum("BTD,DE->BTE", x_BTD, w_DE)
            B, T = x_BTD.shape[:2]
            q_BTNH, k_BSKH, v_BSKH = (
                part.reshape(B, T, -1, H) for part in jnp.split(qkv_BTE, [N * H, (N + K) * H], axis=-1)
            )
        else:
            q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, wq)
            if source_BSD is not None:
                k_BSKH = jnp.einsum("BSD,DKH->BSKH", source_BSD, wk)
                v_BSKH = jnp.einsum("BSD,DKH->BSKH", source_BSD, wv)
        # LoRA adapters add their low-rank products to the projections (layers/lora.py).
        adapt = functools.partial(lora.delta, self, cfg=cfg, deterministic=self.deterministic)
        if (d_BTNH := adapt("query", x_BTD, (N, H))) is not None:
            q_BTNH = q_BTNH + d_BTNH
        if source_BSD is not None:
            if (d_BSKH := adapt("key", source_BSD, (K, H))) is not None:
                k_BSKH = k_BSKH + d_BSKH
            if (d_BSKH := adapt("value", source_BSD, (K, H))) is not None:
                v_BSKH = v_BSKH + d_BSKH
        if qkv_bias:
            q_BTNH = q_BTNH + bq
            if k_BSKH is not None:
                k_BSKH, v_BSKH = k_BSKH + bk, v_BSKH + bv
        if cfg.qk_norm:
            q_BTNH = Norm(cfg, name="query_norm")(q_BTNH)
            if k_BSKH is not None:
                k_BSKH = Norm(cfg, name="key_norm")(k_BSKH)
        if cfg.position == "rope" and not self.is_cross:
            inv_freq_J = rope_frequencies(cfg, is_local)
            q_BTNH = ops.rope(q_BTNH, q_positions_BT, inv_freq_J=inv_freq_J)
            k_BSKH = ops.rope(k_BSKH, q_positions_BT, inv_freq_J=inv_freq_J)

        scale = cfg.attention_scale
        if self.decode:
            k_RSH, v_RSH = self._update_cache(k_BSKH, v_BSKH, cache_index)
            out_BTNH, weights_BNTS = ops.cached_dot_product_attention(
                q_BTNH, constrain(k_RSH, CACHE_AXES), constrain(v_RSH, CACHE_AXES), bias, mask,
                scale=scale, return_weights=return_weights, softcap=cfg.attention_softcap,
            )
        elif cfg.attention_impl == "splash" and not self.is_cross and not return_weights:
            out_BTNH, weights_BNTS = self._splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, is_local), None
        else:
            dropout_rng = None
            if not self.deterministic and cfg.attention_dropout_rate > 0:
                dropout_rng = self.make_rng("dropout")
            out_BTNH, weights_BNTS = ops.dot_product_attention(
                q_BTNH, constrain(k_BSKH, KV_AXES), constrain(v_BSKH, KV_AXES), bias, mask,
                scale=scale,
                implementation=cfg.attention_impl,
                return_weights=return_weights,
                dropout_rate=cfg.attention_dropout_rate,
                dropout_rng=dropout_rng,
                causal=self.causal,
                softcap=cfg.attention_softcap,
            )
        # 'BTNH,NHD->BTD' as a dot_general that contracts (N, H) in that order: jnp.einsum
        # lists them as (H, N), and XLA:CPU then transposes the weight (and the activation)
        # into that order on every call, once per token when decoding.
        out_BTD = jax.lax.dot_general(out_BTNH, wo, (((2, 3), (0, 1)), ((), ())))
        if (d_BTD := adapt("out", out_BTNH, (D,))) is not None:
            out_BTD = out_BTD + d_BTD
        if cfg.use_bias:
            out_BTD = out_BTD + param(self, "out_bias", zeros, (D,), ("embed",), cfg)
        return out_BTD, weights_BNTS

    def _splash(self, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, is_local):
        """ops.splash_attention with the layer's mask: the Stack's segment ids (or token
        validity), the causal triangle, and the window on a local layer. The kernel is
        handed the mesh axes the logical rules give the batch and the heads (the heads only
        where query and key/value heads share them) as data; the layer reads no mesh."""
        cfg = self.cfg
        batch_axes, head_axes, kv_axes = nn.logical_to_mesh_axes(("batch", "heads", "kv_heads"))
        if head_axes != kv_axes:
            head_axes = None
        attend = functools.partial(ops.splash_attention, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, causal=self.causal,
                                   scale=cfg.attention_scale, softcap=cfg.attention_softcap,
                                   batch_axes=batch_axes, head_axes=head_axes)
        if cfg.sliding_window is None or is_local is None:
            return attend()
        if isinstance(is_local, (bool, np.bool_)):  # unrolled layers know their type
            return attend(window=cfg.sliding_window if is_local else None)
        return jax.lax.cond(is_local, lambda: attend(window=cfg.sliding_window), attend)

    def _update_cache(self, k_BSKH, v_BSKH, cache_index):
        """Write new K/V into the cache (or read cross K/V back); return what to attend to.

        The cache holds `ops.cache_rows` [B*K, S, H] keys and values.
        """
        filled = self.has_variable("cache", "key")
        if k_BSKH is None and not filled:
            raise ValueError("cross-attention cache is empty: pass the encoder output on the first call")
        k_RSH = v_RSH = None
        if k_BSKH is not None:
            k_RSH, v_RSH = ops.cache_rows(k_BSKH), ops.cache_rows(v_BSKH)
        zeros = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
        shape, dt = (k_RSH.shape, k_RSH.dtype) if k_RSH is not None else (None, None)
        cached_k = self.variable("cache", "key", zeros, shape, dt)
        cached_v = self.variable("cache", "value", zeros, shape, dt)
        if self.is_cross:
            if k_RSH is not None:  # prefill: store the encoder's K/V once
                cached_k.value, cached_v.value = k_RSH, v_RSH
            return cached_k.value, cached_v.value
        if not filled:  # init call: the cache was just created with max_len slots
            return k_RSH, v_RSH
        if cache_index.ndim == 1:  # a write index per batch row: the call's rows are the cache's first R
            R, T = k_RSH.shape[:2]
            slots_RT = jnp.repeat(cache_index, R // cache_index.shape[0])[:, None] + jnp.arange(T)
            rows_R1 = jnp.arange(R)[:, None]
            cached_k.value = cached_k.value.at[rows_R1, slots_RT].set(k_RSH.astype(cached_k.value.dtype))
            cached_v.value = cached_v.value.at[rows_R1, slots_RT].set(v_RSH.astype(cached_v.value.dtype))
            return cached_k.value[:R], cached_v.value[:R]
        start = (0, cache_index, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_RSH.astype(cached_k.value.dtype), start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_RSH.astype(cached_v.value.dtype), start)
        return cached_k.value, cached_v.value
