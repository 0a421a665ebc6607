"""A model's size at a glance, without allocating it: `ffl.summary(cfg)`, `flaxformer-lite summary`.

    print(ffl.summary(ffl.load_config("gpt2_small")))

Parameter shapes come from `jax.eval_shape` of the model's init, so a config far larger
than the host's memory summarises in a second. The report holds:

- a table with one row per parameter (its module path and name), the layers of a stack
  folded into one row `layers[0..L-1]` with the per-layer shape times L; unrolled
  (`layers_0`, `layers_1`, ...) and scanned (one `layers` tree with a leading L axis)
  stacks give the same rows;
- the total, split into embeddings (the lookup tables: token, token-type, position and
  relative-position tables, found by their logical axis names) and the rest; encoders
  with an MLM head also show the count without it (what BertModel counts);
- model FLOPs per token at the config's sequence length, forward and training, from
  flaxformer_lite.models.flops (the formula MFU uses);
- memory at the config's batch size and sequence length, in float32 and bfloat16:
  parameters, gradients, AdamW's optimizer state (two moments per parameter) and
  activations.

Activation memory is an analytic count of the tensors the backward pass keeps, after
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4.1), adapted to this library's blocks and counted in elements, per token and layer:

- attention sublayer: the norm's input and output (2D), Q (N*H), K and V (2*K*H), the
  softmax probabilities (N*S for S keys: XLA attention materialises them; a flash kernel
  does not) and the context entering the output projection (N*H);
- cross-attention (encoder-decoder decoders): the same with Q over T and K, V over S;
- feed-forward sublayer: the norm's input and output (2D), then 2F (pre- and post-
  activation), or 3F gated (x W_in, x W_gate and their product);
- once per sequence: the embeddings' output (D per token), the final norm (2D) and the
  logits (V per decoder token).

Dropout masks are left out. remat_policy 'full' keeps each layer's input (D per token)
plus one layer recomputed during the backward pass; other named policies keep between
that and everything, and the no-remat figure is shown as the upper bound. Every tensor
is counted at the column's width (4 bytes float32, 2 bytes bfloat16). The estimate
counts what is kept, not the transient buffers of the backward pass (the gradients of the
logits and of the attention probabilities, fusion temporaries): XLA's compiled
`memory_analysis().temp_size_in_bytes` for a float32 gradient of gpt_tiny at batch 32 x
128 on CPU is 292 MiB against 139 MiB here, so budget about twice the figure for peak.
"""

from __future__ import annotations

import re
from typing import Optional, Union

import flax.linen as nn
import jax
from flax import traverse_util

from flaxformer_lite.config import Config, ModelConfig
from flaxformer_lite.models import build_model, dummy_inputs, flops
from flaxformer_lite.ops.ffn import is_gated

# Leading logical axis of a lookup table: these parameters are "embeddings".
EMBEDDING_AXES = ("vocab", "type_vocab", "positions", "relpos_buckets")
MLM_HEAD = ("mlm_transform", "mlm_norm", "mlm_bias")
_LAYER_KEY = re.compile(r"layers_(\d+)")
BYTES = {"float32": 4, "bfloat16": 2}


def parameter_rows(cfg: ModelConfig) -> list[dict]:
    """One dict per parameter (layers folded): path, shape (per layer), layers, count, embedding.

    Works from `jax.eval_shape`: nothing is allocated.
    """
    model = build_model(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(cfg)))["params"]
    shapes = traverse_util.flatten_dict(nn.unbox(boxed))
    axes = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    rows: dict[str, dict] = {}
    for key, leaf in shapes.items():
        spec = tuple(axes[key])
        shape, layers, parts = tuple(leaf.shape), {0}, []
        for part in key:
            if part == "layers" and spec[:1] == ("layers",):  # scanned: a leading L axis
                layers, shape, spec = set(range(shape[0])), shape[1:], spec[1:]
                parts.append("layers[*]")
            elif m := _LAYER_KEY.fullmatch(part):  # unrolled: one subtree per layer
                layers = {int(m.group(1))}
                parts.append("layers[*]")
            else:
                parts.append(part)
        path = "/".join(parts)
        row = rows.setdefault(path, {"path": path, "shape": shape, "layers": set(), "embedding": False})
        if row["shape"] != shape:
            raise ValueError(f"{path}: layers disagree on its shape ({row['shape']} and {shape})")
        row["layers"] |= layers
        row["embedding"] = len(shape) >= 2 and spec[:1] in {(a,) for a in EMBEDDING_AXES}
    out = []
    for row in sorted(rows.values(), key=lambda r: r["path"]):
        n = len(row["layers"])
        if "layers[*]" in row["path"]:
            row["path"] = row["path"].replace("layers[*]", f"layers[0..{n - 1}]" if n > 1 else "layers[0]")
        size = 1
        for d in row["shape"]:
            size *= d
        out.append({**row, "layers": n, "count": size * n})
    return out


