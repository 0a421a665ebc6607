"""Every family x position scheme x norm position the config allows trains, with every
activation and both norms paired with each of those (an all-pairs design): finite loss,
finite gradients, and a gradient reaching every parameter.

The full product with activations (272 models) costs minutes of eager dispatch on two CPU
cores. Instead: the structural product (34 models, one per allowed family x position x
norm position) with activations and norms rotated through it in a Latin-square way, then
rows added one at a time for whichever pair is still missing (the ALiBi pairs that
encoder_decoder cannot hold, and the activations a position's six rows cannot all meet):
51 models. test_design_covers_every_pair checks that every pair of values of any two
factors occurs.
"""

import itertools
import typing

import jax
import numpy as np
import pytest
from core_helpers import B, T, init, lm_loss, model_args, random_ids, tiny

from flaxformer_lite.config import Activation, ConfigError, Family, Norm, NormPosition, Position
from flaxformer_lite.models import build_model

FACTORS = {
    "family": typing.get_args(Family),
    "position": typing.get_args(Position),
    "norm_position": typing.get_args(NormPosition),
    "activation": typing.get_args(Activation),
    "norm": typing.get_args(Norm),
}


def allowed(**choice) -> bool:
    """Whether the config accepts this combination (it rejects, e.g., ALiBi in encoder_decoder)."""
    try:
        build_model(tiny(**choice))
        return True
    except ConfigError:
        return False


def design() -> list[dict]:
    """The all-pairs design: each allowed structural combination once, then any pair still missing."""
    rows = []
    for (f, family), (p, position), (n, norm_position) in itertools.product(
        *(enumerate(FACTORS[k]) for k in ("family", "position", "norm_position"))
    ):
        # 2f + n runs over 0..5 for each position, so each position meets six activations.
        activation = FACTORS["activation"][(p + 2 * f + n) % len(FACTORS["activation"])]
        row = dict(family=family, position=position, norm_position=norm_position,
                   activation=activation, norm=FACTORS["norm"][(p + f + n) % 2])
        if allowed(**row):
            rows.append(row)
    # One row per step, then look again: a row added for one pair often covers others.
    while missing := missing_pairs(rows):
        (a, b), values = min(missing.items())
        va, vb = min(values)
        base = next(r for r in rows if r[a] == va and allowed(**{**r, b: vb}))
        rows.append({**base, b: vb})
    return rows


def missing_pairs(rows) -> dict:
    """{(factor a, factor b): {(value a, value b), ...}} allowed somewhere but absent from rows."""
    missing = {}
    for a, b in itertools.combinations(FACTORS, 2):
        present = {(r[a], r[b]) for r in rows}
        wanted = {(va, vb) for va, vb in itertools.product(FACTORS[a], FACTORS[b])
                  if any(allowed(**{a: va, b: vb, **rest}) for rest in _completions(a, b))}
        if wanted - present:
            missing[(a, b)] = wanted - present
    return missing


def _completions(a, b):
    """The two structural choices that decide whether a pair is allowed at all (family, position)."""
    others = [k for k in ("family", "position") if k not in (a, b)]
    return [dict(zip(others, values)) for values in itertools.product(*(FACTORS[k] for k in others))]


DESIGN = design()


def test_design_covers_every_pair():
    assert not missing_pairs(DESIGN)
    structural = {(r["family"], r["position"], r["norm_position"]) for r in DESIGN}
    assert len(structural) == sum(
        allowed(family=f, position=p, norm_position=n)
        for f, p, n in itertools.product(FACTORS["family"], FACTORS["position"], FACTORS["norm_position"]))


def forward_backward_problems(cfg):
    """What went wrong with one forward + backward pass (empty when all is well)."""
    model, params = build_model(cfg), init(cfg)
    ids = random_ids(0, B, T, cfg.vocab_size)
    loss, grads = jax.value_and_grad(lambda p: lm_loss(model.apply(p, *model_args(cfg, ids)), ids))(params)
    problems = [] if np.isfinite(float(loss)) else [f"loss {float(loss)}"]
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        if not np.isfinite(g).all():
            problems.append(f"non-finite gradient at {jax.tree_util.keystr(path)}")
        elif not g.any():
            problems.append(f"zero gradient at {jax.tree_util.keystr(path)}: parameter unused")
    return problems


@pytest.mark.parametrize("family", FACTORS["family"])
def test_every_design_row_runs_forward_and_backward(family):
    rows = [r for r in DESIGN if r["family"] == family]
    failures = {}
    for row in rows:
        problems = forward_backward_problems(tiny(**row, num_kv_heads=2, mlm_head=family == "encoder"))
        if problems:
            failures[tuple(row.values())] = problems
    assert not failures, failures
