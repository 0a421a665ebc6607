"""Training parity with transformers: the same T5, batches and AdamW give the same run.

A tiny random T5 is built with transformers, imported here, and both copies take the
same 8 training steps on copy-task batches from our pipeline: our jitted train_step
(optax AdamW, clipping, warmup then cosine, decay masked off norms and the relative
bias) against torch.optim.AdamW with the same settings. Losses and final parameters
must agree to float32 round-off, which checks the loss, its masking, the gradients
and the optimizer together.
"""

import dataclasses
import math

import jax
import numpy as np
import torch
import transformers

import flaxformer_lite as ffl
from flaxformer_lite import data
from flaxformer_lite.interop import hf
from flaxformer_lite.models import build_model
from flaxformer_lite.train.optim import make_optimizer
from flaxformer_lite.train.step import init_train_state, make_train_step

STEPS = 8


def _torch_optimizer(model, t):
    """AdamW over the same parameter groups and schedule as make_optimizer(t)."""
    no_decay = lambda name: "layer_norm" in name or "relative_attention_bias" in name  # noqa: E731
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": t.weight_decay},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps)

    def factor(count):  # learning_rate_schedule: update number count + 1
        n = count + 1
        progress = min(max((n - t.warmup_steps) / (t.num_steps - t.warmup_steps), 0.0), 1.0)
        return min(n / t.warmup_steps, 1.0) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def test_t5_training_steps_match_transformers(tmp_path):
    config = transformers.T5Config(
        vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    theirs = transformers.T5ForConditionalGeneration(config)
    theirs.save_pretrained(tmp_path)
    model_cfg, params = hf.load(tmp_path)
    cfg = ffl.load_config("t5_tiny", overrides=[
        "data.objective=copy", "data.seq_len=12", "data.target_len=12", "data.batch_size=8",
        "data.pack=false", "train.warmup_steps=3", f"train.num_steps={STEPS}",
        "train.learning_rate=0.01", "train.weight_decay=0.1",
    ])
    cfg = dataclasses.replace(cfg, model=model_cfg)
    it = iter(data.make_dataset(
        "copy", tokenizer=data.ByteTokenizer(), batch_size=8, seq_len=12, target_len=12, pack=False,
        vocab_size=300,
    ))
    batches = [next(it) for _ in range(STEPS)]

    optimizer = make_optimizer(cfg.train)
    step = jax.jit(make_train_step(build_model(model_cfg), cfg, optimizer))
    state = init_train_state(params, optimizer, seed=0)
    our_losses = []
    for b in batches:
        state, sums = step(state, b)
        our_losses.append(float(sums["loss_sum"] / sums["weight_sum"]))

    opt, schedule = _torch_optimizer(theirs, cfg.train)
    their_losses = []
    for b in batches:
        tensor = lambda k: torch.from_numpy(np.asarray(b[k])).long()  # noqa: E731
        labels = torch.where(tensor("weights") > 0, tensor("labels"), -100)
        out = theirs(
            input_ids=tensor("input_ids"), attention_mask=tensor("segment_ids") > 0,
            decoder_input_ids=tensor("decoder_input_ids"),
            decoder_attention_mask=tensor("decoder_segment_ids") > 0, labels=labels,
        )
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), cfg.train.clip_norm)
        opt.step()
        schedule.step()
        their_losses.append(out.loss.item())

    np.testing.assert_allclose(our_losses, their_losses, rtol=1e-5)
    assert our_losses[-1] < our_losses[0] - 0.5  # the steps did move the model
    theirs.save_pretrained(tmp_path / "trained")
    _, trained = hf.load(tmp_path / "trained")
    # Adam divides by sqrt(v) + eps, which magnifies round-off where a gradient is near 0:
    # 1e-4 is a thousandth of how far the steps moved the weights.
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params)))
    assert moved > 0.05
    for ours, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(trained)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-4)
