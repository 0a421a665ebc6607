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
      `correct_sum`, so callers can aggregate exactly over microbatches and hosts.
    """
    logits = logits_BTV.astype(jnp.float32)
    if weights_BT is None:
        weights_BT = jnp.ones(labels_BT.shape, jnp.float32)
    weights_BT = weights_BT.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    log_probs_BTV = logits - log_z_BT[..., None]
    nll_BT = -jnp.take_along_axis(log_probs_BTV, labels_BT[..., None], axis=-1)[..., 0]
    objective_BT = nll_BT
    if label_smoothing:
        smooth_BT = -jnp.mean(log_probs_BTV, axis=-1)
        objective_BT = (1.0 - label_smoothing) * nll_BT + label_smoothing * smooth_BT
    z_BT = z_loss * jnp.square(log_z_BT)
    objective_BT = objective_BT + z_BT
    weight_sum = jnp.sum(weights_BT)
    parts = {
        "loss_sum": jnp.sum(nll_BT * weights_BT),
        "z_loss_sum": jnp.sum(z_BT * weights_BT),
        "weight_sum": weight_sum,
        "correct_sum": jnp.sum((jnp.argmax(logits, -1) == labels_BT) * weights_BT),
    }
    loss = jnp.sum(objective_BT * weights_BT) / jnp.maximum(weight_sum, 1.0)
    return loss, parts
