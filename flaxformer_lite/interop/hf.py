"""Read and write HuggingFace model folders: config.json + safetensors, and tokenizer.json.

    cfg, params = ffl.hf.load("path/to/hf_dir")      # BERT, RoBERTa, GPT-2, T5, Llama, Mistral, Qwen, Gemma
    out = model.apply(params, input_ids)              # model = ffl.build_model(cfg)
    ffl.hf.save(cfg, params, "out_dir")               # transformers' from_pretrained loads it
    tok = ffl.hf.load_tokenizer("path/to/hf_dir")     # tokenizer.json, through `tokenizers`

Only JSON and safetensors are read: pickled weights (pytorch_model.bin) are refused, never
opened. Local folders only; nothing is downloaded. Names and layouts are in families.py.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import shutil
import threading
import warnings
from typing import Any, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxformer_lite.config import ConfigError, ModelConfig, ParallelConfig, validate_model
from flaxformer_lite.interop import families, weights
from flaxformer_lite.interop.layout import HFError
from flaxformer_lite.interop.weights import INDEX_FILE, WEIGHTS_FILE
from flaxformer_lite.layers import lora
from flaxformer_lite.models import build_model, dummy_inputs, param_logical_axes, stack_layers, unstack_layers
from flaxformer_lite.runtime import host
from flaxformer_lite.runtime import parallel as parallel_lib

__all__ = ["HFError", "copy_source_files", "is_hf_folder", "load", "load_tokenizer", "read_config",
           "read_model_config", "save"]

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# Files of an HF folder besides config.json and the weights that travel with the model:
# tokenizer (fast and legacy forms), special tokens, chat templates, generation settings,
# and sentence-transformers' module list and settings (its module folders travel too).
SOURCE_FILES = (
    TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
SOURCE_DIRS = ("additional_chat_templates",)
# A run directory keeps its HF source's config.json and SOURCE_FILES here, so exports
# write the same family and tokenizer back (and its tokenizer loads from here).
HF_SOURCE_DIR = "hf"
# In a run's HF_SOURCE_DIR: where the weights it started from live (`base_model`).
SOURCE_RECORD = "source.json"
# config.json keys an export writes only where the source had them (BERT has no bos/eos:
# its ids 1 and 2 are [unused0] and [unused1]).
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
# Settings of how we run the weights, not what they compute: load() accepts them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "scan_layers", "remat_policy")
# Settings for training from scratch; mapped where HF has them, not required to round-trip.
TRAINING_FIELDS = ("dropout_rate", "attention_dropout_rate", "initializer_range", "embedding_init_std")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# ---------------------------------------------------------------------------------- reading


def _folder(path) -> pathlib.Path:
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise HFError(
            f"{folder}: no such folder. hf.load reads a local HF model folder (config.json + "
            "*.safetensors) and downloads nothing: fetch it first, e.g. `huggingface-cli download "
            "NAME --local-dir DIR`"
        )
    return folder


def read_config(path) -> dict:
    """config.json of an HF model folder, as a dict."""
    file = _folder(path) / CONFIG_FILE
    if not file.is_file():
        raise HFError(f"{file} not found: an HF model folder needs its config.json")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFError(f"{file}: top level must be a JSON object")
    return hf


class _Arrays(dict):
    """Tensors being exported (weights.Pending), seen the way a checkpoint is."""

    def keys(self) -> set[str]:
        return set(super().keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return self[name].shape

    def get(self, name: str) -> np.ndarray:
        return self[name].make()


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our flat parameter paths and shapes with layers unrolled (nothing allocated).

    Traced with the layers scanned, then unstacked: one layer is traced for all, 4 to 6
    times faster than the unrolled model for a 16-layer Llama (0.08 to 0.14 s)."""
    scanned = dataclasses.replace(cfg, scan_layers=True)
    model = build_model(scanned)
    tree = jax.eval_shape(lambda: unstack_layers(nn.unbox(model.init(jax.random.key(0), *dummy_inputs(scanned)))))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree["params"], sep="/").items()}


def _layer_slots(paths: list[str]) -> dict[str, tuple[str, Optional[int]]]:
    """Unrolled parameter path -> (its path once stacked, its layer), as stack_layers places it."""
    ids = traverse_util.unflatten_dict({tuple(p.split("/")): np.int32(i) for i, p in enumerate(paths)})
    slots = {}
    for path, i in traverse_util.flatten_dict(stack_layers(ids), sep="/").items():
        i = np.asarray(i)
        for layer, j in enumerate(i.reshape(-1)):
            slots[paths[int(j)]] = (path, layer if i.ndim else None)
    return slots


