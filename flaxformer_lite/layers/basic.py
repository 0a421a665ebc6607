"""Norms, embeddings, dense projections and the feed-forward block."""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.layers import lora
from flaxformer_lite.layers.common import constrain, dtype, kernel_init, param, param_dtype


class Norm(nn.Module):
    """LayerNorm (scale + bias) or RMSNorm (scale), as the config says, over the last axis.

    With cfg.norm_offset the scale is stored as an offset from 1 and starts at 0 (Gemma).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        D = x_BTD.shape[-1]
        offset = 1.0 if cfg.norm_offset else 0.0
        init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
        scale = param(self, "scale", init, (D,), ("norm",), cfg)
        if cfg.norm == "rmsnorm":
            return ops.rms_norm(x_BTD, scale, cfg.norm_eps, offset)
        bias = param(self, "bias", nn.initializers.zeros, (D,), ("norm",), cfg)
        return ops.layer_norm(x_BTD, scale, bias, cfg.norm_eps, offset)


class Dense(nn.Module):
    """x @ W (+ b) with named logical axes; `axes` = (in, out)."""

    cfg: ModelConfig
    features: int
    axes: tuple[str, str]
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        w = param(self, "kernel", kernel_init(self.cfg), (x.shape[-1], self.features), self.axes, self.cfg, anchor=x)
        y = jnp.einsum("...D,DF->...F", x.astype(w.dtype), w)
        if self.use_bias:
            y = y + param(self, "bias", nn.initializers.zeros, (self.features,), self.axes[1:], self.cfg)
        return y


class Embed(nn.Module):
    """Token embedding table [V,D]; `attend` gives tied output logits."""

    cfg: ModelConfig
    num_embeddings: int
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self):
        cfg = self.cfg
        std = cfg.initializer_range if cfg.embedding_init_std is None else cfg.embedding_init_std
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(std), self.axes),
            (self.num_embeddings, self.cfg.d_model),
            param_dtype(self.cfg),
        )

    def __call__(self, ids_BT):
        return jnp.take(jnp.asarray(self.embedding, dtype(self.cfg)), ids_BT, axis=0)

    def attend(self, x_BTD):
        """Logits against the table: 'BTD,VD->BTV'."""
        table_VD = jnp.asarray(self.embedding, dtype(self.cfg))
        return jnp.einsum("BTD,VD->BTV", x_BTD, table_VD)


class FeedForward(nn.Module):
    """Position-wise FFN: plain (relu/gelu/...) or gated (swiglu/geglu)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, deterministic: bool = True):
        cfg = self.cfg
        D, F = cfg.d_model, cfg.d_ff
        init = kernel_init(cfg)
        wi = param(self, "wi", init, (D, F), ("embed", "mlp"), cfg, anchor=x_BTD)
        wo = param(self, "wo", init, (F, D), ("mlp", "embed"), cfg, anchor=x_BTD)
        wg = param(self, "wg", init, (D, F), ("embed", "mlp"), cfg, anchor=x_BTD) if ops.is_gated(cfg.activation) else None
        bi = param(self, "bi", nn.initializers.zeros, (F,), ("mlp",), cfg) if cfg.use_bias else None
        bo = param(self, "bo", nn.initializers.zeros, (D,), ("embed",), cfg) if cfg.use_bias else None
        # Dropout inside the FFN (T5 places it after the activation) is folded into the
        # residual dropout here; the hidden activation is large and worth a constraint.
        adapters = {
            name: functools.partial(lora.delta, self, name, out_shape=(size,), cfg=cfg, deterministic=deterministic)
            for name, size in (("wi", F), ("wg", F), ("wo", D)) if lora.adapted(self, cfg, name)
        }
        out_BTD = ops.feed_forward(
            constrain(x_BTD, ("batch", "length", "embed")), wi, wo,
            activation=cfg.activation, w_gate_DF=wg, b_in_F=bi, b_out_D=bo, adapters=adapters,
        )
        return out_BTD


class PositionEmbedding(nn.Module):
    """Absolute positions added to token embeddings: a learned table or sinusoids."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, positions_BT) -> Optional[jax.Array]:
        cfg = self.cfg
        if cfg.position == "learned":
            table = param(self, "embedding", nn.initializers.normal(cfg.initializer_range),
                          (cfg.max_len, cfg.d_model), ("positions", "embed"), cfg)
            return jnp.take(table, positions_BT, axis=0)
        if cfg.position == "sinusoidal":
            return ops.sinusoidal(positions_BT, cfg.d_model).astype(dtype(cfg))
        return None
