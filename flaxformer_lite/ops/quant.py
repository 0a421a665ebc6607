"""Weight-only quantization of frozen kernels: int8 per output channel and NF4 per block.

NF4 is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, section 3 and appendix E): each
block of 64 consecutive weights (in row-major order) is divided by its largest |w|
(`absmax`, kept in float32) and every weight becomes the index of the nearest of 16
values, the quantiles of a standard normal scaled to [-1, 1] with an exact zero. The
values are the published ones (bitsandbytes csrc/kernels.cu, `nf4_dequantization_lut`).
Two 4-bit codes share a byte, the first in the high nibble, as bitsandbytes packs them.
Double quantization of the absmax (QLoRA's second step) is not done: it saves 0.37 bits
a weight beside the 4.5 that codes and float32 absmax take.

Shapes: a kernel `w` is [lead..., *kernel_shape], with `lead` leading axes (a scanned
stack's layers axis) quantized separately. NF4 codes are [lead..., G, 32] uint8 and the
absmax [lead..., G], G = ceil(prod(kernel_shape) / 64) blocks (the last one zero-padded).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NF4_BLOCK = 64
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# A weight goes to code i when it lies between the midpoints on either side of value i.
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


def nf4_quantize(w: jax.Array, lead: int = 0) -> tuple[jax.Array, jax.Array]:
    """(codes [lead..., G, 32] uint8, absmax [lead..., G] float32) of w's trailing axes."""
    lead_shape = w.shape[:lead]
    n = math.prod(w.shape[lead:])
    blocks = -(-n // NF4_BLOCK)
    flat = jnp.reshape(jnp.asarray(w, jnp.float32), lead_shape + (n,))
    flat = jnp.pad(flat, [(0, 0)] * lead + [(0, blocks * NF4_BLOCK - n)])
    x_GK = flat.reshape(lead_shape + (blocks, NF4_BLOCK))
    absmax_G = jnp.max(jnp.abs(x_GK), axis=-1)
    normed_GK = x_GK / jnp.where(absmax_G > 0, absmax_G, 1.0)[..., None]
    index_GK = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normed_GK.reshape(-1)).reshape(normed_GK.shape)
    pairs = index_GK.astype(jnp.uint8).reshape(lead_shape + (blocks, NF4_BLOCK // 2, 2))
    codes = (pairs[..., 0] << 4) | pairs[..., 1]
    return codes, absmax_G


def nf4_dequantize(codes: jax.Array, absmax: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The kernel [lead..., *shape] in `dtype` from nf4_quantize's codes and absmax."""
    lead_shape = codes.shape[:-2]
    index = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(codes.shape[:-1] + (NF4_BLOCK,))
    values = jnp.take(jnp.asarray(NF4_CODEBOOK, dtype), index.astype(jnp.int32), axis=0)
    flat = (values * jnp.asarray(absmax, dtype)[..., None]).reshape(lead_shape + (-1,))
    return flat[..., : math.prod(shape)].reshape(lead_shape + tuple(shape))


def int8_quantize(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(int8 w, float32 scale over the remaining axes): scale = max |w| over in_axes / 127."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=in_axes) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, in_axes)), -127, 127).astype(jnp.int8)
    return q, scale


def int8_dequantize(q: jax.Array, scale: jax.Array, in_axes: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """int8_quantize's inverse, in `dtype`."""
    return jnp.asarray(q, dtype) * jnp.expand_dims(jnp.asarray(scale, dtype), in_axes)


def tied(value: jax.Array, anchor: jax.Array) -> jax.Array:
    """value plus zero times one entry of anchor (no gradient flows to anchor).

    A dequantized copy of a stored kernel depends only on the kernel, so XLA may compute
    it ahead of the layer loop for the whole stack and keep it alive. The tie is a real
    data dependency on the layer's input, which no pass folds (0 * x is NaN for x = inf),
    so the copy is made inside the layer, one layer at a time.
    """
    entry = jax.lax.stop_gradient(anchor).reshape(-1)[0]
    return value + (jnp.zeros((), entry.dtype) * entry).astype(value.dtype)

