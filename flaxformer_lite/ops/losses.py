"""Token cross-entropy in float32, with a weight mask, label smoothing and z-loss."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy(
    logits_BTV: Array,
    labels_BT: Array,
    weights_BT: Optional[Array] = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Weighted mean token cross-entropy and its parts.

    Label smoothing mixes the one-hot target with a uniform distribution over V
    (Szegedy et al. 2016). z-loss adds z_loss * log(Z)^2 per token to keep the softmax
    normaliser near 1 (PaLM, Chowdhery et al. 2022).

    Returns:
      (loss, parts): loss is sum(weights * (nll + z)) / sum(weights); parts holds the
      float32 sums `loss_sum` (nll only, no smoothing), `z_loss_sum`, `weight_sum`,
      `correct_sum` (tokens whose label holds the top logit, ties included), so callers
      can aggregate exactly over microbatches and hosts.
    """
    logits = logits_BTV.astype(jnp.float32)
    if weights_BT is None:
        weights_BT = jnp.ones(labels_BT.shape, jnp.float32)
    weights_BT = weights_BT.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    # From the logits, not log-probabilities: no second [B,T,V] array to write and read
    # back, forward or backward (docs/performance-notes.md).
    label_logit_BT = jnp.take_along_axis(logits, labels_BT[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - label_logit_BT
    objective_BT = nll_BT
    if label_smoothing:
        smooth_BT = log_z_BT - jnp.mean(logits, axis=-1)
        objective_BT = (1.0 - label_smoothing) * nll_BT + label_smoothing * smooth_BT
    z_BT = z_loss * jnp.square(log_z_BT)
    objective_BT = objective_BT + z_BT
    weight_sum = jnp.sum(weights_BT)
    parts = {
        "loss_sum": jnp.sum(nll_BT * weights_BT),
        "z_loss_sum": jnp.sum(z_BT * weights_BT),
        "weight_sum": weight_sum,
        # The label holds the top logit (a tie counts as correct): one max over V, which
        # XLA shares with logsumexp's, rather than an argmax's second pass.
        "correct_sum": jnp.sum((label_logit_BT >= jnp.max(logits, axis=-1)) * weights_BT),
    }
    loss = jnp.sum(objective_BT * weights_BT) / jnp.maximum(weight_sum, 1.0)
    return loss, parts


def chunked_cross_entropy(
    h_BTD: Array,
    table_VD: Array,
    labels_BT: Array,
    weights_BT: Optional[Array] = None,
    *,
    chunk_size: int,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """cross_entropy(h @ table^T, ...) without ever holding the [B,T,V] logits.

    The B*T tokens run through the output projection `chunk_size` at a time (a lax.map
    over chunks, each rematerialised), so forward and backward hold [chunk_size, V]
    logits instead of [B*T, V]. Same loss and parts as cross_entropy; the tokens are
    padded to a whole number of chunks with zero weight.
    """
    B, T, D = h_BTD.shape
    n = B * T
    chunks = -(-n // chunk_size)
    pad = chunks * chunk_size - n
    if weights_BT is None:
        weights_BT = jnp.ones(labels_BT.shape, jnp.float32)

    def split(x, fill=0):
        x = x.reshape((n,) + x.shape[2:])
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape((chunks, chunk_size) + x.shape[1:])

    @jax.checkpoint
    def chunk_sums(args):
        h_CD, labels_C, weights_C = args
        logits_1CV = jnp.einsum("CD,VD->CV", h_CD, table_VD, preferred_element_type=jnp.float32)[None]
        loss, parts = cross_entropy(
            logits_1CV, labels_C[None], weights_C[None], label_smoothing=label_smoothing, z_loss=z_loss
        )
        return loss * jnp.maximum(parts["weight_sum"], 1.0), parts

    objective, parts = jax.lax.map(
        chunk_sums, (split(h_BTD), split(labels_BT), split(weights_BT.astype(jnp.float32)))
    )
    parts = jax.tree.map(jnp.sum, parts)
    return jnp.sum(objective) / jnp.maximum(parts["weight_sum"], 1.0), parts
