"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

Every objective but dpo and grpo reduces to one weighted token cross-entropy (ops.cross_entropy):
  causal_lm and sft (decoder; sft weighs the assistant's tokens only), masked_lm (encoder
  MLM head), span_corruption / seq2seq / copy / reverse (encoder-decoder), classification
  (the encoder's pooled head, one "token" a row). dpo compares sequence log-probabilities
  of chosen and rejected answers with a frozen reference; grpo weighs sampled completions
  by their advantage, with a KL to the same kind of reference (train/losses.py; the
  rollouts that make its batches are train/grpo.py's).
Steps return float32 *sums* (loss_sum, weight_sum, correct_sum, ...), never means, so
microbatches, devices, hosts and logging windows aggregate exactly by adding.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxformer_lite import ops
from flaxformer_lite.config import Config, ConfigError
from flaxformer_lite.layers import lora
from flaxformer_lite.models import lm_head_inputs
from flaxformer_lite.train.losses import dpo_sums, grpo_sums, sequence_logps, token_logps
from flaxformer_lite.train.optim import learning_rate_schedule

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]

SEQ2SEQ_OBJECTIVES = ("span_corruption", "seq2seq", "copy", "reverse")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. The dropout key of step s is fold_in(rng, s).

    ref_params: DPO's (and GRPO's) reference model, a frozen copy of what training updates as the run
    starts: every param (one more copy of the weights in memory), or under LoRA the
    adapters alone (the reference is the frozen base with them); None for other objectives.
    opt_state: of the adapters only under LoRA (see `trainable`), else of all params.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ref_params: Any = None


def needs_reference_copy(cfg: Config) -> bool:
    """True when the state holds DPO's reference: the policy the run starts from, as a
    frozen copy of what training updates (all params, or under LoRA the adapters; a run
    initialised from a LoRA run starts with trained adapters, so the base with the
    adapters off would be another model than the one DPO starts from). GRPO's KL
    reference follows the same rule."""
    return cfg.data.objective in ("dpo", "grpo")


def trainable(params: Any, adapters_only: bool) -> tuple[Any, Any]:
    """(what training updates, what it leaves alone): under LoRA (`adapters_only`) the
    adapters and the frozen base, as nested dicts (layers.lora.split); else (params, None)."""
    return lora.split(params) if adapters_only else (params, None)


def _rejoin(updated: Any, frozen: Any) -> Any:
    return updated if frozen is None else lora.join(updated, frozen)


def init_train_state(
    params: Any, optimizer: optax.GradientTransformation, seed: int, *, reference: bool = False,
    adapters_only: bool = False,
) -> TrainState:
    """Step 0, the given params, a fresh optimizer state and the run's base key; with
    `reference`, a frozen copy of what training updates as DPO's reference model; with
    `adapters_only` (LoRA), optimizer state and reference for the adapters alone."""
    updated = trainable(params, adapters_only)[0]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(updated),
        rng=jax.random.PRNGKey(seed),
        ref_params=jax.tree.map(jnp.copy, updated) if reference else None,
    )


def check_objective(cfg: Config) -> None:
    """ConfigError unless the model family (and heads) can train on data.objective."""
    objective, m = cfg.data.objective, cfg.model
    if objective in ("causal_lm", "sft", "dpo", "grpo"):
        need, ok = "family: decoder", m.family == "decoder"
    elif objective == "masked_lm":
        need, ok = "family: encoder with mlm_head: true", m.family == "encoder" and m.mlm_head
    elif objective == "classification":
        need = "family: encoder with pooler: true and num_labels > 0"
        ok = m.family == "encoder" and m.pooler and m.num_labels > 0
    else:
        need, ok = "family: encoder_decoder", m.family == "encoder_decoder"
    if not ok and objective == "masked_lm" and m.family == "encoder":
        raise ConfigError(
            "data.objective=masked_lm needs an MLM head, and this encoder has none (a base model such as "
            "a sentence-transformers checkpoint): set model.mlm_head=true (--set model.mlm_head=true); "
            "with --init-from the new head starts fresh and the rest keeps its weights"
        )
    if not ok:
        raise ConfigError(
            f"data.objective={objective} needs model.{need} (got family={m.family}, "
            f"mlm_head={m.mlm_head}, pooler={m.pooler}, num_labels={m.num_labels}): "
            "pick a preset of that family or another objective"
        )


