"""Sentence embeddings: pool an encoder's hidden states into one vector per text.

    vecs = ffl.embed(model, params, input_ids, attention_mask, pooling="mean")   # [B,D]
    similarity = vecs @ vecs.T                                                   # cosine

Pooling follows sentence-transformers' Pooling module, so a sentence-transformers
checkpoint in HF layout (BERT, MiniLM) loaded with `ffl.hf.load` gives that library's
embeddings: `mean` averages the real tokens, `cls` takes the first real token, `max` takes
the largest value of each dimension over the real tokens; `normalize` scales to unit L2
norm (its Normalize module). The `flaxformer-lite embed` command is in
inference/commands.py; it reads the pooling from the folder's sentence-transformers files.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
POOLINGS = ("mean", "cls", "max")


def pool(hidden_BTD: Array, valid_BT: Array, pooling: str = "mean", normalize: bool = True) -> Array:
    """[B,D] float32 sentence vectors from hidden states [B,T,D] and a validity mask [B,T]."""
    if pooling not in POOLINGS:
        raise ValueError(f"embed: unknown pooling={pooling!r}; use one of {', '.join(POOLINGS)}")
    h_BTD = hidden_BTD.astype(jnp.float32)
    valid_BT1 = valid_BT.astype(bool)[..., None]
    if pooling == "mean":
        count_B1 = jnp.maximum(valid_BT1.sum(axis=1), 1e-9)
        vec_BD = jnp.where(valid_BT1, h_BTD, 0.0).sum(axis=1) / count_B1
    elif pooling == "max":
        vec_BD = jnp.where(valid_BT1, h_BTD, -jnp.inf).max(axis=1)
    else:  # the first real token, which is [CLS] also when rows are left-padded
        first_B = jnp.argmax(valid_BT1[..., 0], axis=1)
        vec_BD = jnp.take_along_axis(h_BTD, first_B[:, None, None], axis=1)[:, 0]
    if normalize:
        norm_B1 = jnp.linalg.norm(vec_BD, axis=-1, keepdims=True)
        vec_BD = vec_BD / jnp.maximum(norm_B1, 1e-12)  # torch.nn.functional.normalize's eps
    return vec_BD


@functools.partial(jax.jit, static_argnames=("model", "pooling", "normalize"))
def _embed(model, params, ids_BT, valid_BT, pooling, normalize):
    kwargs = {"method": "encode"} if model.cfg.family == "encoder_decoder" else {}
    # Positions count real tokens only, so a left-padded row embeds as it would alone.
    positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
    out = model.apply(params, ids_BT, attention_mask=valid_BT, positions=positions_BT, **kwargs)
    return pool(out.hidden_states, valid_BT, pooling, normalize)


def embed(
    model: nn.Module,
    params: dict,
    input_ids,
    attention_mask=None,
    pooling: str = "mean",
    normalize: bool = True,
) -> Array:
    """Sentence embeddings [B,D] (float32) of an encoder's last hidden states.

    Args:
      model, params: an Encoder (BERT-like) from `build_model`, or an EncoderDecoder
        (its encoder stack is used), and its {'params': ...}.
      input_ids: int [B,T] (or [T]), tokenized as the model was trained, e.g. with
        [CLS] ... [SEP] for BERT.
      attention_mask: [B,T], 1 on real tokens (padding on either side: positions count
        real tokens only); None: all real.
      pooling: 'mean' (over real tokens), 'cls' (the first real token) or 'max'.
      normalize: scale each vector to unit L2 norm, so dot products are cosines.
    """
    family = model.cfg.family
    if family not in ("encoder", "encoder_decoder"):
        raise ValueError(
            f"embed needs an encoder (or encoder_decoder) model; this one has model.family={family!r}"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"embed: unknown pooling={pooling!r}; use one of {', '.join(POOLINGS)}")
    ids = np.asarray(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"embed: input_ids must be int [B,T] token ids; got shape {ids.shape} dtype {ids.dtype}")
    valid = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    valid = valid[None] if valid.ndim == 1 else valid
    if valid.shape != ids.shape:
        raise ValueError(f"embed: attention_mask shape {valid.shape} differs from input_ids {ids.shape}")
    if not valid.any(axis=1).all():
        raise ValueError(f"embed: row {int(np.argmin(valid.any(axis=1)))} of attention_mask has no real token")
    V, max_len = model.cfg.vocab_size, model.cfg.max_len
    bad = ids[valid & ((ids < 0) | (ids >= V))]
    if bad.size:
        raise ValueError(
            f"embed: input_ids holds id {int(bad[0])} outside [0, {V}) = the model's vocab_size: "
            "tokenize with the model's own tokenizer"
        )
    if ids.shape[1] > max_len:
        raise ValueError(f"embed: {ids.shape[1]} tokens exceed model.max_len={max_len}: truncate the inputs")
    ids = np.where(valid, ids, 0).astype(np.int32)
    return _embed(model, params, jnp.asarray(ids), jnp.asarray(valid), pooling, bool(normalize))
