"""LoRA adapters (Hu et al. 2021): low-rank updates beside frozen projections.

A targeted projection `name` of a module (cfg.lora.targets: query, key, value, out of
attention; wi, wg, wo of the FFN) gets two parameters beside its kernel:

    {name}_lora_a  [in..., R]   random (PEFT's init: uniform, bound 1/sqrt(fan_in))
    {name}_lora_b  [R, out...]  zero, so a fresh adapter changes nothing

and the projection adds (alpha / R) * dropout(x) A B to x W, computed as two thin
products: the [in, out] update is never formed while training or decoding. `merge`
folds adapters into their kernels (export, and the test that both forwards agree).

With lora.base_dtype=int8, `quantize_base` stores every projection kernel as int8 with
a float32 scale per output channel (`{name}_scale`, max |w| / 127 over the input axes);
with nf4, as QLoRA's 4-bit NormalFloat codes with a float32 absmax per block of 64
(`{name}_absmax`; ops/quant.py). layers.common.param dequantizes either as it is read,
inside the layer (ops.tied), so only one layer's kernels exist in the compute dtype.

Many adapters in one batch (serving): a model applied with a `lora_rows` collection
(ROWS) beside its params adds to each row of the batch its own adapter's x A B. ROWS
holds a table of adapters (`row_table`), `{name}_lora_a` [E, in..., R] and
`{name}_lora_b` [E, R, out...], each entry zero-padded to one rank R with its scale
folded into B (`row_weights`), so adapters of different ranks compute exactly what they
compute alone; and `{name}_lora_rows` [B, E], which entry each row uses (none: the base).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.layers.common import DTYPES

SUFFIXES = ("_lora_a", "_lora_b")
ROWS = "lora_rows"  # the collection of per-row adapters (see the module docstring)
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


def adapted(module: nn.Module, cfg: ModelConfig, name: str) -> bool:
    """True when projection `name` of `module` gets an adapter: cfg's, or per-row ones."""
    return targets(cfg, name) or module.has_variable(ROWS, f"{name}_lora_a")


def delta(module: nn.Module, name: str, x: jax.Array, out_shape: tuple[int, ...], cfg: ModelConfig, *,
          deterministic: bool) -> Optional[jax.Array]:
    """(alpha / R) * dropout(x) A B for projection `name` of `module` (its parameters are
    created there), shaped x's leading axes + out_shape; None if the projection has no
    adapter. x's trailing axes are the projection's input axes. Per-row adapters (ROWS),
    where the model is applied with them, take the place of cfg's."""
    if module.has_variable(ROWS, f"{name}_lora_a"):
        a, b, rows_BE = (module.get_variable(ROWS, f"{name}_lora_{part}") for part in ("a", "b", "rows"))
        return _row_delta(x, a, b, rows_BE, out_shape)
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


def _row_delta(x, a, b, rows_BE, out_shape: tuple[int, ...]) -> jax.Array:
    """x A_e B_e for each row of x [B, ..., in...] and the entry e its row of rows_BE
    (bool [B, E]) picks, of a [E, in..., R] and b [E, R, out...]; zero where none.

    Every entry's x A_e is computed and those a row does not use are zeroed (not
    multiplied by 0, which would carry a NaN across rows): the table is read once however
    many rows there are, where gathering each row's A and B (punica's BGMV without its
    kernel) would copy B of them on every call (docs/serving.md, "Many adapters")."""
    B, E, R = x.shape[0], a.shape[0], a.shape[-1]
    n_in = a.ndim - 2
    compute = x.dtype
    x_BTI = x.reshape(B, -1, math.prod(a.shape[1:-1]))
    h_BTER = jnp.einsum("BTI,EIR->BTER", x_BTI, a.reshape(E, -1, R).astype(compute))
    h_BTER = jnp.where(rows_BE[:, None, :, None], h_BTER, 0)
    out_BTO = jnp.einsum("BTER,ERO->BTO", h_BTER, b.reshape(E, R, -1).astype(compute))
    return out_BTO.reshape(x.shape[:x.ndim - n_in] + tuple(out_shape))


def rows(table: dict, entry_B: jax.Array) -> dict:
    """The ROWS collection for a batch whose row b uses entry entry_B[b] - 1 of `table`
    (a row_table; 0: no adapter, the base)."""
    flat = traverse_util.flatten_dict(table)
    rows_BE = jax.nn.one_hot(entry_B - 1, next(iter(flat.values())).shape[0], dtype=bool)
    out = dict(flat)
    for key in flat:
        if str(key[-1]).endswith("_lora_a"):
            out[key[:-1] + (str(key[-1])[: -len("_a")] + "_rows",)] = rows_BE
    return traverse_util.unflatten_dict(out)


def row_table(cfg: ModelConfig, params: Any, names: tuple[str, ...], size: int, rank: int, dtype=jnp.float32) -> dict:
    """Zero per-row adapters for every projection kernel of `params` ({'params': ...} or
    its tree; unrolled layers) named in `names`: a nested dict, as ROWS holds them, of
    `{name}_lora_a` [size, in..., rank] and `{name}_lora_b` [size, rank, out...]."""
    tree = params["params"] if isinstance(params, dict) and set(params) == {"params"} else params
    out = {}
    for key, leaf in traverse_util.flatten_dict(tree).items():
        name = str(key[-1])
        if name in names and tuple(leaf.shape) == kernel_shape(cfg, name):
            n_in = len(AXES[name][0])
            out[key[:-1] + (f"{name}_lora_a",)] = jnp.zeros((size, *leaf.shape[:n_in], rank), dtype)
            out[key[:-1] + (f"{name}_lora_b",)] = jnp.zeros((size, rank, *leaf.shape[n_in:]), dtype)
    return traverse_util.unflatten_dict(out)


