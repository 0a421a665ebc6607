"""Identity functions that change how XLA computes a gradient, not its value."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _computed_once(g: jax.Array) -> jax.Array:
    # XLA:CPU removes optimization barriers before fusion, but does not fuse across a
    # conditional whose predicate it cannot know: the cotangent is written to memory once.
    return jax.lax.cond(jnp.isnan(g.reshape(-1)[0]), lambda g: g + 0.0, lambda g: g, g)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
    """x, unchanged; its cotangent is computed once into memory on CPU.

    A residual stream's gradient is a sum of one term per later sublayer. XLA:CPU
    fuses that sum into each of its consumers (the next norm's backward, and the
    transposing copy that feeds each weight-gradient matmul), so every consumer
    recomputes it, and the work grows with the square of the depth. Passing the stream
    through this function at each sublayer makes the sum a buffer: docs/performance-notes.md
    ("The residual stream") measures the step. Other platforms get the plain identity.
    """
    return x


def _fwd(x):
    return x, None


def _bwd(_, g):
    return (jax.lax.platform_dependent(g, cpu=_computed_once, default=lambda g: g),)


materialize_cotangent.defvjp(_fwd, _bwd)
