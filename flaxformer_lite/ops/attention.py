"""Scaled dot-product attention and the boolean masks that feed it.

Axis letters: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim, R = B*K rows of a KV cache (`cache_rows`). Masks are boolean, True = may
attend, shaped [B, 1, T, S] (broadcast over heads). Biases are additive, shaped
[B or 1, N, T, S].
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def causal_mask(q_positions_BT: Array, k_positions_BS: Array) -> Array:
    """[B,1,T,S]: a query sees keys at its own position or earlier."""
    return (k_positions_BS[:, None, None, :] <= q_positions_BT[:, None, :, None])


def padding_mask(q_valid_BT: Array, k_valid_BS: Array) -> Array:
    """[B,1,T,S]: both the query and the key are real tokens (not padding)."""
    return q_valid_BT[:, None, :, None].astype(bool) & k_valid_BS[:, None, None, :].astype(bool)


def segment_mask(q_segment_ids_BT: Array, k_segment_ids_BS: Array) -> Array:
    """[B,1,T,S]: packed rows; attend only within the same non-zero segment (0 = padding)."""
    same = q_segment_ids_BT[:, None, :, None] == k_segment_ids_BS[:, None, None, :]
    return same & (q_segment_ids_BT[:, None, :, None] != 0) & (k_segment_ids_BS[:, None, None, :] != 0)


def sliding_window_mask(q_positions_BT: Array, k_positions_BS: Array, window: int) -> Array:
    """[B,1,T,S]: keys no more than `window - 1` positions away (either side)."""
    dist = q_positions_BT[:, None, :, None] - k_positions_BS[:, None, None, :]
    return jnp.abs(dist) < window


def soft_cap(x: Array, cap: Optional[float]) -> Array:
    """cap * tanh(x / cap), computed in float32: bounds logits to (-cap, cap) (Gemma 2); None: x."""
    if cap is None:
        return x
    return (cap * jnp.tanh(x.astype(jnp.float32) / cap)).astype(x.dtype)


def lengths_to_valid(lengths_B: Array, length: int) -> Array:
    """[B,length] bool from per-row lengths: the first lengths[b] tokens are real."""
    return jnp.arange(length)[None, :] < lengths_B[:, None]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
    """Logical AND of the masks that are not None (None if all are None)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out


def _check_shapes(q_BTNH, k_BSKH, v_BSKH):
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKH.ndim != 4:
        raise ValueError(
            f"q, k, v must be [B,T,N,H], [B,S,K,H], [B,S,K,H]; got {q_BTNH.shape}, "
            f"{k_BSKH.shape}, {v_BSKH.shape}"
        )
    B, _, N, H = q_BTNH.shape
    _, S, K, _ = k_BSKH.shape
    if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
        raise ValueError(f"k {k_BSKH.shape} / v {v_BSKH.shape} do not match q {q_BTNH.shape}")
    if N % K:
        raise ValueError(f"{K} key/value heads do not divide {N} query heads")


