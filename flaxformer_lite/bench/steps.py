"""The training step both `bench train` and `bench train --lora` time: our jitted step and
transformers' (loss, backward, clip, AdamW), a causal-LM run config and a random batch.
"""

from __future__ import annotations

import time


def run_config(model_cfg, shape: dict, loss_chunk_size=None):
    """A causal-LM run config: constant learning rate, AdamW as TrainConfig defines it."""
    from flaxformer_lite.config import Config, DataConfig, TrainConfig

    train = TrainConfig(learning_rate=1e-4, schedule="constant", warmup_steps=0, loss_chunk_size=loss_chunk_size)
    data = DataConfig(objective="causal_lm", seq_len=shape["seq_len"], batch_size=shape["batch"])
    return Config(name="bench_train", model=model_cfg, data=data, train=train)


def random_batch(shape: dict, seed: int) -> dict:
    """Random token ids of the shape: one unpacked causal-LM batch, every token weighted."""
    import numpy as np

    B, T, V = shape["batch"], shape["seq_len"], shape["vocab"]
    ids = np.random.default_rng(seed).integers(0, V, (B, T + 1)).astype(np.int32)
    ones = np.ones((B, T), np.int32)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "weights": ones.astype(np.float32),
            "segment_ids": ones, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def torch_step(model, cfg, batch: dict, device, dtype: str):
    """A closure running one transformers training step: loss, backward, clip, AdamW."""
    import torch

    tc = cfg.train
    trained = [p for p in model.parameters() if p.requires_grad]  # all of them, or peft's adapters
    decay = [p for p in trained if p.ndim >= 2]  # matrices and tables, as train.optim
    rest = [p for p in trained if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=tc.learning_rate, betas=(tc.b1, tc.b2), eps=tc.eps, foreach=True,
    )
    ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    labels = torch.from_numpy(batch["labels"]).long().to(device).reshape(-1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, tc.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, sync


def step_seconds(run_steps, steps: int) -> float:
    """Seconds per step of `run_steps(steps)`."""
    start = time.perf_counter()
    run_steps(steps)
    return (time.perf_counter() - start) / steps


def train_parts(model_cfg, shape: dict):
    """(run config, jitted train step with the state donated, optimizer) for our model."""
    import jax

    from flaxformer_lite.models import build_model
    from flaxformer_lite.train.optim import make_optimizer
    from flaxformer_lite.train.step import make_train_step

    cfg = run_config(model_cfg, shape)
    optimizer = make_optimizer(cfg.train)
    step = jax.jit(make_train_step(build_model(model_cfg), cfg, optimizer), donate_argnums=0)
    return cfg, step, optimizer


def compiled_steps(step, state, batch):
    """(compiled step, seconds to compile it, run(n): n steps from the state it holds, blocking)."""
    import jax

    start = time.perf_counter()
    step_c = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run(n):
        state = holder["state"]
        for _ in range(n):
            state, metrics = step_c(state, batch)
        jax.block_until_ready(metrics["loss_sum"])
        holder["state"] = state

    return step_c, compile_s, run
