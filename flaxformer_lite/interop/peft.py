"""LoRA adapters out as an HF PEFT folder: adapter_config.json + adapter_model.safetensors.

    peft.save_adapters(cfg.model, params, "adapter/", model_type="llama")
    # then, in PyTorch:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "adapter/")

Names follow PEFT's for the transformers model of the family
(base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight ...), taken from the
same tensor maps `hf.save` writes the base with. Our A [in..., R] and B [R, out...] are
a kernel's input and output halves, so each converts as a torch Linear does: lora_A.weight
[R, in], lora_B.weight [out, R]. PEFT scales by lora_alpha / r, as model.lora does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Optional

import jax
import numpy as np
from flax import traverse_util

from flaxformer_lite.config import LoraConfig, ModelConfig
from flaxformer_lite.interop import families
from flaxformer_lite.interop.layout import HFError, Map
from flaxformer_lite.layers import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the ...ForCausalLM model as base_model.model


def _per_layer(adapters: dict) -> dict[str, np.ndarray]:
    """Adapters by unrolled '/' path (decoder/layers_3/...), scanned stacks split by layer."""
    out = {}
    for path, x in traverse_util.flatten_dict(adapters, sep="/").items():
        x = np.asarray(jax.device_get(x), np.float32)
        parts = path.split("/")
        if "layers" in parts:  # nn.scan stacks layers on a leading axis under `layers`
            i = parts.index("layers")
            out.update({"/".join(parts[:i] + [f"layers_{n}"] + parts[i + 1:]): x[n] for n in range(x.shape[0])})
        else:
            out[path] = x
    return out


def save_adapters(cfg: ModelConfig, params: Any, path, *, model_type: Optional[str] = None,
                  base_model: Optional[str] = None) -> pathlib.Path:
    """Write the adapters of `params` (a model of cfg with model.lora.rank > 0) as a PEFT folder.

    model_type: the HF family of the base (default: as hf.save infers it); its projections
    must be separate torch Linears (Llama, Mistral and kin; not GPT-2's fused c_attn).
    base_model: written as base_model_name_or_path (PEFT's pointer to the base; optional).
    """
    if not cfg.lora.rank:
        raise HFError("the model has no LoRA adapters (model.lora.rank=0): export it with --to-hf instead")
    model_type = model_type or families.infer_model_type(cfg)
    family = families.family_for(model_type)
    plain = dataclasses.replace(cfg, lora=LoraConfig())
    linear = {m.ours[0]: m for m in family.maps(plain, family.prefix, None)
              if m.kind == "linear" and len(m.ours) == 1 and not m.row_offset}
    tree = params["params"] if isinstance(params, dict) and set(params) == {"params"} else params
    ours = _per_layer(lora.split(tree)[0])
    tensors, modules = {}, set()
    for a_path in sorted(p for p in ours if p.endswith("_lora_a")):
        kernel = a_path[: -len("_lora_a")]
        if kernel not in linear:
            raise HFError(
                f"HF {model_type} has no separate torch Linear for {kernel}, so PEFT cannot hold its adapter: "
                "target other projections (model.lora.targets) or export merged weights with --to-hf"
            )
        m = linear[kernel]
        module = m.hf.removesuffix(".weight")
        a_hf = Map(m.hf, (a_path,), "linear", m.in_axes).to_hf([ours[a_path]])
        b_hf = Map(m.hf, (kernel + "_lora_b",), "linear", 1).to_hf([ours[kernel + "_lora_b"]])
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_hf)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_hf)
        modules.add(module.rsplit(".", 1)[-1])
    from safetensors.numpy import save_file

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    # safetensors creates its file 0600; give it the mode every other file here gets (umask's).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / WEIGHTS_FILE, 0o666 & ~umask)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout, "target_modules": sorted(modules), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "base_model_name_or_path": base_model,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


# PEFT options that change what the adapters compute, which model.lora cannot express.
_REFUSED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def load_adapters(cfg: ModelConfig, params: Any, path, *, model_type: Optional[str] = None) -> tuple[ModelConfig, dict]:
    """(cfg with model.lora from the folder, params with its adapters beside the base's).

    `params` is the base model (hf.load's, unrolled layers); the folder is a PEFT LoRA
    adapter for that HF family, as `save_adapters` writes or peft's save_pretrained does.
    Options model.lora cannot express (DoRA, rsLoRA, per-layer ranks, trained biases or
    extra modules) are refused by name.
    """
    from safetensors.numpy import load_file

    folder = pathlib.Path(path)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise HFError(f"{folder}: not a PEFT adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE}): {e}") from None
    where = folder / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise HFError(f"{where}: peft_type={config.get('peft_type')!r}; only LORA adapters load here")
    for key, plain in _REFUSED.items():
        if config.get(key, plain) not in (plain, None, {}):
            raise HFError(f"{where}: {key}={config[key]!r} changes what the adapters compute; model.lora has no such option")
    model_type = model_type or families.infer_model_type(cfg)
    family = families.family_for(model_type)
    by_hf = {m.hf: m for m in family.maps(cfg, family.prefix, None) if m.kind == "linear" and len(m.ours) == 1}
    tree = params["params"] if isinstance(params, dict) and set(params) == {"params"} else params
    kernels = traverse_util.flatten_dict(tree, sep="/")
    rank, adapters, targets = int(config["r"]), {}, set()
    for name in sorted(tensors):
        if not name.endswith(".lora_A.weight"):
            continue
        hf_weight = name.removeprefix(PREFIX).removesuffix(".lora_A.weight") + ".weight"
        b_name = name.replace(".lora_A.", ".lora_B.")
        base = config.get("base_model_name_or_path") or "not named in adapter_config.json"
        if hf_weight not in by_hf or b_name not in tensors:
            raise HFError(f"{folder / WEIGHTS_FILE}: {name} adapts no projection of this HF {model_type} model: the "
                          f"adapter was made for another base ({base}); pass the base it was trained on")
        m = by_hf[hf_weight]
        kernel = m.ours[0]
        shape = kernels[kernel].shape
        wanted = {name: (rank, int(np.prod(shape[: m.in_axes]))), b_name: (int(np.prod(shape[m.in_axes:])), rank)}
        for tensor, want in wanted.items():
            if tuple(tensors[tensor].shape) != want:
                raise HFError(f"{folder / WEIGHTS_FILE}: {tensor} is {list(tensors[tensor].shape)} but this base's "
                              f"{m.hf} needs {list(want)} at r={rank}: the adapter was made for another base "
                              f"({base}); pass the base it was trained on")
        a = Map(m.hf, (kernel,), "linear", m.in_axes).to_ours(tensors[name], [shape[: m.in_axes] + (rank,)])[0]
        b = Map(m.hf, (kernel,), "linear", 1).to_ours(tensors[b_name], [(rank,) + shape[m.in_axes:]])[0]
        adapters[tuple(f"{kernel}_lora_a".split("/"))], adapters[tuple(f"{kernel}_lora_b".split("/"))] = a, b
        targets.add(kernel.rsplit("/", 1)[-1])
    lora_cfg = LoraConfig(rank=rank, alpha=float(config.get("lora_alpha", rank)),
                          dropout=float(config.get("lora_dropout", 0.0)), targets=tuple(t for t in lora.AXES if t in targets))
    joined = lora.join(traverse_util.unflatten_dict(adapters), tree)
    return dataclasses.replace(cfg, lora=lora_cfg), ({"params": joined} if tree is not params else joined)


def adapter_params(cfg: ModelConfig, path, *, model_type: str) -> tuple[LoraConfig, dict]:
    """(model.lora of a PEFT adapter folder, its adapters as {'params': ...}) for a base of cfg
    (unrolled layers), to train further: read without the base's weights, whose shapes
    (jax.eval_shape) are all `load_adapters` needs. An adapter made for another base
    (other projections or shapes) is an HFError naming the tensor."""
    from flaxformer_lite.models import init_params

    plain = dataclasses.replace(cfg, lora=LoraConfig())
    abstract = jax.eval_shape(lambda: init_params(plain, jax.random.key(0)))
    adapted, params = load_adapters(plain, abstract, path, model_type=model_type)
    return adapted.lora, lora.split(params)[0]