def dot_product_attention(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    *,
    scale: Optional[float] = None,
    implementation: Literal["xla", "auto", "cudnn"] = "xla",
    return_weights: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[Array] = None,
    causal: bool = False,
    softcap: Optional[float] = None,
) -> tuple[Array, Optional[Array]]:
    """softmax(soft_cap(q k^T * scale) + bias, masked) v, with grouped K/V heads.

    Args:
      q_BTNH, k_BSKH, v_BSKH: queries, keys, values; K must divide N (MHA, GQA, MQA).
      bias: additive, broadcastable to [B,N,T,S] (relative position, ALiBi).
      mask: boolean, broadcastable to [B,1,T,S] or [B,N,T,S]; True = attend.
      scale: multiplies the logits; default 1/sqrt(H).
      implementation: 'xla' is the explicit einsum reference; 'auto' calls
        jax.nn.dot_product_attention with no implementation, which is JAX's own XLA
        path on every backend (JAX 0.10); 'cudnn' asks it for cuDNN flash attention
        (NVIDIA GPU, bfloat16 or float16, head dim a multiple of 8 up to 128, 256 on
        Hopper), with `causal` as cuDNN's causal mask type. 'auto' and 'cudnn' fall
        back to 'xla' when weights, dropout or a soft cap are requested.
      return_weights: also return the [B,N,T,S] attention probabilities.
      causal: also hide every key after the query's own index (self-attention, T == S,
        on top of `mask`). The 'xla' path then runs the queries in up to 8 blocks of at
        least 64 rows, each against the keys up to its last row only: the products and
        softmax skip the hidden upper triangle's whole blocks. Same values.
      softcap: bound the scaled logits with soft_cap before bias and mask (Gemma 2).

    Returns:
      (out_BTNH, weights_BNTS or None). Logits and softmax are computed in float32;
      the output has q's dtype. Query rows with no visible key give zeros, not NaN.
    """
    _check_shapes(q_BTNH, k_BSKH, v_BSKH)
    B, T, _, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    scale = H**-0.5 if scale is None else scale
    dropping = dropout_rate > 0.0 and dropout_rng is not None
    if causal and T != S:
        raise ValueError(f"causal=True needs as many keys as queries (self-attention); got T={T}, S={S}")
    # A row is alive (per mask head) if any key is visible; dead rows are zeroed below
    # (no NaN, no uniform). M is the mask's head axis: 1 or N.
    alive_BMT1 = None
    given_mask = mask
    if causal:
        tril_11TS = jnp.tril(jnp.ones((T, S), bool))[None, None]
        mask = tril_11TS if mask is None else mask & tril_11TS
    if mask is not None:
        mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, S))
    if given_mask is not None:  # causal alone leaves every row its own key
        alive_BMT1 = jnp.any(mask, axis=3, keepdims=True)

    if implementation not in ("xla", "auto", "cudnn"):
        raise ValueError(f"implementation={implementation!r}: use 'xla', 'auto' or 'cudnn'")
    if implementation != "xla" and not return_weights and not dropping and softcap is None:
        library_mask, flags = mask, {}
        if implementation == "cudnn":
            _check_cudnn(q_BTNH)
            # cuDNN's causal mask type is the triangle; `mask` (made a bias by JAX) adds the rest.
            library_mask = None if given_mask is None else jnp.broadcast_to(given_mask, (B, given_mask.shape[1], T, S))
            flags = dict(implementation="cudnn", is_causal=causal)
        out_BTNH = jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH,
            bias=None if bias is None else bias.astype(q_BTNH.dtype),
            mask=library_mask, scale=scale, **flags,
        )
        if alive_BMT1 is not None:
            out_BTNH = out_BTNH * jnp.transpose(alive_BMT1, (0, 2, 1, 3)).astype(out_BTNH.dtype)
        return out_BTNH, None

    rate = dropout_rate if dropping else 0.0
    if not causal or return_weights:
        out_BTNH, weights_BKGTS = _attend(q_BTNH, k_BSKH, v_BSKH, bias, mask, scale, rate, dropout_rng, softcap)
        return _zero_dead_rows(out_BTNH, weights_BKGTS, alive_BMT1, return_weights)
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    outs, start = [], 0
    for i, end in enumerate(_causal_block_ends(T)):
        # Keys after `end` are hidden from every query of this block: leave them out.
        rows = slice(start, end)
        block_bias = None if bias is None else bias[..., rows if bias.shape[-2] > 1 else slice(None), :end]
        block_rng = jax.random.fold_in(dropout_rng, i) if dropping else None
        out_BCNH, _ = _attend(
            q_BTNH[:, rows], k_BSKH[:, :end], v_BSKH[:, :end], block_bias, mask[:, :, rows, :end],
            scale, rate, block_rng, softcap,
        )
        outs.append(out_BCNH)
        start = end
    out_BTNH = jnp.concatenate(outs, axis=1)
    return _zero_dead_rows(out_BTNH, None, alive_BMT1, False)


def _check_cudnn(q_BTNH: Array) -> None:
    """Clear errors for what cuDNN flash attention cannot take, before JAX's own."""
    backend = jax.default_backend()
    if backend != "gpu":
        raise ValueError(
            f"attention implementation 'cudnn' needs an NVIDIA GPU, and JAX's default backend is "
            f"{backend!r}: set model.attention_impl to 'auto' or 'xla'"
        )
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention implementation 'cudnn' takes bfloat16 or float16, got {q_BTNH.dtype}: set "
            "model.dtype to bfloat16, or model.attention_impl to 'auto' or 'xla'"
        )
    H = q_BTNH.shape[-1]
    if H % 8 or H > 256:
        raise ValueError(
            f"attention implementation 'cudnn' needs a head dim that is a multiple of 8 up to 128 "
            f"(256 on Hopper), got {H}: set model.attention_impl to 'auto' or 'xla'"
        )


