"""Convert parameter trees between unrolled layers and scanned (stacked) layers.

Unrolled stacks (`scan_layers: false`) hold one subtree per layer, `layers_0` ...
`layers_{L-1}`; scanned stacks hold one `layers` subtree whose leaves carry a leading
L axis (nn.scan with parameters on axis 0). Both describe the same model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp

_LAYER_KEY = re.compile(r"layers_(\d+)")


def stack_layers(params: dict) -> dict:
    """Replace every `layers_0..layers_{L-1}` group with one `layers` tree stacked on axis 0."""
    if not isinstance(params, Mapping):
        return params
    numbered = {int(m.group(1)): k for k in params if (m := _LAYER_KEY.fullmatch(k))}
    out = {k: stack_layers(v) for k, v in params.items() if k not in numbered.values()}
    if numbered:
        if sorted(numbered) != list(range(len(numbered))):
            raise ValueError(f"layer keys {sorted(numbered.values())} are not layers_0..layers_{len(numbered) - 1}")
        if "layers" in out:
            raise ValueError("tree holds both 'layers' and 'layers_<i>' keys: it is neither layout")
        per_layer = [params[numbered[i]] for i in range(len(numbered))]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return out


def unstack_layers(params: dict) -> dict:
    """Replace every stacked `layers` tree with `layers_0..layers_{L-1}` (inverse of stack_layers)."""
    if not isinstance(params, Mapping):
        return params
    out = {k: unstack_layers(v) for k, v in params.items() if k != "layers"}
    if "layers" in params:
        num_layers = {x.shape[0] for x in jax.tree.leaves(params["layers"])}
        if len(num_layers) != 1:
            raise ValueError(f"'layers' leaves disagree on the leading layer axis: sizes {sorted(num_layers)}")
        for i in range(num_layers.pop()):
            out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out
