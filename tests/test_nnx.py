"""NNX interop (docs/nnx.md): its code blocks run, and an NNX training step equals Linen's."""

import pathlib
import re

import jax
import numpy as np
import optax
import pytest

import flaxformer_lite as ffl

PAGE = pathlib.Path(__file__).parent.parent / "docs" / "nnx.md"


@pytest.fixture(scope="module")
def page():
    """The names the page's code blocks define, run in order (they assert equal outputs)."""
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S):
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


def test_page_runs_and_its_nnx_step_equals_adamw_on_the_linen_tree(page):
    model, params, ids = page["model"], page["params"], page["ids"]

    def loss_fn(p):
        logits = model.apply(p, ids).logits
        return ffl.ops.cross_entropy(logits[:, :-1], ids[:, 1:])[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(page["loss"], loss, rtol=1e-6)
    tx = optax.adamw(1e-3)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=5e-5), page["trained"], expected)
    # Adam moves every weight by about the learning rate (1e-3) in its first step, so 5e-5
    # tells a trained tree from an untrained one; and the tree that came back did move.
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), page["trained"], params))
    assert max(moved) > 1e-4
