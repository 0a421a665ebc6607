"""LayerNorm and RMSNorm over the last axis, computed in float32."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def layer_norm(x: Array, scale: Array, bias: Optional[Array], eps: float = 1e-5, offset: float = 0.0) -> Array:
    """(x - mean) / sqrt(var + eps) * (offset + scale) + bias over the last axis (Ba et al. 2016)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * (offset + scale.astype(jnp.float32))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: Array, scale: Array, eps: float = 1e-6, offset: float = 0.0) -> Array:
    """x / sqrt(mean(x^2) + eps) * (offset + scale) over the last axis (Zhang & Sennrich 2019).

    offset 1 is Gemma's norm, whose stored scale starts at 0.
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * (offset + scale.astype(jnp.float32))).astype(x.dtype)
