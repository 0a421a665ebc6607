"""GRPO (data.objective=grpo): the loss against a float64 reference, group advantages,
rewards and their errors, and one tiny run: the reward rises, the Engine's log-probs are
the trainer's, and a stop and --resume give the same params bit for bit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite.config import ConfigError
from flaxformer_lite.data.finetune import Record
from flaxformer_lite.train import grpo
from flaxformer_lite.train.losses import grpo_sums

REWARDS = '''
def ascii_share(prompt, completion, **row):
    return sum(c < "\\x80" for c in completion) / max(len(completion), 1)


def reads_a_missing_field(prompt, completion, **row):
    return row["tests"]


def says_high(prompt, completion, **row):
    return "high"
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(reward file, prompts.jsonl of 40 random short prompts with an extra field)."""
    root = tmp_path_factory.mktemp("grpo")
    (root / "rewards.py").write_text(REWARDS)
    rng = np.random.default_rng(0)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": "".join(rng.choice(list("xyz0123"), 5)), "answer": i}) + "\n")
    return root / "rewards.py", root / "prompts.jsonl"


def _rewards(files, name, **more):
    from flaxformer_lite.config import TrainConfig

    return grpo.Rewards(TrainConfig(reward_fn=f"{files[0]}:{name}", **more))


def _reference64(logp, old, ref, adv, w, clip, beta):
    logp, old, ref, adv, w = (np.asarray(x, np.float64) for x in (logp, old, ref, adv, w))
    ratio = np.exp(logp - old)
    surrogate = np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - clip, 1 + clip) * adv[:, None])
    kl = np.exp(ref - logp) - (ref - logp) - 1
    loss = (-(surrogate - beta * kl) * w).sum(1) / w.sum(1)
    return loss.sum(), (kl * w).sum(), (np.abs(logp - old) * w).sum()


def test_grpo_loss_matches_a_float64_reference():
    rng = np.random.default_rng(1)
    logp = -rng.uniform(0.1, 3.0, (4, 6))
    old = logp + rng.normal(0, 0.3, (4, 6))  # ratios far enough from 1 that the clip acts
    ref = logp + rng.normal(0, 0.5, (4, 6))
    adv = rng.normal(size=4)
    w = (rng.uniform(size=(4, 6)) < 0.7).astype(np.float32)
    w[:, 0] = 1.0
    sums = grpo_sums(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, w)), clip=0.2, beta=0.1)
    loss, kl, gap = _reference64(logp, old, ref, adv, w, 0.2, 0.1)
    np.testing.assert_allclose([sums["loss_sum"], sums["kl_sum"], sums["logprob_gap_sum"]], [loss, kl, gap],
                               rtol=1e-5)
    assert float(sums["weight_sum"]) == 4 and float(sums["completion_tokens"]) == w.sum()
    assert 0 < float(sums["clipped_sum"]) < w.sum()


def test_advantages_are_normalised_within_each_group():
    rewards = np.random.default_rng(2).normal(3.0, 2.0, (3, 8))
    adv = grpo.group_advantages(rewards)
    np.testing.assert_allclose(adv.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(adv.std(1), 1, atol=1e-3)
    assert np.all(grpo.group_advantages(np.full((1, 4), 0.7)) == 0)  # nothing to prefer: no push


def test_a_reward_gets_the_rows_fields_and_failures_name_the_function_and_the_line(files):
    record = Record("prompts.jsonl:3", {"prompt": "q", "answer": 3})
    assert _rewards(files, "ascii_share").score(record, "ab\u00e9") == pytest.approx(2 / 3)
    assert _rewards(files, "ascii_share", reward_weights=(0.5,)).score(record, "ab") == 0.5
    with pytest.raises(ConfigError, match=r"reads_a_missing_field raised KeyError: 'tests' on prompts.jsonl:3"):
        _rewards(files, "reads_a_missing_field").score(record, "x")
    with pytest.raises(ConfigError, match=r"says_high returned 'high', not a finite number, on prompts.jsonl:3"):
        _rewards(files, "says_high").score(record, "x")
    with pytest.raises(ConfigError, match=r"no file nowhere.py"):
        grpo.load_reward("nowhere.py:f")


def test_grpo_settings_are_checked_by_key(tiny, files):
    with pytest.raises(ConfigError, match=r"data.objective=grpo needs train.reward_fn="):
        tiny("gpt_tiny", "data.objective=grpo")
    with pytest.raises(ConfigError, match=r"train.grpo_group=1 must be >= 2"):
        tiny("gpt_tiny", "data.objective=grpo", f"train.reward_fn={files[0]}:ascii_share", "train.grpo_group=1")
    with pytest.raises(ConfigError, match=r"train.reward_weights has 2 entries and train.reward_fn 1"):
        tiny("gpt_tiny", "data.objective=grpo", f"train.reward_fn={files[0]}:ascii_share", "train.reward_weights=[1,2]")


def test_grpo_raises_the_reward_with_the_engines_logprobs_and_resumes_bit_exact(tiny, files, tmp_path):
    from flaxformer_lite.runtime import checkpoint
    from flaxformer_lite.train import loop, metrics

    cfg = tiny("gpt_tiny", "data.objective=grpo", f"data.corpus={files[1]}",
               f"train.reward_fn={files[0]}:ascii_share", "train.grpo_group=4", "data.batch_size=2",
               "data.max_new_tokens=4", "train.learning_rate=0.05", "train.warmup_steps=0", "train.num_steps=8",
               "train.log_every=1", "train.eval_every=8", "train.checkpoint_every=4")
    loop.train(cfg, tmp_path / "straight")
    records = [r for r in metrics.read_metrics(tmp_path / "straight") if "reward_mean" in r]
    rewards = [r["reward_mean"] for r in records]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    assert max(r["rollout_logprob_gap"] for r in records) <= 1e-3  # float32: Engine and trainer agree
    assert records[0]["kl"] < 1e-6  # the reference is the policy the run starts from
    assert all(r["rollout_tokens_per_s"] > 0 and 0 <= r["clipped_fraction"] <= 1 for r in records)

    loop.train(cfg, tmp_path / "resumed", stop_at=4)
    loop.train(cfg, tmp_path / "resumed", resume=True)
    straight, resumed = (checkpoint.load_params(tmp_path / name)[1] for name in ("straight", "resumed"))
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
