"""A stack of blocks: embeddings-side positions, masks, position biases, layers, final norm."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.layers import DecoderBlock, EncoderBlock, Norm, PositionEmbedding
from flaxformer_lite.layers.common import constrain, param
from flaxformer_lite.models.remat import remat_unrolled

ACT_AXES = ("batch", "length", "embed")


def _block_class(cfg: ModelConfig, has_cross: bool):
    block = DecoderBlock if has_cross else EncoderBlock
    if cfg.remat_policy == "none":
        return block
    if cfg.remat_policy == "full" and not cfg.scan_layers:
        return remat_unrolled(block)  # nn.remat saves nothing unrolled on XLA:CPU (models/remat.py)
    policy = None if cfg.remat_policy == "full" else getattr(jax.checkpoint_policies, cfg.remat_policy)
    # Under scan, CSE across iterations is already impossible; prevent_cse only costs there.
    return nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)


class Stack(nn.Module):
    """Encoder stack (bidirectional) or decoder stack (causal, optionally cross-attending).

    Takes token embeddings; adds absolute positions (learned/sinusoidal), builds the
    mask and the position bias (relative/ALiBi) once for all layers, runs the layers
    (unrolled, or nn.scan with parameters stacked on a `layers` axis) and the final norm.

    In decode mode the stack keeps, in the 'cache' collection, the next slot `index`
    and each slot's validity and position, so the mask and position bias cover the
    whole cache: slot s is visible to a query at slot q iff s <= q and s held a real
    token. Prompts may therefore be left-padded, each row with its own positions.
    """

    cfg: ModelConfig
    num_layers: int
    causal: bool
    has_cross: bool = False

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        valid_BT: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: Optional[jax.Array] = None,
        encoder_BSD: Optional[jax.Array] = None,
        encoder_valid_BS: Optional[jax.Array] = None,
        encoder_segment_ids_BS: Optional[jax.Array] = None,
        deterministic: bool = True,
        decode: bool = False,
        return_weights: bool = False,
    ):
        cfg = self.cfg
        B, T, D = x_BTD.shape
        if cfg.position == "learned" and T > cfg.max_len:
            # jnp.take would silently clamp positions past the table.
            raise ValueError(f"sequence length {T} exceeds model.max_len={cfg.max_len}")

        q_slots_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        k_slots_BS, k_valid_BS, k_positions_BS, cache_index = q_slots_BT, valid_BT, positions_BT, None
        if decode:
            k_slots_BS, k_valid_BS, k_positions_BS, cache_index, q_slots_BT = self._cache_slots(
                valid_BT, positions_BT
            )

        if segment_ids_BT is not None and not decode:
            mask = ops.segment_mask(segment_ids_BT, segment_ids_BT)
        else:
            mask = k_valid_BS[:, None, None, :].astype(bool)
        if self.causal:
            mask = mask & ops.causal_mask(q_slots_BT, k_slots_BS)
        types = cfg.layer_attention_types(self.num_layers)
        local_mask = None
        if "local" in types:
            local_mask = mask & ops.sliding_window_mask(q_slots_BT, k_slots_BS, cfg.sliding_window)
            if "global" not in types:  # every layer local (Mistral): one mask
                mask, local_mask = local_mask, None
        is_local_L = np.array([t == "local" for t in types])

        bias = None
        if cfg.position == "relative":
            table_RN = param(self, "relpos_bias", nn.initializers.normal(cfg.initializer_range),
                             (cfg.relative_buckets, cfg.num_heads), ("relpos_buckets", "heads"), cfg)
            bias = ops.relative_position_bias(
                table_RN, positions_BT, k_positions_BS,
                bidirectional=not self.causal, max_distance=cfg.relative_max_distance,
            )
        elif cfg.position == "alibi":
            bias = ops.alibi_bias(ops.alibi_slopes(cfg.num_heads), positions_BT, k_positions_BS)

        cross_mask = None
        if self.has_cross:
            if segment_ids_BT is not None and encoder_segment_ids_BS is not None and not decode:
                cross_mask = ops.segment_mask(segment_ids_BT, encoder_segment_ids_BS)
            elif encoder_valid_BS is not None:
                cross_mask = encoder_valid_BS[:, None, None, :].astype(bool)

        if cfg.scale_embeddings:
            x_BTD = x_BTD * jnp.asarray(D**0.5, x_BTD.dtype)
        pos_BTD = PositionEmbedding(cfg, name="position_embedding")(positions_BT)
        if pos_BTD is not None:
            x_BTD = x_BTD + pos_BTD
        if cfg.embedding_norm:
            x_BTD = Norm(cfg, name="embedding_norm")(x_BTD)
        x_BTD = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x_BTD)
        x_BTD = constrain(x_BTD, ACT_AXES)

        block = _block_class(cfg, self.has_cross)
        # Decoding attends over cache slots (S != T): the causal block skip is for training.
        flags = dict(deterministic=deterministic, decode=decode, return_weights=return_weights,
                     causal=self.causal and not decode)
        # The splash kernel takes segment ids, not a mask: the packed rows' ids, or each
        # token's validity as its id (padding then sees only padding, and gives zeros).
        splash_ids_BT = None
        if cfg.attention_impl == "splash" and not decode:
            splash_ids_BT = segment_ids_BT if segment_ids_BT is not None else valid_BT.astype(jnp.int32)
        args = (mask, local_mask, bias, positions_BT, encoder_BSD, cross_mask, cache_index, splash_ids_BT)
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * len(args) + (0,),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BTD, weights = scanned(cfg, **flags, name="layers")(x_BTD, *args, jnp.asarray(is_local_L))
        else:
            per_layer = []
            for i in range(self.num_layers):
                x_BTD, w = block(cfg, **flags, name=f"layers_{i}")(x_BTD, *args, is_local_L[i])
                per_layer.append(w)
            weights = jax.tree.map(lambda *ws: jnp.stack(ws), *per_layer) if return_weights else None

        if cfg.final_norm:
            x_BTD = Norm(cfg, name="final_norm")(x_BTD)
        x_BTD = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x_BTD)
        return x_BTD, weights

    def _cache_slots(self, valid_BT, positions_BT):
        """Record this call's tokens in the cache; return key slots, validity, positions."""
        B, T = valid_BT.shape
        initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        key_valid = self.variable(
            "cache", "key_valid", nn.with_logical_partitioning(jnp.zeros, ("batch", "kv_length")), (B, T), bool
        )
        key_positions = self.variable(
            "cache", "key_positions", nn.with_logical_partitioning(jnp.zeros, ("batch", "kv_length")),
            (B, T), jnp.int32,
        )
        if not initialized:  # the init call sizes the cache: T is the number of slots
            slots_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
            return slots_BT, valid_BT, positions_BT, None, slots_BT
        i = index.value
        S = key_valid.value.shape[1]
        k_slots_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
        if i.ndim == 1:  # a write index per row: the call's B rows are the cache's first B
            q_slots_BT = i[:B, None] + jnp.arange(T)
            rows_B1 = jnp.arange(B)[:, None]
            key_valid.value = key_valid.value.at[rows_B1, q_slots_BT].set(valid_BT.astype(bool))
            key_positions.value = key_positions.value.at[rows_B1, q_slots_BT].set(positions_BT.astype(jnp.int32))
            index.value = i.at[:B].add(T)
            return k_slots_BS, key_valid.value[:B], key_positions.value[:B], i[:B], q_slots_BT
        key_valid.value = jax.lax.dynamic_update_slice(key_valid.value, valid_BT.astype(bool), (0, i))
        key_positions.value = jax.lax.dynamic_update_slice(
            key_positions.value, positions_BT.astype(jnp.int32), (0, i)
        )
        index.value = i + T
        q_slots_BT = jnp.broadcast_to(i + jnp.arange(T), (B, T))
        return k_slots_BS, key_valid.value, key_positions.value, i, q_slots_BT
