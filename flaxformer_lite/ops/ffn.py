"""Position-wise feed-forward: activations, plain and gated (GLU) variants."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# gelu: exact erf form (BERT). gelu_tanh: the tanh approximation (GPT-2's "gelu_new").
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
}
# Gated units (Shazeer 2020, "GLU Variants Improve Transformer"): act(x W_gate) * (x W_in).
# glu is the sigmoid-gated original (Dauphin et al. 2017) without biases; geglu uses the
# tanh GELU, as T5 v1.1's "gated-gelu" does.
GATED = {"glu": "sigmoid", "reglu": "relu", "geglu": "gelu_tanh", "swiglu": "silu"}


def is_gated(activation: str) -> bool:
    """True for GLU variants, which need a gate projection."""
    return activation in GATED


def activate(x: Array, activation: str) -> Array:
    """Apply a named (ungated) activation."""
    name = GATED.get(activation, activation)
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: one of {sorted(ACTIVATIONS) + sorted(GATED)}")
    return ACTIVATIONS[name](x)


def feed_forward(
    x_BTD: Array,
    w_in_DF: Array,
    w_out_FD: Array,
    *,
    activation: str,
    w_gate_DF: Optional[Array] = None,
    b_in_F: Optional[Array] = None,
    b_out_D: Optional[Array] = None,
    adapters: Optional[Mapping[str, Callable[[Array], Array]]] = None,
) -> Array:
    """act(x W_in + b_in) W_out + b_out; gated: (act(x W_gate) * x W_in) W_out.

    adapters: {"wi" | "wg" | "wo": f} adds f(input) to that product (LoRA's x A B).
    """
    adapters = adapters or {}

    def project(name, x, w):
        y = jnp.einsum("BTD,DF->BTF", x, w)
        return y + adapters[name](x) if name in adapters else y

    h_BTF = project("wi", x_BTD, w_in_DF)
    if b_in_F is not None:
        h_BTF = h_BTF + b_in_F
    if is_gated(activation):
        if w_gate_DF is None:
            raise ValueError(f"activation {activation!r} is gated: pass w_gate_DF")
        h_BTF = activate(project("wg", x_BTD, w_gate_DF), activation) * h_BTF
    else:
        h_BTF = activate(h_BTF, activation)
    out_BTD = project("wo", h_BTF, w_out_FD)
    if b_out_D is not None:
        out_BTD = out_BTD + b_out_D
    return out_BTD