def row_weights(adapters: Any, scale: float, rank: int) -> dict:
    """One adapter's entry of a row_table (a flat {path: array} dict, numpy float32): each
    A zero-padded to `rank` columns, each B scaled by `scale` (alpha / r) and zero-padded
    to `rank` rows. The padding adds exactly zero to x A B."""
    tree = adapters["params"] if isinstance(adapters, dict) and set(adapters) == {"params"} else adapters
    out = {}
    for key, x in traverse_util.flatten_dict(tree).items():
        x = np.asarray(jax.device_get(x), np.float32)
        if str(key[-1]).endswith("_lora_a"):
            out[key] = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, rank - x.shape[-1])])
        else:
            out[key] = np.pad(x * np.float32(scale), [(0, rank - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return out


QUANTIZED = {"int8": "_scale", "nf4": "_absmax"}  # base_dtype -> suffix of the array beside the kernel


def kernel_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The [in..., out...] shape of projection `name`'s kernel in one layer of cfg."""
    sizes = {"embed": cfg.d_model, "heads": cfg.num_heads, "kv_heads": cfg.kv_heads,
             "head_dim": cfg.dim_per_head, "mlp": cfg.d_ff}
    return tuple(sizes[axis] for axes in AXES[name] for axis in axes)


def quantized_kernel(name: str, w: Any, base_dtype: str, lead: int = 0) -> dict[str, Any]:
    """{name: stored kernel, name + suffix: its scales} of projection `name`'s float kernel
    w (`lead` leading layer axes): int8 per output channel or nf4 per block of 64."""
    if base_dtype == "nf4":
        if lead:  # layer by layer: quantizing takes several float32 temporaries of its input's size
            parts = [quantized_kernel(name, w[i], base_dtype, lead - 1) for i in range(w.shape[0])]
            return {k: jnp.stack([part[k] for part in parts]) for k in parts[0]}
        codes, absmax = ops.nf4_quantize(w)
        return {name: codes, f"{name}_absmax": absmax}
    n_in = len(AXES[name][0])
    q, scale = ops.int8_quantize(w, tuple(range(lead, lead + n_in)))
    return {name: q, f"{name}_scale": scale}


def quantize_base(params: Any, cfg: ModelConfig) -> Any:
    """params with the projection kernels stored as cfg.lora.base_dtype says if that is
    int8 or nf4 (boxed or plain leaves; kernels already quantized are kept); else params."""
    base_dtype = cfg.lora.base_dtype
    if not (cfg.lora.rank and base_dtype in QUANTIZED):
        return params
    flat = traverse_util.flatten_dict(params)
    out = dict(flat)
    for key, leaf in flat.items():
        name = str(key[-1])
        if name not in AXES or any(key[:-1] + (name + suffix,) in flat for suffix in QUANTIZED.values()):
            continue
        boxed = isinstance(leaf, nn.Partitioned)
        w = leaf.value if boxed else leaf
        lead = w.ndim - len(kernel_shape(cfg, name))  # a scanned stack's layers axis
        for part, value in quantized_kernel(name, w, base_dtype, lead).items():
            if boxed:  # int8 scales keep the output axes' names; nf4 blocks are not split
                names = leaf.names[:lead] + (
                    leaf.names[lead + len(AXES[name][0]):] if base_dtype == "int8" else (None,) * (value.ndim - lead))
                value = leaf.replace(value=value, names=names)
            out[key[:-1] + (part,)] = value
    return traverse_util.unflatten_dict(out)


def dequantized(flat: dict, key: tuple, cfg: ModelConfig, dtype=jnp.float32) -> jax.Array:
    """The kernel at `key` of a flat params dict in `dtype`, dequantized if it is stored
    quantized (`{name}_scale` or `{name}_absmax` beside it)."""
    name = str(key[-1])
    kernel, shape = flat[key], kernel_shape(cfg, name) if name in AXES else ()
    if (absmax := flat.get(key[:-1] + (f"{name}_absmax",))) is not None:
        return ops.nf4_dequantize(kernel, absmax, shape, dtype)
    if (scale := flat.get(key[:-1] + (f"{name}_scale",))) is not None:
        lead = kernel.ndim - len(shape)
        return ops.int8_dequantize(kernel, scale, tuple(range(lead, lead + len(AXES[name][0]))), dtype)
    return jnp.asarray(kernel, dtype)


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




def merge(params: Any, cfg: ModelConfig) -> Any:
    """params with each adapter folded into its kernel (W + (alpha/R) A B, in W's dtype) and
    the adapters dropped: a plain model of cfg without LoRA. Scanned layers (a leading
    layers axis on both) merge layer by layer. A quantized base comes out in param_dtype."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k) and not str(k[-1]).endswith(tuple(QUANTIZED.values()))}
    for key in list(out):
        if any(key[:-1] + (f"{key[-1]}{suffix}",) in flat for suffix in QUANTIZED.values()):
            out[key] = dequantized(flat, key, cfg, DTYPES[cfg.param_dtype])
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