def _causal_block_ends(length: int, min_rows: int = 64, max_blocks: int = 8) -> list[int]:
    """Query block boundaries for causal attention: up to `max_blocks` of >= `min_rows` rows.

    With n blocks the products and softmax cover (n + 1) / 2n of the full T x T square
    (5/8 at n = 4, 9/16 at n = 8). Blocks under 64 rows make slow products: on a 2-core
    CPU, 4 blocks of 64 rows beat 8 of 32 at T=256, and 8 blocks beat 4 and 16 at T=512
    and 1024 and tie with 16 at 2048 (docs/performance-notes.md, "Causal attention in blocks").
    """
    blocks = max(1, min(max_blocks, length // min_rows))
    return [length * (i + 1) // blocks for i in range(blocks)]


def _attend(q_BTNH, k_BSKH, v_BSKH, bias, mask, scale, dropout_rate, dropout_rng, softcap):
    """(out_BTNH, weights_BKGTS): the einsum reference path, dead rows not yet zeroed."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    weights_BKGTS = _masked_softmax(soft_cap(logits_BKGTS, softcap), bias, mask)
    probs_BKGTS = weights_BKGTS
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BKGTS.shape)
        probs_BKGTS = jnp.where(keep, probs_BKGTS / (1.0 - dropout_rate), 0.0)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype), weights_BKGTS


def _masked_softmax(logits_BKGTS: Array, bias: Optional[Array], mask: Optional[Array]) -> Array:
    """Float32 softmax over S of logits + bias, masked keys at -inf (finite min)."""
    B, K, G, T, S = logits_BKGTS.shape
    if bias is not None:
        bias_BNTS = jnp.broadcast_to(bias.astype(jnp.float32), (bias.shape[0], K * G, T, S))
        logits_BKGTS = logits_BKGTS + bias_BNTS.reshape(bias_BNTS.shape[0], K, G, T, S)
    if mask is not None:
        mask_BMTS = jnp.broadcast_to(mask, (B, mask.shape[1], T, S))
        mask_BKGTS = mask_BMTS[:, :, None] if mask.shape[1] == 1 else mask_BMTS.reshape(B, K, G, T, S)
        logits_BKGTS = jnp.where(mask_BKGTS, logits_BKGTS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BKGTS, axis=-1)


def _zero_dead_rows(out_BTNH, weights_BKGTS, alive_BMT1, return_weights: bool):
    """(out_BTNH, weights_BNTS or None), with query rows that see no key set to zero."""
    B, T, N, _ = out_BTNH.shape
    weights_BNTS = weights_BKGTS.reshape(B, N, T, -1) if return_weights else None
    if alive_BMT1 is not None:
        # Dead rows are zeroed on the [B,T,N,H] output, not on the S times larger weights.
        alive_BMT = alive_BMT1[..., 0]
        alive_BTN1 = jnp.broadcast_to(alive_BMT, (B, N, T)).transpose(0, 2, 1)[..., None]
        out_BTNH = out_BTNH * alive_BTN1.astype(out_BTNH.dtype)
        if weights_BNTS is not None:
            weights_BNTS = weights_BNTS * alive_BMT[..., None].astype(jnp.float32)
    return out_BTNH, weights_BNTS


SPLASH_BLOCKS = (512, 256, 128)  # the kernel's tiles: the largest that divides the (padded) length


def splash_block(length: int) -> tuple[int, int]:
    """(block, padded length) splash attention runs `length` tokens with: the length is
    padded up to a multiple of 128 (the kernel's lane width), then the largest of
    SPLASH_BLOCKS dividing it is the tile of every pass, forward and backward."""
    padded = -(-length // 128) * 128
    return next(b for b in SPLASH_BLOCKS if padded % b == 0), padded


def splash_visible_blocks(length: int, *, causal: bool, window: Optional[int] = None) -> int:
    """How many (query block, key block) tiles of one head splash attention computes: the
    tiles its static mask (causal, window) does not hide whole. Segment ids hide nothing
    here: they are data, read inside the tiles."""
    block, padded = splash_block(length)
    starts = np.arange(0, padded, block)
    q_lo, k_lo = starts[:, None], starts[None, :]
    q_hi, k_hi = q_lo + block - 1, k_lo + block - 1
    visible = np.ones((len(starts), len(starts)), bool)
    if causal:
        visible &= k_lo <= q_hi
    if window is not None:
        visible &= (k_hi > q_lo - window) & ((k_lo < q_hi + window) if not causal else True)
    return int(visible.sum())


def _dividing(mesh, axes, *sizes: int):
    """`axes` (a PartitionSpec entry: a mesh axis name or a tuple of them) if the devices
    along them divide every one of `sizes`, else None (that dimension stays whole)."""
    if not axes:
        return None
    devices = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return axes if all(size % devices == 0 for size in sizes) else None


def splash_attention(
    q_BTNH: Array,
    k_BTKH: Array,
    v_BTKH: Array,
    segment_ids_BT: Optional[Array] = None,
    *,
    causal: bool = False,
    window: Optional[int] = None,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    batch_axes=None,
    head_axes=None,
) -> Array:
    """Self-attention by the Pallas TPU splash-attention kernel that ships with JAX; equals
    dot_product_attention with the same causal triangle, window and segment mask.

    Args:
      q_BTNH, k_BTKH, v_BTKH: queries, keys, values of one sequence (T keys); K divides N.
      segment_ids_BT: packed rows: a query sees keys of its own segment only, and rows of
        segment 0 (padding) give zeros, as `segment_mask` does. None: every key is visible.
      causal: hide keys after the query; window: hide keys `window` or more positions away.
      scale: multiplies the logits (default 1/sqrt(H)); the kernel itself does not scale,
        so the queries are scaled before it. softcap: as dot_product_attention's.
      batch_axes, head_axes: mesh axes the batch and the heads may be split over under the
        current mesh (jax.set_mesh), as a PartitionSpec entry names them; None: not split.
        Under a mesh the kernel runs per shard inside shard_map, which a Pallas call needs,
        split over each where its sizes divide the devices along it (B; N and K).

    On a TPU the kernel is compiled by Mosaic; on any other backend it runs in Pallas's
    interpret mode (slow, for tests). The length is padded to the kernel's tiles
    (splash_block) with a segment id no real token has, so padding is never seen.
    Returns out_BTNH in q's dtype.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _check_shapes(q_BTNH, k_BTKH, v_BTKH)
    B, T, N, H = q_BTNH.shape
    if k_BTKH.shape[1] != T:
        raise ValueError(f"splash attention is self-attention: {T} queries, {k_BTKH.shape[1]} keys")
    block, padded = splash_block(T)
    scale = H**-0.5 if scale is None else scale
    ids_BT = segment_ids_BT
    if ids_BT is None and padded != T:
        ids_BT = jnp.zeros((B, T), jnp.int32)
    if ids_BT is not None:
        ids_BT = jnp.pad(ids_BT.astype(jnp.int32), ((0, 0), (0, padded - T)), constant_values=-1)
    q_BTNH = (q_BTNH.astype(jnp.float32) * scale).astype(q_BTNH.dtype)
    q_BNTH, k_BKTH, v_BKTH = (
        jnp.pad(x, ((0, 0), (0, padded - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (q_BTNH, k_BTKH, v_BTKH)
    )
    if window is not None:
        static = splash.LocalMask((padded, padded), (window - 1, 0 if causal else window - 1), offset=0)
    elif causal:
        static = splash.CausalMask((padded, padded))
    else:
        static = splash.FullMask((padded, padded))

    def attend(q_BNTH, k_BKTH, v_BKTH, ids_BT):
        heads = q_BNTH.shape[1]
        sizes = splash.BlockSizes(*(block,) * 8)

        def kernel(interpret: bool):
            run = splash.make_splash_mha(splash.MultiHeadMask([static] * heads), block_sizes=sizes, head_shards=1,
                                         q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)
            if ids_BT is None:
                return jax.vmap(run)(q_BNTH, k_BKTH, v_BKTH)
            return jax.vmap(lambda q, k, v, ids: run(q, k, v, segment_ids=splash.SegmentIds(ids, ids)))(
                q_BNTH, k_BKTH, v_BKTH, ids_BT)

        # Which branch runs is the compile target's platform: Mosaic for a TPU (also
        # when compiling for one from a CPU host), the interpreter elsewhere.
        return jax.lax.platform_dependent(tpu=lambda: kernel(False), default=lambda: kernel(True))

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # a Pallas call runs per shard: the partitioner cannot split one
        batch_axes = _dividing(mesh, batch_axes, B)  # not the init's one row, for one
        head_axes = _dividing(mesh, head_axes, N, k_BTKH.shape[2])
        P = jax.sharding.PartitionSpec
        qs, kvs = P(batch_axes, head_axes), P(batch_axes, head_axes)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(qs, kvs, kvs, None if ids_BT is None else P(batch_axes)),
                               out_specs=qs, check_vma=False)
    out_BTNH = attend(q_BNTH, k_BKTH, v_BKTH, ids_BT).transpose(0, 2, 1, 3)[:, :T]
    if segment_ids_BT is not None:
        out_BTNH = out_BTNH * (segment_ids_BT != 0)[:, :, None, None].astype(out_BTNH.dtype)
    return out_BTNH.astype(q_BTNH.dtype)


def cache_rows(x_BSKH: Array) -> Array:
    """[B,S,K,H] keys or values as a KV cache stores them: [R,S,H], R = B*K, batch-major."""
    B, S, K, H = x_BSKH.shape
    return x_BSKH.transpose(0, 2, 1, 3).reshape(B * K, S, H)


def cached_dot_product_attention(
    q_BTNH: Array,
    k_RSH: Array,
    v_RSH: Array,
    bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    *,
    scale: Optional[float] = None,
    return_weights: bool = False,
    softcap: Optional[float] = None,
) -> tuple[Array, Optional[Array]]:
    """dot_product_attention over a KV cache in `cache_rows` layout; same result.

    A decoding step attends one new query (T=1) to the cache. Each of the R = B*K
    (batch, key/value head) rows is then one matrix-vector product that reads its row
    of the cache in place: no batch axis of size 1 sits between the cache update and
    the products, which on XLA:CPU otherwise costs a copy of the whole cache per layer
    per token (docs/performance-notes.md, "Decoding"). Args and returns as dot_product_attention
    (no dropout: a cache is for inference).
    """
    shapes = f"{q_BTNH.shape}, {k_RSH.shape}, {v_RSH.shape}"
    if q_BTNH.ndim != 4 or k_RSH.ndim != 3 or k_RSH.shape != v_RSH.shape:
        raise ValueError(f"q, k, v must be [B,T,N,H], [B*K,S,H], [B*K,S,H] (ops.cache_rows); got {shapes}")
    B, T, N, H = q_BTNH.shape
    R, S, _ = k_RSH.shape
    if R % B or N % (R // B) or k_RSH.shape[2] != H:
        raise ValueError(f"k, v rows (B*K) or head dim do not match q [B,T,N,H]: {shapes}")
    K = R // B
    G = N // K
    scale = H**-0.5 if scale is None else scale
    alive_BMT1 = None
    if mask is not None:
        mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, S))
        alive_BMT1 = jnp.any(mask, axis=3, keepdims=True)
    q_RQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(R, G * T, H)
    logits_RQS = jnp.einsum("RQH,RSH->RQS", q_RQH, k_RSH, preferred_element_type=jnp.float32)
    logits_BKGTS = logits_RQS.reshape(B, K, G, T, S) * jnp.float32(scale)
    weights_BKGTS = _masked_softmax(soft_cap(logits_BKGTS, softcap), bias, mask)
    probs_RQS = weights_BKGTS.reshape(R, G * T, S).astype(v_RSH.dtype)
    out_RQH = jnp.einsum("RQS,RSH->RQH", probs_RQS, v_RSH)
    out_BTNH = out_RQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)
    return _zero_dead_rows(out_BTNH, weights_BKGTS, alive_BMT1, return_weights)