def activation_elements(cfg: ModelConfig, batch: int, seq_len: int, target_len: Optional[int] = None) -> int:
    """Activation elements kept for the backward pass (the module docstring says what counts)."""
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    ffn = 2 * D + (3 if is_gated(cfg.activation) else 2) * F

    def attention(queries: int, keys: int) -> int:  # self-attention over `keys` == queries
        return queries * (2 * D + 2 * N * H + N * keys) + keys * 2 * K * H

    def stack(layers: int, tokens: int, per_layer: int) -> int:
        if cfg.remat_policy == "full":  # layer inputs, plus one layer live in the backward pass
            return layers * tokens * D + per_layer
        return layers * per_layer

    if cfg.family == "encoder_decoder":
        S, T = seq_len, target_len or seq_len
        encoder = stack(cfg.num_layers, S, attention(S, S) + S * ffn)
        decoder_layer = attention(T, T) + attention(T, S) + T * ffn
        decoder = stack(cfg.decoder_layers, T, decoder_layer)
        per_sequence = encoder + decoder + 3 * D * (S + T) + V * T
    else:
        T = seq_len
        per_sequence = stack(cfg.num_layers, T, attention(T, T) + T * ffn) + 3 * D * T
        if cfg.family == "decoder" or cfg.mlm_head:
            per_sequence += V * T
    return batch * per_sequence


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}FLOP"
    return f"{x:.3g} FLOP"


def _shape(row: dict) -> str:
    dims = "[" + ",".join(map(str, row["shape"])) + "]"
    return f"{row['layers']} x {dims}" if "layers[" in row["path"] else dims


def summary(
    cfg: Union[Config, ModelConfig],
    *,
    batch_size: Optional[int] = None,
    seq_len: Optional[int] = None,
    target_len: Optional[int] = None,
) -> str:
    """The report described in the module docstring, as text.

    Args:
      cfg: a whole Config (its data section gives batch size and lengths) or a ModelConfig.
      batch_size, seq_len, target_len: override the config's data.batch_size,
        data.seq_len and data.target_len (a ModelConfig alone: 1 and model.max_len).
    """
    name = getattr(cfg, "name", None)
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    data = cfg.data if isinstance(cfg, Config) else None
    B = batch_size or (data.batch_size if data else 1)
    T = seq_len or (data.seq_len if data else model_cfg.max_len)
    T_dec = target_len or (data.target_len if data else None) or T
    encdec = model_cfg.family == "encoder_decoder"

    rows = parameter_rows(model_cfg)
    total = sum(r["count"] for r in rows)
    embeddings = sum(r["count"] for r in rows if r["embedding"])
    lines = [f"{name or 'model'}: {model_cfg.family}, {total:,} parameters"]
    lines.append(f"  embeddings {embeddings:,} ({embeddings / total:.1%}), the rest {total - embeddings:,}")
    mlm = sum(r["count"] for r in rows if r["path"].split("/")[0] in MLM_HEAD)
    if mlm:
        lines.append(f"  without the MLM head ({', '.join(MLM_HEAD)}): {total - mlm:,}")
    lines.append("")
    width = max(len(r["path"]) for r in rows)
    shape_width = max(len(_shape(r)) for r in rows)
    lines.append(f"{'path':<{width}}  {'shape':<{shape_width}}  {'parameters':>13}  {'share':>6}")
    for r in rows:
        lines.append(f"{r['path']:<{width}}  {_shape(r):<{shape_width}}  {r['count']:>13,}  {r['count'] / total:>6.1%}")
    lines.append("")

    lengths = f"seq_len {T}" + (f", target_len {T_dec}" if encdec else "")
    target = T_dec if encdec else None
    per_token = flops.forward_flops_per_sequence(model_cfg, T, target) / flops.tokens_per_sequence(model_cfg, T, target)
    training = flops.training_flops_per_token(model_cfg, T, target)
    lines.append(f"FLOPs per token at {lengths} (flaxformer_lite.models.flops, as MFU): "
                 f"forward {_flops(per_token)}, training {_flops(training)}")
    lines.append("")

    activations = activation_elements(model_cfg, B, T, target)
    named_policy = model_cfg.remat_policy not in ("none", "full")
    label = "activations (estimate" + (", upper bound)" if named_policy else ")")
    items = [("parameters", total), ("gradients", total), ("AdamW state (2 moments)", 2 * total), (label, activations)]
    label_width = max(len(k) for k, _ in items) + 2
    lines.append(f"memory at batch {B}, {lengths}".ljust(label_width) + "".join(f"{d:>12}" for d in BYTES))
    for what, elements in items:
        lines.append(f"  {what}".ljust(label_width) + "".join(f"{_size(elements * b):>12}" for b in BYTES.values()))
    everything = sum(e for _, e in items)
    lines.append("  total".ljust(label_width) + "".join(f"{_size(everything * b):>12}" for b in BYTES.values()))
    return "\n".join(lines)