def _place(values: np.ndarray, sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
    """A parameter's host buffer on its sharding, or on the default device, once there."""
    if sharding is None:  # a CPU device adopts an aligned buffer as it is
        placed = jax.device_put(values)
    else:  # each device (of this host) gets only its slice
        placed = jax.make_array_from_callback(values.shape, sharding, values.__getitem__)
    return placed.block_until_ready()  # before the host buffer goes


def _quantized(path: str, values: np.ndarray, cfg: ModelConfig, quantize: str, sharding) -> dict[str, jax.Array]:
    """{flat path: placed array} of one projection kernel stored as `quantize` (int8, nf4):
    the kernel and its scales, the int8 kernel on the float one's sharding, the rest
    replicated (nf4 blocks are not split)."""
    prefix, name = path.rpartition("/")[::2]
    lead = values.ndim - len(lora.kernel_shape(cfg, name))
    out = {}
    for part, value in lora.quantized_kernel(name, values, quantize, lead).items():
        target = sharding
        if sharding is not None and (part != name or quantize != "int8"):
            target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        out[f"{prefix}/{part}"] = _place(np.asarray(value), target)
    return out


def _read_params(ckpt: weights.Checkpoint, maps: list, cfg: ModelConfig, shapes: dict, shardings: Optional[dict],
                 quantize: Optional[str] = None) -> dict:
    """Our parameters, filled tensor by tensor from the checkpoint, cast to param_dtype and
    placed (on `shardings`, flat paths -> Sharding, else the default device) as each is done.
    With `quantize` (int8, nf4) each projection kernel is quantized as soon as it is read,
    so no float copy of the whole base is ever held.

    The checkpoint's reader converts a few chunks at once (one per core), so the parameters
    in host memory beyond those placed are the few being filled (a whole layer stack when
    layers are scanned), beside the read buffers.
    """
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    slots = _layer_slots(list(shapes)) if cfg.scan_layers else {p: (p, None) for p in shapes}
    pending = collections.Counter(path for path, _ in slots.values())
    final_shapes = {path: shapes[p] if layer is None else (pending[path],) + shapes[p]
                    for p, (path, layer) in slots.items()}
    # In the files' order, so a cold read goes through each file front to back; all layers
    # of a stacked parameter one after another, so each is finished and freed early.
    order = {name: i for i, name in enumerate(ckpt.file_order(m.hf for m in maps))}
    first = {}  # stacked path -> where its first tensor lies
    for m in maps:
        for p in m.ours:
            first[slots[p][0]] = min(first.get(slots[p][0], len(order)), order[m.hf])
    maps = {m.hf: m for m in sorted(maps, key=lambda m: (min(first[slots[p][0]] for p in m.ours), order[m.hf]))}
    lock = threading.Lock()
    buffers, outs, rows_left, params = {}, {}, {}, {}

    def targets(name: str) -> list[np.ndarray]:
        with lock:
            if name not in outs:
                for path in dict.fromkeys(slots[p][0] for p in maps[name].ours):
                    if path not in buffers:
                        buffers[path] = host.empty(final_shapes[path], dtype)
                outs[name] = [buffers[path] if layer is None else buffers[path][layer]
                              for path, layer in (slots[p] for p in maps[name].ours)]
                rows_left[name] = ckpt.rows(name)
            return outs[name]

    def consume(name: str, start: int, rows: np.ndarray) -> None:
        m = maps[name]
        m.rows_into(rows, start, targets(name))
        done = []
        with lock:
            rows_left[name] -= len(rows)
            if rows_left[name]:
                return
            del outs[name]
            for p in m.ours:
                pending[slots[p][0]] -= 1
            for path in dict.fromkeys(slots[p][0] for p in m.ours):
                if not pending[path]:
                    done.append((path, buffers.pop(path)))
        for path, values in done:
            sharding = None if shardings is None else shardings[path]
            if quantize and path.rpartition("/")[2] in lora.AXES:
                params.update(_quantized(path, values, cfg, quantize, sharding))
            else:
                params[path] = _place(values, sharding)

    ckpt.read(list(maps), consume)
    return traverse_util.unflatten_dict(params, sep="/")


def load(
    path,
    *,
    skip: Iterable[str] = (),
    mesh: Optional[jax.sharding.Mesh] = None,
    parallel: Optional[ParallelConfig] = None,
    quantize: Optional[str] = None,
    **runtime,
) -> tuple[ModelConfig, dict]:
    """(ModelConfig, {'params': ...}) of a local HF model folder.

    Tensors are read one at a time (sharded checkpoints too), converted, cast to
    param_dtype and placed before the next is read, so host memory holds one tensor
    beyond the parameters themselves (docs/interop.md, "Large checkpoints").

    Args:
      path: folder with config.json and model.safetensors (or a sharded index).
      skip: prefixes of checkpoint tensors to drop knowingly, e.g. BERT's next-sentence
        head ("cls.seq_relationship."), which no model here has. Anything else the
        checkpoint holds beyond what config.json describes is an error.
      mesh: place each parameter on this mesh, sharded by its logical axes under
        `parallel`'s rules (default ParallelConfig()); without it, on the default device.
      parallel: the rules for `mesh`.
      quantize: int8 or nf4: store the projection kernels so (a LoRA run's frozen base,
        model.lora.base_dtype; layers/lora.py), each quantized as it is read.
      runtime: how to run the weights, not what they compute: any of RUNTIME_FIELDS,
        e.g. scan_layers=True, param_dtype="bfloat16" (float32 files load into bfloat16).
    """
    unknown = set(runtime) - set(RUNTIME_FIELDS)
    if unknown:
        raise HFError(f"hf.load got {sorted(unknown)}; it accepts only {', '.join(RUNTIME_FIELDS)}")
    folder = _folder(path)
    hf, family, ckpt, base, cfg, redundant = _open(folder, runtime)
    keys = ckpt.keys()
    _warn_unusable_ids(folder / CONFIG_FILE, cfg)
    maps = family.maps(cfg, base, keys)
    wanted = {m.hf for m in maps}
    missing = wanted - keys
    unexpected = {
        k for k in keys - wanted - redundant
        if not families.is_buffer(family, k) and not k.startswith(tuple(skip))
    }
    if missing or unexpected:
        raise HFError(
            f"{folder}: the tensors do not match what config.json describes for "
            f"{hf['model_type']}:\n  missing: {_listing(missing) or '-'}\n  unexpected: "
            f"{_listing(unexpected) or '-'}\nA missing tensor means a different or truncated "
            "checkpoint. An unexpected one is a head or option not supported here; drop it "
            "knowingly with hf.load(..., skip=('PREFIX.',))"
        )
    shapes = _expected_shapes(cfg)
    for m in maps:  # every tensor checked before any is read
        where = f"{ckpt.where(m.hf)}: tensor {m.hf}"
        if ckpt.dtype(m.hf) not in _FLOAT_DTYPES:
            allowed = ", ".join(_FLOAT_DTYPES)
            raise HFError(f"{where} has dtype {ckpt.dtype(m.hf)}; weights must be floating point ({allowed})")
        ours = [shapes[p] for p in m.ours]
        if ckpt.shape(m.hf) != m.hf_shape(ours):
            raise HFError(
                f"{where} has shape {ckpt.shape(m.hf)}, but config.json implies {m.hf_shape(ours)}: "
                "the config and the weights disagree"
            )
    mapped = collections.Counter(p for m in maps for p in m.ours)
    if set(mapped) != set(shapes) or max(mapped.values()) > 1:  # a map table out of step with the models: a bug here
        unmapped, extra = _listing(set(shapes) - set(mapped)), _listing(set(mapped) - set(shapes))
        twice = _listing(p for p, n in mapped.items() if n > 1)
        raise HFError(f"internal: unmapped {unmapped or '-'}, extra {extra or '-'}, mapped twice {twice or '-'}")
    shardings = None
    if mesh is not None:
        specs = parallel_lib.logical_to_sharding(mesh, parallel or ParallelConfig(), param_logical_axes(cfg))
        shardings = traverse_util.flatten_dict(specs["params"], sep="/")
    if quantize not in (None, *lora.QUANTIZED):
        raise HFError(f"hf.load got quantize={quantize!r}; use one of {', '.join(lora.QUANTIZED)} or None")
    params = _read_params(ckpt, maps, cfg, shapes, shardings, quantize)
    host.release_free_memory()  # the tuned malloc keeps freed blocks: the copies made for a mesh's slices
    return cfg, {"params": params}


def _open(folder: pathlib.Path, runtime: dict):
    """(config.json, Family, Checkpoint, base prefix, ModelConfig, redundant tensors) of a folder."""
    hf = read_config(folder)
    try:
        family = families.family_for(hf.get("model_type"))
    except HFError as e:
        raise HFError(f"{folder / CONFIG_FILE}: {e}") from None
    ckpt = weights.open_checkpoint(folder)
    base = family.prefix if any(k.startswith(family.prefix) for k in ckpt.keys()) else ""
    try:
        cfg, redundant = family.config_in(hf, ckpt, base)
        cfg = validate_model(dataclasses.replace(cfg, **runtime))
    except (HFError, ConfigError) as e:
        raise HFError(f"{folder / CONFIG_FILE}: {e}") from None
    return hf, family, ckpt, base, cfg, redundant


def read_model_config(path, **runtime) -> ModelConfig:
    """The ModelConfig `load` returns, from config.json and the tensors' names and shapes;
    no tensor is read (what `train --init-from HF_DIR` builds its run config from)."""
    return _open(_folder(path), runtime)[4]


def _warn_unusable_ids(config_file: pathlib.Path, cfg: ModelConfig) -> None:
    """Warn about special ids outside the vocabulary (HF's GPT2Config defaults give eos and
    bos 50256 whatever vocab_size is). The model can never produce such an id, so generate
    ignores it: no stop on an unusable eos, padding with 0 for an unusable pad."""
    fields = ["pad_token_id", "bos_token_id", "eos_token_id"]
    if cfg.family == "encoder_decoder":
        fields.append("decoder_start_token_id")
    bad = [f"{name}={getattr(cfg, name)}" for name in fields if not 0 <= getattr(cfg, name) < cfg.vocab_size]
    if bad:
        warnings.warn(
            f"{config_file}: {', '.join(bad)} outside the vocabulary [0, {cfg.vocab_size}): generate "
            "ignores them (no stop on such an eos, padding with 0); set ids below vocab_size there "
            "to use them",
            stacklevel=3,
        )


def load_tokenizer(path):
    """The folder's tokenizer as a flaxformer_lite.data HFTokenizer: tokenizer.json, with its
    special-token roles from tokenizer_config.json, special_tokens_map.json,
    generation_config.json and config.json."""
    folder = _folder(path)
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        legacy = ("vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model")
        others = [name for name in legacy if (folder / name).exists()]
        found = f" (it has {', '.join(others)}, which are not read here)" if others else ""
        raise HFError(
            f"{folder} has no {TOKENIZER_FILE}{found}. Write one with transformers: "
            "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) saves tokenizer.json for fast tokenizers"
        )
    # Deferred: the data package pulls in grain, which `import flaxformer_lite` need not pay for.
    from flaxformer_lite.data import load_tokenizer as load_data_tokenizer

    return load_data_tokenizer(folder)


# ---------------------------------------------------------------------------------- writing


def _runtime_free(cfg: ModelConfig) -> dict:
    """What the weights compute, in a form two equivalent configs share."""
    out = dataclasses.asdict(cfg)
    for key in RUNTIME_FIELDS + TRAINING_FIELDS:
        del out[key]
    out.update(head_dim=cfg.dim_per_head, num_kv_heads=cfg.kv_heads, num_decoder_layers=cfg.decoder_layers,
               attention_types=cfg.layer_attention_types())
    unused = [] if "local" in out["attention_types"] else ["sliding_window"]
    if cfg.position != "relative":
        unused += ["relative_buckets", "relative_max_distance"]
    if cfg.position != "rope":
        unused += ["rope_theta", "rope_scaling", "rope_local_theta"]
    if cfg.family != "encoder_decoder":
        unused += ["num_decoder_layers", "share_embeddings", "decoder_start_token_id"]
    if cfg.family == "encoder":
        unused += ["tie_embeddings", "tied_logits_scale"]
    else:
        unused.append("type_vocab_size")
    for key in unused:
        del out[key]
    return out


def _check_round_trip(cfg: ModelConfig, back: ModelConfig, model_type: str) -> None:
    ours, theirs = _runtime_free(cfg), _runtime_free(back)
    diffs = [f"model.{k}={ours[k]!r} (HF {model_type} would read back {theirs.get(k)!r})"
             for k in ours if ours[k] != theirs.get(k)]
    if diffs:
        raise HFError(
            f"cannot export to HF {model_type} without changing the model: " + "; ".join(diffs)
            + ". Pick another model_type, or a model config that family can express"
        )


def _unrolled(tree: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, weights.Pending]:
    """Our parameters by unrolled path, from a scanned or unrolled tree, each fetched to the
    host only when asked for (one layer of a stacked leaf at a time). Checked against the
    shapes the config builds."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    stacked = any("layers" in p.split("/") for p in flat)
    slots = _layer_slots(list(shapes)) if stacked else {p: (p, None) for p in shapes}
    out = {}
    for p, (path, layer) in slots.items():
        if path in flat:
            x = flat[path]
            shape = tuple(np.shape(x))
            if layer is None:
                out[p] = weights.Pending(shape, np.dtype(x.dtype), lambda x=x: np.asarray(jax.device_get(x)))
            elif shape and layer < shape[0]:
                out[p] = weights.Pending(shape[1:], np.dtype(x.dtype), lambda x=x, i=layer: np.asarray(jax.device_get(x[i])))
    used = {slots[p][0] for p in out}
    depth = collections.Counter(path for path, layer in slots.values() if layer is not None)
    for path, layers in depth.items():
        if path in flat and np.shape(flat[path])[:1] != (layers,):
            raise HFError(f"params {path}: {np.shape(flat[path])}, but the config stacks {layers} layers there: "
                          "params and config disagree")
    for p in sorted(set(shapes) | set(out)):
        if p not in out or out[p].shape != shapes[p]:
            got = out[p].shape if p in out else "absent"
            raise HFError(f"params {p}: {got}, but the config builds {shapes[p]}: params and config disagree")
        if not jnp.issubdtype(out[p].dtype, jnp.floating):
            raise HFError(f"params {p} has dtype {out[p].dtype}; weights must be floating point")
    for path in sorted(set(flat) - used):
        raise HFError(f"params {path}: {np.shape(flat[path])}, but the config builds no such parameter: "
                      "params and config disagree")
    return out


def save(
    cfg: ModelConfig,
    params: Any,
    path,
    *,
    model_type: Optional[str] = None,
    tokenizer: Optional[str | pathlib.Path] = None,
    max_shard_size: int | str = weights.DEFAULT_MAX_SHARD_SIZE,
    source: Optional[str | pathlib.Path] = None,
) -> pathlib.Path:
    """Write config.json + model.safetensors (+ tokenizer files) that transformers loads.

    Tensors are converted and written one at a time, a scanned layer stack one layer at
    a time: host memory holds one tensor beyond the parameters.

    Args:
      cfg, params: a model here; params as init_params/load return them ({'params': ...})
        or the inner tree; scanned or unrolled layers.
      path: output folder (created).
      model_type: HF family to write ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2",
        "qwen3", "gemma2", "gemma3_text", "t5"); default: bert for encoders, t5 for
        encoder-decoders, for RoPE decoders the family their options name
        (families.infer_model_type), gpt2 otherwise. A config the family cannot express is an error naming
        the field.
      tokenizer: a tokenizer.json (or a folder holding one) to copy beside the weights.
      max_shard_size: above this many bytes (an int, or "2GB", "500MB", "1GiB"), write
        shards model-0000i-of-0000n.safetensors and model.safetensors.index.json as
        transformers does; a tensor larger than this gets a shard to itself.
      source: the HF folder the model came from (a run's `hf/`): its SOURCE_FILES travel
        (tokenizer_config.json, chat template, generation_config.json, sentence-transformers
        modules, ...), and config.json writes the token ids it had, and only those.

    Returns the folder.
    """
    model_type = model_type or families.infer_model_type(cfg)
    family = families.family_for(model_type)
    max_shard_bytes = weights.parse_size(max_shard_size)
    if tokenizer is not None:
        tokenizer_file = pathlib.Path(tokenizer)
        tokenizer_file = tokenizer_file / TOKENIZER_FILE if tokenizer_file.is_dir() else tokenizer_file
        if not tokenizer_file.is_file():
            raise HFError(f"tokenizer {tokenizer_file}: no such file; pass a tokenizer.json or a folder holding one")
    tree = params["params"] if isinstance(params, dict) and set(params) == {"params"} else params
    shapes = _expected_shapes(cfg)
    ours = _unrolled(nn.unbox(tree), shapes)

    hf_config = family.config_out(cfg, model_type)
    architecture = family.architecture(cfg, model_type)
    base = "" if architecture in families.BASE_MODELS else family.prefix
    maps = family.maps(cfg, base, None)
    tensors = _Arrays({
        m.hf: weights.Pending(
            m.hf_shape([ours[p].shape for p in m.ours]),
            np.result_type(*(ours[p].dtype for p in m.ours)),
            lambda m=m: m.to_hf([ours[p].make() for p in m.ours]),
        )
        for m in maps if all(p in ours for p in m.ours)
    })
    family.export_extras(cfg, tensors)
    try:
        back, _ = family.config_in({**hf_config, "model_type": model_type}, tensors, base)
    except HFError as e:
        raise HFError(f"cannot export to HF {model_type}: {e}") from None
    _check_round_trip(cfg, back, model_type)
    uncovered = set(ours) - {p for m in maps for p in m.ours}
    unfilled = {m.hf for m in maps} - set(tensors)
    if uncovered or unfilled:
        raise HFError(
            f"HF {model_type} has no place for params {_listing(uncovered) or '-'} and needs tensors "
            f"this model lacks: {_listing(unfilled) or '-'}"
        )

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = collections.Counter(str(x.dtype) for x in tensors.values())
    hf_config = {"architectures": [architecture], "model_type": model_type, **_source_ids(hf_config, source, cfg),
                 "dtype": dtypes.most_common(1)[0][0]}
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    weights.write(out, tensors, max_shard_bytes, total_parameters=sum(math.prod(x.shape) for x in ours.values()))
    if tokenizer is not None:
        shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
    if source is not None:
        copy_source_files(source, out)
    return out


# ---------------------------------------------------------------------------------- source files


def is_hf_folder(path) -> bool:
    """True for a folder holding an HF config.json (not a run directory)."""
    return (pathlib.Path(path) / CONFIG_FILE).is_file()


def copy_source_files(source, out, *, with_config: bool = False) -> list[str]:
    """Copy an HF folder's SOURCE_FILES, SOURCE_DIRS and sentence-transformers module folders
    into `out` (created); config.json too if `with_config`. Returns the names copied."""
    source, out = _folder(source), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in (CONFIG_FILE,) * with_config + SOURCE_FILES if (source / n).is_file()]
    for name in names:
        shutil.copyfile(source / name, out / name)
    dirs = list(SOURCE_DIRS)
    if (source / "modules.json").is_file():
        try:
            modules = json.loads((source / "modules.json").read_text())
            dirs += [m["path"] for m in modules if m.get("path")]
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise HFError(f"{source / 'modules.json'}: not a sentence-transformers module list ({e})") from None
    for name in dirs:
        # modules.json is data from elsewhere: it may name only folders inside the source.
        if pathlib.PurePath(name).name != name:
            raise HFError(f"{source / 'modules.json'} names module folder {name!r}, which is not a folder name")
        if (source / name).is_dir():
            shutil.copytree(source / name, out / name, dirs_exist_ok=True, symlinks=False)
            names.append(name + "/")
    return names


def keep_source(source, kept) -> list[str]:
    """A run's copy of its HF source in `kept` (WORKDIR/hf): copy_source_files with
    config.json, and SOURCE_RECORD naming the weights' folder (carried over when `source`
    is itself a run's copy), so that an adapter export can point at its base."""
    names = copy_source_files(source, kept, with_config=True)
    record = {"base_model": base_model(source) or _model_id(pathlib.Path(source))}
    (pathlib.Path(kept) / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return names


def base_model(folder) -> Optional[str]:
    """The base model a run's HF_SOURCE_DIR records (`keep_source`), None if none."""
    path = pathlib.Path(folder) / SOURCE_RECORD
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("base_model")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise HFError(f"{path}: not a JSON object with base_model ({e}); delete it to export without one") from None
    return value if isinstance(value, str) else None


def _model_id(folder: pathlib.Path) -> str:
    """The Hub id of a folder in the HF cache (.../models--ORG--NAME/snapshots/REV), else
    the folder's absolute path: what transformers and peft load a base from."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name[len("models--"):].replace("--", "/")
    return str(folder)


def _source_ids(hf_config: dict, source, cfg: ModelConfig) -> dict:
    """hf_config with the token ids its source had (the source's values, lists kept), no others.

    With no source, an encoder's bos/eos are dropped: BERT-style configs have none."""
    out = {k: v for k, v in hf_config.items() if k not in TOKEN_ID_KEYS}
    if source is not None and (pathlib.Path(source) / CONFIG_FILE).is_file():
        had = read_config(source)
        out.update({k: had[k] for k in TOKEN_ID_KEYS if k in had})
        return out
    dropped = ("bos_token_id", "eos_token_id") if cfg.family == "encoder" else ()
    out.update({k: v for k, v in hf_config.items() if k in TOKEN_ID_KEYS and k not in dropped})
    return out
