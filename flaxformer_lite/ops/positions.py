"""Position schemes as pure functions: sinusoidal, T5 relative buckets, RoPE, ALiBi.

Every scheme takes explicit integer positions ([B,T]), so packed rows (positions restart
per segment) and cached decoding (positions offset by the prompt) need nothing special.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sinusoidal(positions_BT: Array, d_model: int, max_timescale: float = 10000.0) -> Array:
    """[B,T,D] sinusoidal encodings (Vaswani et al. 2017, section 3.5).

    PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...): sines and cosines
    interleaved, as in the paper.
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
    inv_freq = 1.0 / (max_timescale ** (np.arange(0, d_model, 2, dtype=np.float32) / d_model))
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    return jnp.stack([jnp.sin(angles_BTF), jnp.cos(angles_BTF)], axis=-1).reshape(
        *positions_BT.shape, d_model
    )


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5's bucketing of (key - query) offsets: exact for small, log-spaced for large.

    Half the buckets (all of them if not bidirectional) hold exact offsets up to
    num_buckets/2 (or /4 per side); the rest are log-spaced out to max_distance, beyond
    which everything shares the last bucket (Raffel et al. 2020).
    """
    n = -relative_position
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = jnp.where(n < 0, num_buckets, 0)
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log-spaced; the max(n,1) keeps log finite where is_small selects the other branch.
    large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


def relative_position_bias(
    table_RN: Array,
    q_positions_BT: Array,
    k_positions_BS: Array,
    *,
    bidirectional: bool,
    max_distance: int,
) -> Array:
    """[B,N,T,S] additive bias: table row for the bucket of (k_pos - q_pos), per head."""
    rel_BTS = k_positions_BS[:, None, :] - q_positions_BT[:, :, None]
    bucket_BTS = relative_position_bucket(
        rel_BTS, bidirectional=bidirectional, num_buckets=table_RN.shape[0], max_distance=max_distance
    )
    return jnp.transpose(table_RN[bucket_BTS], (0, 3, 1, 2))


def rope_frequencies(
    head_dim: int,
    theta: float = 10000.0,
    *,
    kind: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_len: int = 8192,
) -> np.ndarray:
    """[H/2] float32 inverse frequencies of RoPE: pair j turns by theta^(-2j/H) per position.

    kind 'linear' divides them all by `factor` (position interpolation, Chen et al. 2023).
    kind 'llama3' (Llama 3.1) divides by `factor` those whose wavelength 2 pi / f exceeds
    original_max_len / low_freq_factor, keeps those under original_max_len /
    high_freq_factor, and blends linearly in 1 / wavelength between the two.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if kind == "default":
        return inv_freq.astype(np.float32)
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"unknown RoPE scaling kind {kind!r}: default, linear or llama3")
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = np.where(wavelength > original_max_len / low_freq_factor, inv_freq / factor, inv_freq)
    medium = (wavelength >= original_max_len / high_freq_factor) & (wavelength <= original_max_len / low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    return np.where(medium, blended, scaled).astype(np.float32)


def rope(x_BTNH: Array, positions_BT: Array, theta: float = 10000.0, *, inv_freq_J: Optional[Array] = None) -> Array:
    """Rotary embedding (Su et al. 2021) in the half-split layout used by LLaMA/NeoX.

    Dimension i pairs with i + H/2; pair j rotates by positions * inv_freq_J[j], by default
    rope_frequencies(H, theta) = theta^(-2j/H). Computed in float32, returned in x's dtype.
    """
    H = x_BTNH.shape[-1]
    if H % 2:
        raise ValueError(f"RoPE needs an even head dim, got {H}")
    if inv_freq_J is None:
        inv_freq_J = rope_frequencies(H, theta)
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_J
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """[N] head slopes of ALiBi (Press et al. 2022): a geometric sequence from 2^(-8/N).

    For N not a power of two, the paper's recipe: the slopes of the next lower power of
    two, then every other slope of the next higher one.
    """

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads), np.float32)
    lower = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * lower)[0::2][: num_heads - lower]
    return np.asarray(power_of_two(lower) + extra, np.float32)


def alibi_bias(slopes_N: Array, q_positions_BT: Array, k_positions_BS: Array) -> Array:
    """[B,N,T,S] bias -slope * |q_pos - k_pos|: a linear penalty on distance.

    Under a causal mask only the past is visible, where this is the paper's
    -slope * (q_pos - k_pos).
    """
    dist_BTS = (q_positions_BT[:, :, None] - k_positions_BS[:, None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes_N, jnp.float32)[None, :, None, None] * jnp.abs(dist_BTS)[:, None]
