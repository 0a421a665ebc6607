"""GRPO's rollouts and rewards (Shao et al. 2024, DeepSeekMath): the batches of data.objective=grpo.

    rewards = Rewards(cfg.train)                                 # train.reward_fn, loaded once
    rollouts = Rollouts(cfg, tokenizer, records, params, rewards)  # an inference Engine, started
    batch, sums = rollouts.train_batch(params, prompts, step)
    ...
    rollouts.close()

Each step takes data.batch_size prompts (the grpo batch of data/objectives.py) and has
the inference Engine sample train.grpo_group completions of each, with the policy's
current params: the very arrays the train state holds (under LoRA, the base and the
adapters as they are), never a copy. Completion j of prompt k is sampled with seed
fold(train.seed, step, k) and choice j, so the rollouts of a step, and hence a resumed
run, are the same whenever they are made. Each completion's reward is the weighted sum
of the reward functions, called as NAME(prompt, completion, **row) with the JSON line's
other fields; its advantage is (r - mean) / (std + ADVANTAGE_EPS) over its group. The
batch holds one prompt + completion a row, with the Engine's log-probability of every
sampled token (the ratio's pi_old, and the measure of how far the Engine and the
trainer disagree: rollout_logprob_gap).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import pathlib
import queue
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from flaxformer_lite.config import Config, ConfigError, TrainConfig
from flaxformer_lite.inference.engine import Engine, SamplingParams
from flaxformer_lite.models import build_model

ADVANTAGE_EPS = 1e-4  # keeps a group whose rewards are (nearly) all equal at advantage ~0
ROLLOUT_TIMEOUT_S = 600.0  # one completion's longest wait before the run is declared stuck


def load_reward(spec: str) -> Callable[..., Any]:
    """The function a train.reward_fn entry names: "FILE.py:NAME" (a file, loaded as a
    module; a user's own code, like a config) or "module:NAME" (imported)."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f'train.reward_fn={spec!r} must be "FILE.py:NAME" or "module:NAME"')
    if target.endswith(".py"):
        path = pathlib.Path(target)
        if not path.is_file():
            raise ConfigError(f"train.reward_fn={spec!r}: no file {path} (paths are relative to the working folder)")
        loader = importlib.util.spec_from_file_location(f"ffl_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file: say which and why, in one line
            raise ConfigError(f"train.reward_fn={spec!r}: {path} failed to load: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"train.reward_fn={spec!r}: cannot import {target}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"train.reward_fn={spec!r}: {target} has no function {name}")
    return fn


class Rewards:
    """train.reward_fn's functions and weights; `score(record, completion)` is their sum."""

    def __init__(self, tc: TrainConfig):
        names = (tc.reward_fn,) if isinstance(tc.reward_fn, str) else tuple(tc.reward_fn)
        self.functions = [(name, load_reward(name)) for name in names]
        self.weights = tc.reward_weights or (1.0,) * len(names)

    def score(self, record, completion: str) -> float:
        """The weighted reward of one completion of `record` (a data.finetune.Record);
        ConfigError naming the function and the line if one raises or returns no finite number."""
        row = {k: v for k, v in record.fields.items() if k != "prompt"}
        total = 0.0
        for (name, fn), weight in zip(self.functions, self.weights):
            try:
                value = fn(record.fields["prompt"], completion, **row)
            except Exception as e:  # noqa: BLE001 - the user's function: stop with what it said
                raise ConfigError(f"reward {name} raised {type(e).__name__}: {e} on {record.where} "
                                  f"(completion {completion[:80]!r})") from None
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"reward {name} returned {value!r}, not a finite number, on {record.where} "
                                  f"(completion {completion[:80]!r})")
            total += weight * float(value)
        return total


def rollout_seed(seed: int, step: int, prompt: int) -> int:
    """The sampling seed of a step's prompt (its completions differ by their choice)."""
    return int(np.random.SeedSequence([seed, step, prompt]).generate_state(1)[0] >> 1)


def group_advantages(rewards_BG: np.ndarray) -> np.ndarray:
    """(r - mean) / (std + ADVANTAGE_EPS) within each row's group, float32 [B,G]."""
    mean = rewards_BG.mean(axis=1, keepdims=True)
    std = rewards_BG.std(axis=1, keepdims=True)
    return ((rewards_BG - mean) / (std + ADVANTAGE_EPS)).astype(np.float32)


class Rollouts:
    """GRPO's sampler: an inference Engine over the policy's params, started at once.

    Args:
      cfg: the run's config (data.objective=grpo).
      tokenizer: the run's tokenizer (completions' text for the rewards).
      records: {"train": records, "val": records}: the JSON lines that the grpo batches'
        `example` indices point into.
      params: the policy's {'params': ...} now; each call takes the current ones.
      rewards: train.reward_fn's functions.
    """

    def __init__(self, cfg: Config, tokenizer, records: dict[str, Sequence[Any]], params: Any, rewards: Rewards):
        d, tc = cfg.data, cfg.train
        self.cfg, self.tokenizer, self.records, self.rewards = cfg, tokenizer, records, rewards
        self.group = tc.grpo_group
        # Made outside the run's mesh, as the server makes it: the Engine's programs run on
        # its own thread, which no mesh context reaches, and its cache is built likewise.
        with jax.set_mesh(None):
            self.engine = Engine(build_model(cfg.model), params, tokenizer, max_batch=d.batch_size * self.group,
                                 max_len=d.seq_len, chunk=min(d.seq_len, 64), max_queue=d.batch_size * self.group)
        self.engine.start()

    def close(self) -> None:
        """Stop the Engine's thread."""
        self.engine.stop()

    def _sample(self, params: Any, prompts: dict[str, np.ndarray], step: int, *, n: int,
                temperature: float) -> tuple[dict[tuple[int, int], dict], float]:
        """{(prompt k, choice j): {"ids", "logps", "text"}} of the batch's real prompts, and
        the seconds it took. The Engine reads `params` as they are (no copy); it is idle
        between calls, so swapping them here is safe (which empties its prefix cache)."""
        self.engine.set_params(params)
        done: queue.SimpleQueue = queue.SimpleQueue()
        out: dict[tuple[int, int], dict] = {}

        def sink(key, event):
            entry = out.setdefault(key, {"ids": [], "logps": []})
            if event["type"] == "token":
                entry["ids"] += [t.id for t in event["tokens"]]
                entry["logps"] += [t.logprob for t in event["tokens"]]
            else:
                entry["text"], entry["finish"] = event["text"], event
                done.put(key)

        started = time.perf_counter()
        submitted = 0
        for k, example in enumerate(prompts["example"]):
            if example < 0:  # a padding row of the last evaluation batch
                continue
            prompt = prompts["prompt_ids"][k, : prompts["prompt_lengths"][k]].tolist()
            for j in range(n):
                sampling = SamplingParams(max_tokens=self.cfg.data.max_new_tokens, temperature=temperature,
                                          seed=rollout_seed(self.cfg.train.seed, step, k), choice=j, logprobs=0)
                self.engine.submit(prompt, sampling, lambda event, key=(k, j): sink(key, event))
                submitted += 1
        for _ in range(submitted):
            key = done.get(timeout=ROLLOUT_TIMEOUT_S)
            event = out[key]["finish"]
            if event["finish_reason"] == "error":
                raise RuntimeError(f"a GRPO rollout failed in the inference engine: {event['error']}")
        return out, time.perf_counter() - started

    def train_batch(self, params: Any, prompts: dict[str, np.ndarray], step: int) -> tuple[dict, dict[str, float]]:
        """The train step's batch for `step` (1-based) from a grpo batch of prompts, and the
        rollouts' host sums for the log (reward_sum, reward_sq_sum, reward_count,
        rollout_tokens, rollout_seconds)."""
        T, G = self.cfg.data.seq_len, self.group
        samples, seconds = self._sample(params, prompts, step, n=G, temperature=self.cfg.train.grpo_temperature)
        B = len(prompts["example"])
        batch = {k: np.zeros((B * G, T), np.int32) for k in ("input_ids", "labels", "segment_ids", "positions")}
        batch["weights"] = np.zeros((B * G, T), np.float32)
        batch["old_logp"] = np.zeros((B * G, T), np.float32)
        rewards = np.zeros((B, G), np.float64)
        for (k, j), sample in samples.items():
            record = self.records["train"][int(prompts["example"][k])]
            rewards[k, j] = self.rewards.score(record, sample["text"])
            P = int(prompts["prompt_lengths"][k])
            ids = np.concatenate([prompts["prompt_ids"][k, :P], np.asarray(sample["ids"], np.int32)])
            n, row = len(ids), k * G + j
            batch["input_ids"][row, :n] = ids
            batch["labels"][row, : n - 1] = ids[1:]
            batch["segment_ids"][row, :n] = 1
            batch["positions"][row, :n] = np.arange(n)
            batch["weights"][row, P - 1 : n - 1] = 1.0  # positions that predict a sampled token
            batch["old_logp"][row, P - 1 : n - 1] = sample["logps"]
        batch["advantage"] = group_advantages(rewards).reshape(-1)
        sums = {"reward_sum": float(rewards.sum()), "reward_sq_sum": float((rewards**2).sum()),
                "reward_count": float(rewards.size), "rollout_tokens": float(batch["weights"].sum()),
                "rollout_seconds": seconds}
        return batch, sums

    def evaluate(self, params: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """The mean reward of one greedy completion of every validation prompt:
        {"eval_reward_mean": ...}."""
        total = count = 0.0
        for prompts in batches:
            samples, _ = self._sample(params, prompts, 0, n=1, temperature=0.0)
            for (k, _), sample in samples.items():
                total += self.rewards.score(self.records["val"][int(prompts["example"][k])], sample["text"])
                count += 1
        return {"eval_reward_mean": total / max(count, 1.0)}

