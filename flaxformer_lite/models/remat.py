"""Full rematerialisation of unrolled layers that every XLA backend keeps.

`jax.checkpoint` keeps a layer's recomputation apart from its forward pass with an
optimization barrier. XLA:CPU expands such barriers before common-subexpression
elimination, which then merges the recomputation back into the forward pass and
schedules it early: unrolled layers kept every activation, remat or not (docs/performance-notes.md,
"Memory"). Under nn.scan the loop keeps the two apart, so scanned stacks use nn.remat.

`recompute_in_backward` saves only a function's arguments and recomputes it in the
backward pass from arguments tied to the incoming cotangent (plus zero times one of its
entries): a real data dependency, which no pass can merge into the forward pass or hoist
ahead of the cotangent. Values and gradients are those of the function itself.
"""

from __future__ import annotations

from typing import Callable

import flax.core.lift as lift
import flax.linen as nn
import jax
import jax.numpy as jnp


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def recompute_in_backward(fn: Callable) -> Callable:
    """`fn` whose VJP saves only the arguments and recomputes `fn` after the cotangent arrives."""

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(args, ct):
        floats = [c for c in jax.tree.leaves(ct) if _is_float(c)]
        if floats:
            # 0 * c is not folded for floats (it is NaN for c = inf), so the tie survives.
            zero = jnp.zeros((), floats[0].dtype) * floats[0].reshape(-1)[0]
            args = jax.tree.map(lambda a: a + zero.astype(a.dtype) if _is_float(a) else a, args)
        return jax.vjp(fn, *args)[1](ct)

    wrapped.defvjp(forward, backward)
    return wrapped


def _lifted(fn):
    """flax.core.lift transform: `fn(scope, *args)` rematerialised by recompute_in_backward."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
        def pure(variable_groups, rng_groups, *args):
            scope = scope_fn(variable_groups, rng_groups)
            return fn(scope, *args), repack_fn(scope)

        return recompute_in_backward(pure)(variable_groups, rng_groups, *args)

    return lift.pack(inner, (True,), (True,), (True,), name="remat")


def remat_unrolled(module_class: type[nn.Module]) -> type[nn.Module]:
    """module_class whose __call__ is fully rematerialised (see the module docstring)."""
    return nn.transforms.lift_transform(_lifted, module_class)