def forward(
    model: nn.Module, cfg: Config, params: Any, batch: Batch, *, deterministic: bool, rng: Optional[jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [B,T,V], labels [B,T], weights [B,T]) of the objective's prediction."""
    rngs = None if rng is None else {"dropout": rng}
    family, objective = cfg.model.family, cfg.data.objective
    common = dict(segment_ids=batch["segment_ids"], positions=batch["positions"], deterministic=deterministic)
    if family == "encoder_decoder":
        out = model.apply(
            params, batch["input_ids"], batch["decoder_input_ids"],
            decoder_segment_ids=batch["decoder_segment_ids"],
            decoder_positions=batch["decoder_positions"], rngs=rngs, **common,
        )
        return out.logits, batch["labels"], batch["weights"]
    out = model.apply(params, batch["input_ids"], rngs=rngs, **common)
    if objective == "classification":
        # One prediction a row; rows of a padded evaluation batch have segment_ids 0.
        real_B1 = (batch["segment_ids"][:, :1] > 0).astype(jnp.float32)
        return out.class_logits[:, None, :], batch["label"][:, None], real_B1
    return out.logits, batch["labels"], batch["weights"]


def sequence_sums(logits_BTV: jax.Array, labels_BT: jax.Array, weights_BT: jax.Array, segment_ids_BT: jax.Array) -> Sums:
    """Exact-match counts over the sequences packed in each row (segment ids 1..T).

    A sequence is right when every weighted token's argmax is its label. Under teacher
    forcing that is also what greedy decoding would produce, token by token.
    """
    T = labels_BT.shape[1]
    wrong_BT = weights_BT * (jnp.argmax(logits_BTV, -1) != labels_BT)
    seg_BTK = jax.nn.one_hot(segment_ids_BT, T + 1, dtype=jnp.float32)[..., 1:]
    errors_BK = jnp.einsum("BT,BTK->BK", wrong_BT, seg_BTK)
    present_BK = jnp.einsum("BT,BTK->BK", weights_BT, seg_BTK) > 0
    return {
        "seq_correct_sum": jnp.sum(present_BK & (errors_BK == 0), dtype=jnp.float32),
        "seq_count": jnp.sum(present_BK, dtype=jnp.float32),
    }


def _dpo_logps(model: nn.Module, params: Any, batch: Batch, *, deterministic: bool, rng: Optional[jax.Array]):
    """Sequence log-probabilities and weights [B,T+1] of the chosen and the rejected rows,
    from one forward over both."""
    def both(key):
        return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])

    rngs = None if rng is None else {"dropout": rng}
    out = model.apply(params, both("input_ids"), segment_ids=both("segment_ids"), positions=both("positions"),
                      deterministic=deterministic, rngs=rngs)
    logp, weight = sequence_logps(out.logits, both("labels"), both("weights"), both("segment_ids"))
    B = batch["chosen_input_ids"].shape[0]
    return logp[:B], logp[B:], weight[:B], weight[B:]


def dpo_loss_and_sums(
    model: nn.Module, cfg: Config, params: Any, ref_params: Any, batch: Batch, *, deterministic: bool,
    rng: Optional[jax.Array],
) -> tuple[jax.Array, Sums]:
    """(DPO loss summed over the batch's pairs, float32 sums for metrics).

    The reference runs without dropout and without gradient: `ref_params` (the policy the
    run started from, TrainState.ref_params); under LoRA its adapters on `params`' frozen
    base. A pair is the chosen and the rejected answer in the same segment of the same
    row; both must keep a trained token.
    """
    ref_params = _reference(cfg, params, ref_params)
    chosen, rejected, chosen_w, rejected_w = _dpo_logps(model, params, batch, deterministic=deterministic, rng=rng)
    ref_chosen, ref_rejected, _, _ = _dpo_logps(model, ref_params, batch,
                                                deterministic=True, rng=None)
    sums = dpo_sums(chosen, rejected, ref_chosen, ref_rejected, (chosen_w > 0) & (rejected_w > 0), cfg.train.dpo_beta)
    sums["token_count"] = sum(jnp.sum(batch[f"{side}_segment_ids"] > 0, dtype=jnp.float32)
                              for side in ("chosen", "rejected"))
    return sums["loss_sum"], sums


