"""Training: optimizer and schedules, pure train/eval steps, the loop, the CLI commands.

    from flaxformer_lite import train
    summary = train.train(cfg, "runs/gpt_tiny")                   # the whole loop
    step_fn = train.make_train_step(model, cfg, train.make_optimizer(cfg.train))
    state, metrics = jax.jit(step_fn, donate_argnums=0)(state, batch)
"""

from flaxformer_lite.train.loop import evaluate, merge_params, prepare_data, train
from flaxformer_lite.train.optim import decay_mask, learning_rate_schedule, make_optimizer
from flaxformer_lite.train.step import (
    TrainState,
    check_objective,
    init_train_state,
    loss_and_sums,
    make_eval_step,
    make_train_step,
)
