"""Learning-rate schedules and the weight-decay mask."""

import dataclasses
import math

import jax
import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.config import TrainConfig
from flaxformer_lite.train import decay_mask, learning_rate_schedule, make_optimizer


def _lr(cfg, update):
    return float(learning_rate_schedule(cfg)(update))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "inverse_sqrt", "constant"])
def test_warmup_is_linear_up_to_the_peak(schedule):
    cfg = TrainConfig(learning_rate=3e-3, warmup_steps=40, num_steps=200, schedule=schedule)
    for n in (1, 7, 40):  # update number n is count n - 1
        assert _lr(cfg, n - 1) == pytest.approx(cfg.learning_rate * n / 40, rel=1e-6)
    assert max(_lr(cfg, c) for c in range(200)) == pytest.approx(cfg.learning_rate, rel=1e-6)


def test_cosine_and_linear_decay_to_zero_at_the_last_update():
    base = TrainConfig(learning_rate=1e-3, warmup_steps=10, num_steps=110)
    cos, lin = (dataclasses.replace(base, schedule=s) for s in ("cosine", "linear"))
    halfway = 59  # update 60 is half-way through the 100 decay updates
    assert _lr(cos, halfway) == pytest.approx(0.5e-3, rel=1e-5)
    assert _lr(lin, halfway) == pytest.approx(0.5e-3, rel=1e-5)
    assert _lr(cos, 84) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.75)), rel=1e-5)
    for cfg in (cos, lin):
        assert _lr(cfg, 109) == pytest.approx(0.0, abs=1e-9)
        values = [_lr(cfg, c) for c in range(10, 110)]
        assert all(a >= b for a, b in zip(values, values[1:]))


def test_inverse_sqrt_follows_the_2017_paper_rule():
    d_model, warmup = 512, 400
    peak = d_model**-0.5 * warmup**-0.5  # the paper's rule at its maximum, n = warmup
    cfg = TrainConfig(learning_rate=peak, warmup_steps=warmup, num_steps=10_000, schedule="inverse_sqrt")
    for n in np.random.default_rng(0).integers(1, 10_000, size=20):
        paper = d_model**-0.5 * min(n**-0.5, n * warmup**-1.5)  # Vaswani et al. 2017, eq. 3
        assert _lr(cfg, int(n) - 1) == pytest.approx(paper, rel=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_applies_to_kernels_and_embeddings_only(scan):
    cfg = ffl.load_config("gpt_tiny", overrides=["model.num_layers=2", "model.d_model=32", f"model.scan_layers={scan}"])
    params = ffl.init_params(cfg.model, jax.random.key(0))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    decayed = {k for k, m in flat.items() if m}
    assert decayed and decayed != set(flat)
    for name in flat:
        last = name.rsplit("[", 1)[1].strip("']")
        expect = last in ("embedding", "query", "key", "value", "out", "wi", "wo")
        assert flat[name] == expect, name


def test_decayed_weights_shrink_and_biases_do_not_without_gradient():
    cfg = TrainConfig(learning_rate=0.1, warmup_steps=0, num_steps=10, weight_decay=0.5, schedule="constant")
    params = {"dense": {"kernel": np.full((3, 3), 2.0, np.float32), "bias": np.full((3,), 2.0, np.float32)}}
    opt = make_optimizer(cfg)
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)


def test_an_unset_warmup_is_a_tenth_of_the_steps_at_most_50():
    from flaxformer_lite.train.optim import warmup_steps

    assert [warmup_steps(TrainConfig(num_steps=n)) for n in (5, 10, 300, 1000)] == [0, 1, 30, 50]
    assert warmup_steps(TrainConfig(num_steps=10, warmup_steps=30)) == 30  # a set one is kept
    schedule = learning_rate_schedule(TrainConfig(num_steps=10, learning_rate=1e-3, schedule="constant"))
    assert float(schedule(0)) == pytest.approx(1e-3)  # warmup 1: the peak from the first update


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_run_of_one_update_trains_at_the_set_rate(schedule):
    """Unset warmup is 0 for a short run; the one update is at the peak, not the decay's end."""
    rate = float(np.random.default_rng(0).uniform(1e-4, 1e-2))
    assert _lr(TrainConfig(num_steps=1, learning_rate=rate, schedule=schedule), 0) == pytest.approx(rate, rel=1e-6)
    two = [_lr(TrainConfig(num_steps=2, learning_rate=rate, warmup_steps=0, schedule=schedule), c) for c in (0, 1)]
    assert two[0] == pytest.approx(rate, rel=1e-6) and two[1] == pytest.approx(0.0, abs=1e-9)