def _reference(cfg: Config, params: Any, ref_params: Any) -> Any:
    """The frozen reference's params: under LoRA its adapters on `params`' frozen base."""
    if ref_params is None:
        raise ValueError(f"{cfg.data.objective} needs ref_params, the frozen policy the run started from "
                         "(TrainState.ref_params)")
    if cfg.model.lora.rank:  # ref_params: the initial adapters (or a whole tree, whose adapters count)
        ref_params = lora.join(lora.split(ref_params)[0], lora.split(params)[1])
    return jax.lax.stop_gradient(ref_params)


def grpo_loss_and_sums(model: nn.Module, cfg: Config, params: Any, ref_params: Any, batch: Batch) -> tuple[jax.Array, Sums]:
    """(GRPO loss summed over the batch's completions, float32 sums for metrics).

    `batch` (train/grpo.py makes it) holds one prompt + completion a row: input_ids,
    labels, weights (1 where the label is a sampled token), segment_ids, positions
    [B,T], old_logp [B,T] (the rollout's log p of each label) and advantage [B]. No
    dropout (config.validate refuses it): the ratio compares like with like.
    """
    def logps(p):
        out = model.apply(p, batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                          deterministic=True)
        return token_logps(out.logits, batch["labels"])

    t = cfg.train
    logp = logps(params)
    # The KL is still reported with beta 0; only the gradient ignores it then.
    ref_logp = logps(_reference(cfg, params, ref_params))
    sums = grpo_sums(logp, batch["old_logp"], ref_logp, batch["advantage"], batch["weights"],
                     clip=t.grpo_clip, beta=t.grpo_kl)
    sums["token_count"] = jnp.sum(batch["segment_ids"] > 0, dtype=jnp.float32)
    return sums["loss_sum"], sums


def loss_and_sums(
    model: nn.Module, cfg: Config, params: Any, batch: Batch, *, deterministic: bool, rng: Optional[jax.Array],
    ref_params: Any = None,
) -> tuple[jax.Array, Sums]:
    """(training objective summed over weighted tokens (dpo: pairs), float32 sums for metrics).

    ref_params: dpo's and grpo's reference model (see TrainState.ref_params).
    """
    if cfg.data.objective == "dpo":
        return dpo_loss_and_sums(model, cfg, params, ref_params, batch, deterministic=deterministic, rng=rng)
    if cfg.data.objective == "grpo":
        return grpo_loss_and_sums(model, cfg, params, ref_params, batch)
    smoothing = dict(label_smoothing=cfg.train.label_smoothing, z_loss=cfg.train.z_loss)
    if cfg.train.loss_chunk_size:  # causal_lm (config.validate): logits never whole
        rngs = None if rng is None else {"dropout": rng}
        out = model.apply(params, batch["input_ids"], segment_ids=batch["segment_ids"],
                          positions=batch["positions"], deterministic=deterministic, rngs=rngs)
        h_BTD, table_VD = lm_head_inputs(cfg.model, params, out.hidden_states)
        loss, sums = ops.chunked_cross_entropy(
            h_BTD, table_VD, batch["labels"], batch["weights"], chunk_size=cfg.train.loss_chunk_size, **smoothing
        )
    else:
        logits_BTV, labels_BT, weights_BT = forward(
            model, cfg, params, batch, deterministic=deterministic, rng=rng
        )
        loss, sums = ops.cross_entropy(logits_BTV, labels_BT, weights_BT, **smoothing)
    if cfg.data.objective in SEQ2SEQ_OBJECTIVES:
        sums = {**sums, **sequence_sums(logits_BTV, labels_BT, weights_BT, batch["decoder_segment_ids"])}
    # Throughput counts real tokens only: encoder (or decoder-only) input plus decoder input.
    real = [batch[k] > 0 for k in ("segment_ids", "decoder_segment_ids") if k in batch]
    sums["token_count"] = sum(jnp.sum(r, dtype=jnp.float32) for r in real)
    # cross_entropy's loss is the weighted mean; the sum makes microbatches add exactly.
    return loss * jnp.maximum(sums["weight_sum"], 1.0), sums


