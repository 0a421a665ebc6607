"""Read and write HuggingFace model folders: config.json + safetensors, and tokenizer.json.

    cfg, params = ffl.hf.load("path/to/hf_dir")      # BERT, RoBERTa, GPT-2, T5, LLaMA, Mistral
    out = model.apply(params, input_ids)              # model = ffl.build_model(cfg)
    ffl.hf.save(cfg, params, "out_dir")               # transformers' from_pretrained loads it
    tok = ffl.hf.load_tokenizer("path/to/hf_dir")     # tokenizer.json, through `tokenizers`

Only JSON and safetensors are read: pickled weights (pytorch_model.bin) are refused, never
opened. Local folders only; nothing is downloaded. Names and layouts are in families.py.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import pathlib
import shutil
import warnings
from typing import Any, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from flaxformer_lite.config import ConfigError, ModelConfig, validate_model
from flaxformer_lite.interop import families
from flaxformer_lite.interop.layout import HFError
from flaxformer_lite.models import build_model, dummy_inputs, stack_layers, unstack_layers

__all__ = ["HFError", "load", "load_tokenizer", "read_config", "save"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
PICKLED_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
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


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a folder (sharded or not); refuse pickle-only folders."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            # The index is data from elsewhere: it may name only files beside it.
            if pathlib.PurePath(name).name != name or not (folder / name).is_file():
                raise HFError(f"{index} names shard {name!r}, which is not a file in {folder}")
        return [folder / name for name in names]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    pickled = [name for name in PICKLED_FILES if (folder / name).exists()]
    pickled += [p.name for p in sorted(folder.glob("pytorch_model-*.bin"))]
    if pickled:
        raise HFError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}). Loading a pickle can run "
            "arbitrary code, so flaxformer_lite never opens one. Convert it once, in an environment you "
            "trust, to safetensors: `python -c \"from transformers import AutoModel; "
            "AutoModel.from_pretrained('DIR').save_pretrained('NEW_DIR')\"` (transformers writes "
            "model.safetensors; use the model's own class, e.g. AutoModelForCausalLM, to keep its head), "
            "or download the checkpoint's safetensors files from the Hub"
        )
    raise HFError(f"{folder} has no {WEIGHTS_FILE} or {INDEX_FILE}: nothing to load")


class _Checkpoint:
    """The tensors of a folder's safetensors files, read one at a time on demand."""

    def __init__(self, files: list[pathlib.Path], stack: contextlib.ExitStack):
        self._handles = {}
        self._file = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="numpy"))
            for name in handle.keys():
                if name in self._file:
                    raise HFError(f"tensor {name} appears in both {self._file[name].name} and {file.name}")
                self._file[name] = file
                self._handles[name] = handle

    def keys(self) -> set[str]:
        return set(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[name].get_slice(name).get_dtype()

    def where(self, name: str) -> str:
        return self._file[name].name

    def get(self, name: str) -> np.ndarray:
        return self._handles[name].get_tensor(name)


class _Arrays(dict):
    """In-memory tensors being exported, seen the way a checkpoint is."""

    def keys(self) -> set[str]:
        return set(super().keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return self[name].shape


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our flat parameter paths and shapes with layers unrolled (nothing allocated)."""
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    model = build_model(unrolled)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(unrolled)))["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(tree), sep="/").items()}


def load(path, *, skip: Iterable[str] = (), **runtime) -> tuple[ModelConfig, dict]:
    """(ModelConfig, {'params': ...}) of a local HF model folder.

    Args:
      path: folder with config.json and model.safetensors (or a sharded index).
      skip: prefixes of checkpoint tensors to drop knowingly, e.g. BERT's next-sentence
        head ("cls.seq_relationship."), which no model here has. Anything else the
        checkpoint holds beyond what config.json describes is an error.
      runtime: how to run the weights, not what they compute: any of RUNTIME_FIELDS,
        e.g. scan_layers=True, param_dtype="bfloat16".
    """
    unknown = set(runtime) - set(RUNTIME_FIELDS)
    if unknown:
        raise HFError(f"hf.load got {sorted(unknown)}; it accepts only {', '.join(RUNTIME_FIELDS)}")
    folder = _folder(path)
    hf = read_config(folder)
    try:
        family = families.family_for(hf.get("model_type"))
    except HFError as e:
        raise HFError(f"{folder / CONFIG_FILE}: {e}") from None
    files = _weight_files(folder)
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(files, stack)
        keys = ckpt.keys()
        base = family.prefix if any(k.startswith(family.prefix) for k in keys) else ""
        try:
            cfg, redundant = family.config_in(hf, ckpt, base)
            cfg = validate_model(dataclasses.replace(cfg, **runtime))
        except (HFError, ConfigError) as e:
            raise HFError(f"{folder / CONFIG_FILE}: {e}") from None
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
        dtype = np.dtype(jnp.dtype(cfg.param_dtype))
        flat = {}
        for m in maps:
            where = f"{folder / ckpt.where(m.hf)}: tensor {m.hf}"
            if ckpt.dtype(m.hf) not in _FLOAT_DTYPES:
                allowed = ", ".join(_FLOAT_DTYPES)
                raise HFError(f"{where} has dtype {ckpt.dtype(m.hf)}; weights must be floating point ({allowed})")
            ours = [shapes[p] for p in m.ours]
            if ckpt.shape(m.hf) != m.hf_shape(ours):
                raise HFError(
                    f"{where} has shape {ckpt.shape(m.hf)}, but config.json implies {m.hf_shape(ours)}: "
                    "the config and the weights disagree"
                )
            flat.update(zip(m.ours, m.to_ours(ckpt.get(m.hf).astype(dtype), ours)))
    if set(flat) != set(shapes):  # a map table out of step with the models: a bug here
        unmapped, extra = _listing(set(shapes) - set(flat)), _listing(set(flat) - set(shapes))
        raise HFError(f"internal: unmapped {unmapped}, extra {extra}")
    params = traverse_util.unflatten_dict({k: jnp.asarray(x) for k, x in flat.items()}, sep="/")
    return cfg, {"params": stack_layers(params) if cfg.scan_layers else params}


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
    out.update(head_dim=cfg.dim_per_head, num_kv_heads=cfg.kv_heads, num_decoder_layers=cfg.decoder_layers)
    unused = []
    if cfg.position != "relative":
        unused += ["relative_buckets", "relative_max_distance"]
    if cfg.position != "rope":
        unused.append("rope_theta")
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


def save(
    cfg: ModelConfig,
    params: Any,
    path,
    *,
    model_type: Optional[str] = None,
    tokenizer: Optional[str | pathlib.Path] = None,
) -> pathlib.Path:
    """Write config.json + model.safetensors (+ tokenizer.json) that transformers loads.

    Args:
      cfg, params: a model here; params as init_params/load return them ({'params': ...})
        or the inner tree; scanned or unrolled layers.
      path: output folder (created).
      model_type: HF family to write ("bert", "roberta", "gpt2", "llama", "mistral", "t5");
        default: bert for encoders, t5 for encoder-decoders, llama/mistral for RoPE
        decoders, gpt2 otherwise. A config the family cannot express is an error naming
        the field.
      tokenizer: a tokenizer.json (or a folder holding one) to copy beside the weights.

    Returns the folder.
    """
    model_type = model_type or families.infer_model_type(cfg)
    family = families.family_for(model_type)
    if tokenizer is not None:
        tokenizer_file = pathlib.Path(tokenizer)
        tokenizer_file = tokenizer_file / TOKENIZER_FILE if tokenizer_file.is_dir() else tokenizer_file
        if not tokenizer_file.is_file():
            raise HFError(f"tokenizer {tokenizer_file}: no such file; pass a tokenizer.json or a folder holding one")
    tree = params["params"] if isinstance(params, dict) and set(params) == {"params"} else params
    flat = traverse_util.flatten_dict(jax.device_get(unstack_layers(nn.unbox(tree))), sep="/")
    shapes = _expected_shapes(cfg)
    for p in sorted(set(shapes) | set(flat)):
        if p not in flat or p not in shapes or tuple(np.shape(flat[p])) != shapes[p]:
            got = np.shape(flat[p]) if p in flat else "absent"
            raise HFError(
                f"params {p}: {got}, but the config builds {shapes.get(p, 'no such parameter')}: "
                "params and config disagree"
            )
        if not jnp.issubdtype(flat[p].dtype, jnp.floating):
            raise HFError(f"params {p} has dtype {flat[p].dtype}; weights must be floating point")

    hf_config = family.config_out(cfg, model_type)
    architecture = family.architecture(cfg, model_type)
    base = "" if architecture in families.BASE_MODELS else family.prefix
    maps = family.maps(cfg, base, None)
    tensors = _Arrays(
        {m.hf: m.to_hf([np.asarray(flat[p]) for p in m.ours]) for m in maps if all(p in flat for p in m.ours)}
    )
    family.export_extras(cfg, tensors)
    try:
        back, _ = family.config_in({**hf_config, "model_type": model_type}, tensors, base)
    except HFError as e:
        raise HFError(f"cannot export to HF {model_type}: {e}") from None
    _check_round_trip(cfg, back, model_type)
    uncovered = set(flat) - {p for m in maps for p in m.ours}
    unfilled = {m.hf for m in maps} - set(tensors)
    if uncovered or unfilled:
        raise HFError(
            f"HF {model_type} has no place for params {_listing(uncovered) or '-'} and needs tensors "
            f"this model lacks: {_listing(unfilled) or '-'}"
        )

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = collections.Counter(str(x.dtype) for x in tensors.values())
    hf_config = {"architectures": [architecture], "model_type": model_type, **hf_config,
                 "dtype": dtypes.most_common(1)[0][0]}
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    # transformers checks this metadata key; "pt" is what its own files carry.
    save_file(dict(tensors), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
    return out
