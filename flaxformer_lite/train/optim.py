"""AdamW with warmup and a decay schedule, global-norm clipping, decoupled weight decay."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from flaxformer_lite.config import DEFAULT_WARMUP_STEPS, TrainConfig

# Norm scales, biases (`bias`, `*_bias`, the FFN's `bi`/`bo`) and T5's `relpos_bias` table
# are not decayed, as in GPT-2 / BERT practice: decay is meant to limit the size of the
# matrices, and pulling a norm scale towards zero changes what the layer computes.
FFN_BIASES = ("bi", "bo")


def warmup_steps(cfg: TrainConfig) -> int:
    """train.warmup_steps, or where it is unset 10% of num_steps, at most DEFAULT_WARMUP_STEPS:
    a short fine-tune never spends itself warming up."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return min(DEFAULT_WARMUP_STEPS, cfg.num_steps // 10)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate` over `warmup_steps`, then `cfg.schedule`.

    The schedule sees the optimizer's update count (0 for the first update) and uses
    update number count + 1, so the first update is not spent at a learning rate of 0.
    Warmup 0 is warmup 1: the first update is at the peak and the decay starts there, so
    a run of one update trains at learning_rate (not at the decay's end, 0).
      cosine:        half a cosine from the peak to 0 at update num_steps.
      linear:        a straight line from the peak to 0 at update num_steps.
      inverse_sqrt:  peak * sqrt(warmup / n) after warmup: the 2017 paper's rule
                     lr = d_model^-0.5 * min(n^-0.5, n * warmup^-1.5) (Vaswani et al.
                     2017, eq. 3), whose peak d_model^-0.5 * warmup^-0.5 is learning_rate.
      constant:      the peak after warmup.
    """
    peak, warmup = cfg.learning_rate, max(warmup_steps(cfg), 1)
    decay_steps = max(cfg.num_steps - warmup, 1)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        warm = jnp.minimum(n / warmup, 1.0)
        progress = jnp.clip((n - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        elif cfg.schedule == "linear":
            decay = 1.0 - progress
        elif cfg.schedule == "inverse_sqrt":
            decay = jnp.sqrt(warmup / jnp.maximum(n, warmup))
        else:
            decay = jnp.ones_like(n)
        return peak * warm * decay

    return schedule


def _leaf_name(path) -> str:
    """The last dict key of a tree path (parameter boxes add non-dict entries after it)."""
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def decay_mask(params):
    """True for the parameters weight decay applies to: kernels and embedding tables."""

    def decays(path, _):
        name = _leaf_name(path)
        return not (name == "scale" or name.endswith("bias") or name in FFN_BIASES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (if clip_norm) then AdamW on `learning_rate_schedule(cfg)`."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
