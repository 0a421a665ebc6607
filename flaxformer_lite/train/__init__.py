"""Training: optimizer and schedules, pure train/eval steps, the loop, the CLI commands.

    from flaxformer_lite import train
    summary = train.train(cfg, "runs/gpt_tiny")                   # the whole loop
    step_fn = train.make_train_step(model, cfg, train.make_optimizer(cfg.train))
    state, metrics = jax.jit(step_fn, donate_argnums=0)(state, batch)
"""

from flaxformer_lite import lazy_exports

# Imported on first use, so `flaxformer-lite train --help` does not start JAX.
_PUBLIC = {
    **{name: ("flaxformer_lite.train.loop", name) for name in ("evaluate", "merge_params", "prepare_data", "train")},
    **{name: ("flaxformer_lite.train.optim", name) for name in (
        "decay_mask", "learning_rate_schedule", "make_optimizer",
    )},
    **{name: ("flaxformer_lite.train.step", name) for name in (
        "TrainState", "check_objective", "init_train_state", "loss_and_sums", "make_eval_step", "make_train_step",
    )},
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _PUBLIC)
