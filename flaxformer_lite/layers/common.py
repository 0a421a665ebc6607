"""Parameter helpers shared by the layers: logical names, initializers, dtypes."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(cfg: ModelConfig):
    """Compute dtype of activations."""
    return DTYPES[cfg.dtype]


def param_dtype(cfg: ModelConfig):
    """Storage dtype of parameters (of the frozen base, under LoRA with lora.base_dtype;
    the adapters themselves are stored in param_dtype, layers/lora.py)."""
    if cfg.lora.rank and cfg.lora.base_dtype in DTYPES:
        return DTYPES[cfg.lora.base_dtype]
    return DTYPES[cfg.param_dtype]


def kernel_init(cfg: ModelConfig):
    """Truncated normal with the config's std (BERT/GPT-2 use 0.02)."""
    return nn.initializers.truncated_normal(cfg.initializer_range)


def param(module: nn.Module, name: str, init, shape: tuple, axes: tuple, cfg: ModelConfig, anchor=None):
    """A parameter carrying logical axis names, cast to the compute dtype. A kernel stored
    quantized (lora.base_dtype, layers/lora.py) is dequantized: int8 with a `{name}_scale`
    beside it, nf4 codes with a `{name}_absmax`. With `anchor` (the layer's input), the
    dequantized or converted copy (of a bfloat16 base) is tied to it (ops.tied), so XLA
    makes it inside the layer, not for every layer ahead of the first."""
    compute = dtype(cfg)
    if module.has_variable("params", f"{name}_absmax"):  # packed codes: not of `shape`, so not module.param
        codes, absmax = module.get_variable("params", name), module.get_variable("params", f"{name}_absmax")
        value = ops.nf4_dequantize(codes, absmax, shape, compute)
    else:
        stored = module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype(cfg))
        if module.has_variable("params", f"{name}_scale"):
            scale = module.get_variable("params", f"{name}_scale")  # over the output axes, the trailing ones
            value = jnp.asarray(stored, compute) * jnp.asarray(scale, compute)
        elif stored.dtype != compute and param_dtype(cfg) != DTYPES[cfg.param_dtype]:
            value = jnp.asarray(stored, compute)  # a bfloat16 base: converted in the layer, like a dequantized one
        else:
            return jnp.asarray(stored, compute)
    return value if anchor is None else ops.tied(value, anchor)


def constrain(x, axes: tuple):
    """Logical sharding constraint on an activation (no-op outside a mesh + rules)."""
    return nn.with_logical_constraint(x, axes)
