"""LoRA adapters (Hu et al. 2021): low-rank updates beside frozen projections.

A targeted projection `name` of a module (cfg.lora.targets: query, key, value, out of
attention; wi, wg, wo of the FFN) gets two parameters beside its kernel:

    {name}_lora_a  [in..., R]   random (PEFT's init: uniform, bound 1/sqrt(fan_in))
    {name}_lora_b  [R, out...]  zero, so a fresh adapter changes nothing

and the projection adds (alpha / R) * dropout(x) A B to x W, computed as two thin
products: the [in, out] update is never formed while training or decoding. `merge`
folds adapters into their kernels (export, and the test that both forwards agree);
`without_adapters` turns them off (DPO's reference model is the base).

With lora.base_dtype=int8, `quantize_base` stores every projection kernel as int8 with
a float32 scale per output channel (`{name}_scale`, max |w| / 127 over the input axes);
layers.common.param dequantizes it as it is read.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from flaxformer_lite.config import ModelConfig
from flaxformer_lite.layers.common import DTYPES

SUFFIXES = ("_lora_a", "_lora_b")
# Each projection's kernel axes: (input axes, output axes).
AXES = {
    "query": (("embed",), ("heads", "head_dim")),
    "key": (("embed",), ("kv_heads", "head_dim")),
    "value": (("embed",), ("kv_heads", "head_dim")),
    "out": (("heads", "head_dim"), ("embed",)),
    "wi": (("embed",), ("mlp",)),
    "wg": (("embed",), ("mlp",)),
    "wo": (("mlp",), ("embed",)),
}


def targets(cfg: ModelConfig, name: str) -> bool:
    """True when cfg puts an adapter on projection `name`."""
    return bool(cfg.lora.rank) and name in cfg.lora.targets


def delta(module: nn.Module, name: str, x: jax.Array, out_shape: tuple[int, ...], cfg: ModelConfig, *,
          deterministic: bool) -> Optional[jax.Array]:
    """(alpha / R) * dropout(x) A B for projection `name` of `module` (its parameters are
    created there), shaped x's leading axes + out_shape; None if the projection has no
    adapter. x's trailing axes are the projection's input axes."""
    if not targets(cfg, name):
        return None
    in_axes, out_axes = AXES[name]
    n_in, R = len(in_axes), cfg.lora.rank
    in_shape = x.shape[x.ndim - n_in:]
    store = DTYPES[cfg.param_dtype]
    # variance_scaling(1/3, fan_in, uniform) is torch's kaiming_uniform(a=sqrt(5)), PEFT's A init.
    init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
    a = module.param(f"{name}_lora_a", nn.with_logical_partitioning(init_a, in_axes + ("lora_rank",)),
                     in_shape + (R,), store)
    b = module.param(f"{name}_lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + out_axes),
                     (R,) + tuple(out_shape), store)
    if cfg.lora.dropout and not deterministic:
        x = nn.Dropout(cfg.lora.dropout, deterministic=False)(x, rng=module.make_rng("dropout"))
    compute = x.dtype
    h = jnp.tensordot(x, a.astype(compute), axes=n_in)
    return jnp.tensordot(h * jnp.asarray(cfg.lora.scale, compute), b.astype(compute), axes=1)


def quantize_base(params: Any, cfg: ModelConfig) -> Any:
    """params with the projection kernels int8 plus `{name}_scale` if cfg.lora.base_dtype is
    int8 (boxed or plain leaves; kernels that already have a scale are kept); else params."""
    if not (cfg.lora.rank and cfg.lora.base_dtype == "int8"):
        return params
    flat = traverse_util.flatten_dict(params)
    out = dict(flat)
    for key, leaf in flat.items():
        name = str(key[-1])
        if name not in AXES or key[:-1] + (f"{name}_scale",) in flat:
            continue
        boxed = isinstance(leaf, nn.Partitioned)
        w = jnp.asarray(leaf.value if boxed else leaf, jnp.float32)
        n_in, n_out = (len(axes) for axes in AXES[name])
        lead = w.ndim - n_in - n_out  # a scanned stack's layers axis
        scale = jnp.max(jnp.abs(w), axis=tuple(range(lead, lead + n_in))) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, tuple(range(lead, lead + n_in)))), -127, 127).astype(jnp.int8)
        if boxed:
            names = leaf.names
            out[key] = leaf.replace(value=q)
            out[key[:-1] + (f"{name}_scale",)] = leaf.replace(value=scale, names=names[:lead] + names[lead + n_in:])
        else:
            out[key], out[key[:-1] + (f"{name}_scale",)] = q, scale
    return traverse_util.unflatten_dict(out)


def _dequantized(flat: dict, key: tuple) -> jax.Array:
    """A kernel as float32, int8 ones times their scale."""
    kernel = jnp.asarray(flat[key], jnp.float32)
    scale = flat.get(key[:-1] + (f"{key[-1]}_scale",))
    if scale is None:
        return kernel
    n_in, n_out = (len(axes) for axes in AXES[str(key[-1])])
    lead = kernel.ndim - n_in - n_out
    return kernel * jnp.expand_dims(jnp.asarray(scale, jnp.float32), tuple(range(lead, lead + n_in)))


def is_adapter(path: tuple) -> bool:
    """True for the flattened path (tuple of names) of an adapter parameter."""
    return str(path[-1]).endswith(SUFFIXES)


def split(params: Any) -> tuple[dict, dict]:
    """(adapters, everything else) of a params tree, each a nested dict of the same shape."""
    flat = traverse_util.flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    rest = {k: v for k, v in flat.items() if not is_adapter(k)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(rest)


def join(adapters: dict, rest: dict) -> dict:
    """The inverse of split."""
    flat = {**traverse_util.flatten_dict(rest), **traverse_util.flatten_dict(adapters)}
    return traverse_util.unflatten_dict(flat)


def without_adapters(params: Any) -> Any:
    """params with every B zeroed: the same forward as the base model."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: jnp.zeros_like(v) if str(k[-1]).endswith("_lora_b") else v for k, v in flat.items()}
    )


def merge(params: Any, cfg: ModelConfig) -> Any:
    """params with each adapter folded into its kernel (W + (alpha/R) A B, in W's dtype) and
    the adapters dropped: a plain model of cfg without LoRA. Scanned layers (a leading
    layers axis on both) merge layer by layer. An int8 base comes out in param_dtype."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k) and not str(k[-1]).endswith("_scale")}
    for key in list(out):
        if key[:-1] + (f"{key[-1]}_scale",) in flat:
            out[key] = _dequantized(flat, key).astype(DTYPES[cfg.param_dtype])
    for key, a in flat.items():
        if not str(key[-1]).endswith("_lora_a"):
            continue
        name = str(key[-1])[: -len("_lora_a")]
        kernel_key = key[:-1] + (name,)
        b, kernel = flat[key[:-1] + (f"{name}_lora_b",)], out[kernel_key]
        n_in, n_out = (len(axes) for axes in AXES[name])
        lead = kernel.shape[: kernel.ndim - n_in - n_out]
        a2 = jnp.reshape(a, lead + (math.prod(a.shape[len(lead):-1]), a.shape[-1])).astype(jnp.float32)
        b2 = jnp.reshape(b, lead + (b.shape[len(lead)], -1)).astype(jnp.float32)
        update = jnp.einsum("...ir,...ro->...io", a2, b2) * cfg.lora.scale
        out[kernel_key] = (kernel.astype(jnp.float32) + update.reshape(kernel.shape)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(out)
