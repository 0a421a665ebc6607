"""Fine-tuning losses over packed rows: per-sequence log-probabilities, DPO and GRPO.

SFT needs nothing new: it is ops.cross_entropy with weight only on the assistant's
(completion's) tokens, which data.sft_batch sets. DPO (Rafailov et al. 2023) compares
sequence log-probabilities of a preferred and a rejected answer under the policy and a
frozen reference:

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with pi_c the summed log-probability of the chosen answer's trained tokens.

GRPO (Shao et al. 2024, eq. 3) weighs each sampled token t of completion i by its group-
normalised advantage A_i through PPO's clipped ratio r = pi / pi_old, and pulls towards
the reference with the k3 estimator of KL(pi || ref):

    loss_i = -(1/|o_i|) sum_t [min(r A_i, clip(r, 1-eps, 1+eps) A_i) - beta (ref/pi - log(ref/pi) - 1)]

Sums, not means, as the steps return them: pairs (or completions), losses, correct
orderings and margins add up exactly over microbatches and devices.
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


def token_logps(logits_BTV: jax.Array, labels_BT: jax.Array) -> jax.Array:
    """float32 log p(label) [B,T] of every position."""
    logits = logits_BTV.astype(jnp.float32)
    label_logit_BT = jnp.take_along_axis(logits, labels_BT[..., None], axis=-1)[..., 0]
    return label_logit_BT - jax.nn.logsumexp(logits, axis=-1)


def grpo_sums(logp_BT: jax.Array, old_logp_BT: jax.Array, ref_logp_BT: jax.Array, advantage_B: jax.Array,
              weights_BT: jax.Array, *, clip: float, beta: float) -> Sums:
    """GRPO over completions, one a row (see the module docstring); weights_BT is 1 on the
    sampled tokens (the labels the completion's positions predict), 0 elsewhere.

    Returns float32 sums: loss_sum (each completion's loss is a mean over its tokens),
    weight_sum (completions with a token), and over sampled tokens: completion_tokens,
    kl_sum, clipped_sum (tokens whose ratio the clip held: past 1 + eps with A > 0, or
    below 1 - eps with A < 0) and logprob_gap_sum (|log pi - log pi_old|: with pi_old the
    rollouts' own log-probabilities under the same weights, how far sampling and
    training disagree numerically).
    """
    w_BT = weights_BT.astype(jnp.float32)
    count_B = jnp.sum(w_BT, axis=1)
    ratio_BT = jnp.exp(logp_BT - old_logp_BT)
    a_B1 = advantage_B[:, None]
    clipped_ratio_BT = jnp.clip(ratio_BT, 1.0 - clip, 1.0 + clip)
    surrogate_BT = jnp.minimum(ratio_BT * a_B1, clipped_ratio_BT * a_B1)
    log_ref_ratio_BT = ref_logp_BT - logp_BT
    kl_BT = jnp.exp(log_ref_ratio_BT) - log_ref_ratio_BT - 1.0
    per_token_BT = -(surrogate_BT - beta * kl_BT) * w_BT
    loss_B = jnp.sum(per_token_BT, axis=1) / jnp.maximum(count_B, 1.0)
    clipped_BT = ((ratio_BT > 1.0 + clip) & (a_B1 > 0)) | ((ratio_BT < 1.0 - clip) & (a_B1 < 0))
    return {
        "loss_sum": jnp.sum(loss_B),
        "weight_sum": jnp.sum(count_B > 0, dtype=jnp.float32),
        "completion_tokens": jnp.sum(w_BT),
        "kl_sum": jnp.sum(jax.lax.stop_gradient(kl_BT) * w_BT),
        "clipped_sum": jnp.sum(clipped_BT * w_BT),
        "logprob_gap_sum": jnp.sum(jax.lax.stop_gradient(jnp.abs(logp_BT - old_logp_BT)) * w_BT),
    }