def _microbatches(batch: Batch, count: int) -> Batch:
    """[B,...] -> [count, B/count, ...] taking every count-th row, so that each
    microbatch keeps rows from every data shard of a batch sharded on its first axis."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    model: nn.Module,
    cfg: Config,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: Optional[str] = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Sums]]:
    """The pure step for `jax.jit(..., donate_argnums=0)`.

    Gradients of grad_accum_steps microbatches are summed and divided by the batch's
    total weight, so accumulation computes the same update as one large batch. A step
    whose loss, gradient or learning rate is not finite changes nothing but the step
    count and reports `nonfinite` = 1 (hand-written rather than optax.apply_if_finite,
    which checks only the gradient and lets updates through after a number of
    failures). With
    `axis_name` (under pmap or shard_map) gradients and sums are also summed over it.
    """
    accum = cfg.train.grad_accum_steps
    schedule = learning_rate_schedule(cfg.train)
    adapters_only = bool(cfg.model.lora.rank)

    def objective(updated, frozen, batch, rng, ref_params):
        params = _rejoin(updated, frozen)
        return loss_and_sums(model, cfg, params, batch, deterministic=False, rng=rng, ref_params=ref_params)

    # Differentiated with respect to what training updates only: under LoRA the base gets
    # no gradient at all (no [in, out] weight gradient is ever formed for it).
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Sums]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        updated, frozen = trainable(state.params, adapters_only)
        if accum == 1:
            (_, sums), grads = grad_fn(updated, frozen, batch, step_rng, state.ref_params)
        else:
            microbatches = _microbatches(batch, accum)

            def micro(carry, xs):
                index, mb = xs
                (_, sums), grads = grad_fn(updated, frozen, mb, jax.random.fold_in(step_rng, index), state.ref_params)
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            first = jax.tree.map(lambda x: x[0], microbatches)
            sums_shape = jax.eval_shape(objective, updated, frozen, first, step_rng, state.ref_params)[1]
            zeros = (
                jax.tree.map(jnp.zeros_like, updated),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
            )
            (grads, sums), _ = jax.lax.scan(micro, zeros, (jnp.arange(accum), microbatches))
        if axis_name is not None:
            grads, sums = jax.lax.psum((grads, sums), axis_name)
        # Each gradient keeps its parameter's dtype (the float32 weight sum would promote
        # bfloat16 ones), so the optimizer state keeps the dtypes it was made with.
        grads = jax.tree.map(lambda g: (g / jnp.maximum(sums["weight_sum"], 1.0)).astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        # A non-finite step leaves params and optimizer state as they were
        # (the step count still advances: the batch is consumed). The flag goes out with
        # the metrics, so the host learns of it at its next log step, without a sync.
        # A learning rate past float32's range turns finite gradients into a non-finite
        # update: it counts as a non-finite step too.
        learning_rate = schedule(state.step)
        finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm) & jnp.isfinite(learning_rate)
        # lax.cond, not a select over the trees: the optimizer tail of the benchmark's
        # step takes 16 ms instead of 31 (docs/performance-notes.md).
        def update(operands):
            grads, params, opt_state = operands
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        updated, opt_state = jax.lax.cond(
            finite, update, lambda operands: operands[1:], (grads, updated, state.opt_state)
        )
        params = _rejoin(updated, frozen)
        metrics = {
            **sums,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(
    model: nn.Module, cfg: Config, *, axis_name: Optional[str] = None
) -> Callable[[Any, Batch], Sums]:
    """`eval_step(params, batch, ref_params=None) -> sums` (no dropout); ref_params: dpo's
    reference (TrainState.ref_params)."""

    def eval_step(params: Any, batch: Batch, ref_params: Any = None) -> Sums:
        _, sums = loss_and_sums(model, cfg, params, batch, deterministic=True, rng=None, ref_params=ref_params)
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step
