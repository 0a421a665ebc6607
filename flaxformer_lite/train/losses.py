"""Fine-tuning losses over packed rows: per-sequence log-probabilities and DPO.

SFT needs nothing new: it is ops.cross_entropy with weight only on the assistant's
(completion's) tokens, which data.sft_batch sets. DPO (Rafailov et al. 2023) compares
sequence log-probabilities of a preferred and a rejected answer under the policy and a
frozen reference:

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with pi_c the summed log-probability of the chosen answer's trained tokens. Sums, not
means, as the steps return them: pairs, losses, correct orderings and margins add up
exactly over microbatches and devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Sums = dict[str, jax.Array]


def sequence_logps(logits_BTV: jax.Array, labels_BT: jax.Array, weights_BT: jax.Array,
                   segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log-probability [B,T+1], weight [B,T+1]) of each packed sequence: entry [b,k] sums
    the weighted tokens of segment k of row b (k = 0 is padding and has no weight)."""
    B, T = labels_BT.shape
    logits = logits_BTV.astype(jnp.float32)
    label_logit_BT = jnp.take_along_axis(logits, labels_BT[..., None], axis=-1)[..., 0]
    logp_BT = (label_logit_BT - jax.nn.logsumexp(logits, axis=-1)) * weights_BT
    index_BT = jnp.arange(B)[:, None] * (T + 1) + segment_ids_BT

    def per_segment(x_BT):
        return jax.ops.segment_sum(x_BT.reshape(-1), index_BT.reshape(-1), num_segments=B * (T + 1)).reshape(B, T + 1)

    return per_segment(logp_BT), per_segment(weights_BT.astype(jnp.float32))


def dpo_sums(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, pair_mask: jax.Array, beta: float) -> Sums:
    """DPO over pairs (any matching shapes; pairs where pair_mask is 0 count for nothing).

    Returns float32 sums: loss_sum (the objective), weight_sum (pairs), correct_sum (pairs
    whose chosen reward beats the rejected one: reward accuracy), reward_margin_sum,
    chosen_logp_sum and rejected_logp_sum (the policy's).
    """
    mask = pair_mask.astype(jnp.float32)
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    margin = reward_chosen - reward_rejected
    return {
        "loss_sum": jnp.sum(-jax.nn.log_sigmoid(margin) * mask),
        "weight_sum": jnp.sum(mask),
        "correct_sum": jnp.sum((margin > 0) * mask),
        "reward_margin_sum": jnp.sum(margin * mask),
        "chosen_logp_sum": jnp.sum(policy_chosen * mask),
        "rejected_logp_sum": jnp.sum(policy_rejected * mask),
    }
