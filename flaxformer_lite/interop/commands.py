"""`flaxformer-lite convert`: HF model folder <-> run directory.

    flaxformer-lite convert --from-hf DIR --to WORKDIR      # config.yaml + orbax params + WORKDIR/hf/
    flaxformer-lite convert --from WORKDIR --to-hf DIR      # config.json + model.safetensors + tokenizer files
    flaxformer-lite convert --from WORKDIR --to-hf DIR --max-shard-size 2GB   # shards + index, as transformers

WORKDIR/hf/ keeps the source's config.json and its tokenizer files (hf.SOURCE_FILES), so
the run loads its tokenizer from there and --to-hf writes the same family and the same
tokenizer files back. A converted WORKDIR is what train (--init-from), generate and viz
read; `train --init-from HF_DIR` starts from the folder directly. Bad input prints
one `error: ...` line naming the file, key or tensor, and exits with status 2 before
anything is written.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from flaxformer_lite.errors import EXIT_BAD_INPUT
from flaxformer_lite.interop import families
from flaxformer_lite.interop.weights import DEFAULT_MAX_SHARD_SIZE
from flaxformer_lite.runtime.flags import non_negative_int

# A first training objective for each family; edit config.yaml to train on something else.
_OBJECTIVES = {"decoder": "causal_lm", "encoder_decoder": "span_corruption", "encoder": "masked_lm"}


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite convert`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="local HF model folder: config.json + *.safetensors")
    source.add_argument("--from", dest="from_workdir", metavar="WORKDIR", help="run directory to export")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="WORKDIR", help="run directory to write (with --from-hf)")
    target.add_argument("--to-hf", metavar="DIR",
                        help="HF model folder to write (with --from); LoRA adapters are merged into the weights")
    target.add_argument("--to-peft", metavar="DIR",
                        help="with --from a LoRA run: its adapters as a PEFT folder (adapter_config.json, "
                             "adapter_model.safetensors) for the HF base model")
    parser.add_argument("--step", type=non_negative_int, help="--from: checkpoint step (default: the latest)")
    parser.add_argument("--model-type", choices=sorted(families.FAMILIES),
                        help="--to-hf: HF family (default: the one converted from, else inferred)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                        help="--to-hf: split the weights into shards of at most SIZE (e.g. 2GB, 500MB) with "
                             "model.safetensors.index.json, as transformers does (default: %(default)s)")
    parser.add_argument("--peft", metavar="ADAPTER_DIR",
                        help="--from-hf: also load this PEFT LoRA adapter of the model (model.lora from its config)")
    parser.add_argument("--scan-layers", action="store_true", help="--from-hf: stack layers for nn.scan")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="--from-hf: dtype to store parameters in")
    parser.add_argument("--skip", action="append", default=[], metavar="PREFIX",
                        help="--from-hf: drop checkpoint tensors with this prefix (a head not supported here)")


def hf_run_config(hf_dir, model_cfg, *, config=None, overrides=(), tokenizer=None):
    """The run Config of a model from an HF folder: model and tokenizer come from the folder.

    Args:
      hf_dir: the HF folder; model_cfg: its ModelConfig (hf.load's).
      config: a YAML run config or preset whose train, data and parallel sections to use,
        and its model section's runtime and training settings (hf.RUNTIME_FIELDS,
        hf.TRAINING_FIELDS); without it, fine-tuning defaults (config.FINE_TUNE_TRAIN).
      overrides: key=value strings applied last.
      tokenizer: where data.tokenizer points (default: hf_dir, if it has tokenizer.json).
    """
    import dataclasses

    from flaxformer_lite.config import FINE_TUNE_TRAIN, ConfigError, DataConfig, build_config, read_config_dict, to_dict
    from flaxformer_lite.interop import hf

    hf_dir = pathlib.Path(hf_dir)
    base = read_config_dict(config) if config else {"train": dict(FINE_TUNE_TRAIN)}
    chosen = {k: v for k, v in (base.get("model") or {}).items() if k in hf.RUNTIME_FIELDS + hf.TRAINING_FIELDS}
    data = dict(base.get("data") or {})
    objective = data.get("objective") or (
        "classification" if model_cfg.num_labels else _OBJECTIVES[model_cfg.family]
    )
    if objective == "masked_lm" and model_cfg.family == "encoder" and not model_cfg.mlm_head:
        chosen["mlm_head"] = True  # a base encoder (no MLM head) trains with a fresh one
    if tokenizer is None and (hf_dir / hf.TOKENIZER_FILE).is_file():
        tokenizer = hf_dir
    if tokenizer is None and data.get("tokenizer") in (None, "byte"):
        raise ConfigError(
            f"{hf_dir} has no {hf.TOKENIZER_FILE}, and the model needs the tokenizer it was trained with: save "
            "one there (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) or --set data.tokenizer=PATH"
        )
    data.update(
        objective=objective,
        tokenizer=str(tokenizer) if tokenizer is not None else data["tokenizer"],
        seq_len=min(data.get("seq_len", DataConfig.seq_len), model_cfg.max_len),
    )
    merged = {
        **base, "name": base.get("name") or f"hf-{hf_dir.resolve().name}",
        "model": to_dict(dataclasses.replace(model_cfg, **chosen)), "data": data,
    }
    return build_config(merged, overrides, source=str(config or hf_dir))


def _from_hf(args: argparse.Namespace) -> dict:
    from flaxformer_lite.config import Config, DataConfig, validate
    from flaxformer_lite.interop import hf
    from flaxformer_lite.models import count_params
    from flaxformer_lite.runtime import checkpoint

    source, workdir = pathlib.Path(args.from_hf), pathlib.Path(args.to)
    model_cfg, params = hf.load(source, skip=args.skip, scan_layers=args.scan_layers, param_dtype=args.param_dtype)
    hf_config = hf.read_config(source)
    if args.peft:
        from flaxformer_lite.interop import peft

        if args.scan_layers:
            raise hf.HFError("--peft loads adapters onto unrolled layers: drop --scan-layers")
        model_cfg, params = peft.load_adapters(model_cfg, params, args.peft, model_type=hf_config["model_type"])
    kept = workdir / hf.HF_SOURCE_DIR
    has_tokenizer = (source / hf.TOKENIZER_FILE).is_file()
    if has_tokenizer:
        hf.load_tokenizer(source)  # a broken tokenizer.json fails here, before anything is written
    objective = "classification" if model_cfg.num_labels else _OBJECTIVES[model_cfg.family]
    data = DataConfig(
        objective=objective,
        tokenizer=str(kept) if has_tokenizer else "byte",
        seq_len=min(DataConfig.seq_len, model_cfg.max_len),
    )
    cfg = validate(Config(name=f"hf-{source.resolve().name}", model=model_cfg, data=data))
    checkpoint.save_params(workdir, cfg, params)
    copied = hf.keep_source(source, kept)
    return {"workdir": str(workdir), "model_type": hf_config["model_type"], "family": model_cfg.family,
            "parameters": count_params(params), "tokenizer": data.tokenizer, "kept": copied}


def run_source(workdir, cfg) -> "pathlib.Path | None":
    """The folder whose files travel with a run's export: WORKDIR/hf (its HF source), else
    the folder its tokenizer comes from, if data.tokenizer names one."""
    from flaxformer_lite.interop import hf

    kept = pathlib.Path(workdir) / hf.HF_SOURCE_DIR
    if hf.is_hf_folder(kept):
        return kept
    tokenizer = pathlib.Path(cfg.data.tokenizer)
    return tokenizer if cfg.data.tokenizer != "byte" and tokenizer.is_dir() else None


def _exported_run(args: argparse.Namespace):
    """(cfg, params, HF source folder or None, model_type) of the run --from names."""
    from flaxformer_lite.interop import hf
    from flaxformer_lite.runtime import checkpoint

    workdir = pathlib.Path(args.from_workdir)
    cfg, params = checkpoint.load_params(workdir, args.step)
    source = run_source(workdir, cfg)
    model_type = args.model_type
    if model_type is None and source is not None and hf.is_hf_folder(source):
        model_type = hf.read_config(source).get("model_type")
    return cfg, params, source, model_type


def _original_base(cfg, source) -> "tuple[dict, str] | None":
    """(the float base as the run's source folder holds it, that folder) of a LoRA run whose
    base was stored in reduced precision (model.lora.base_dtype), or None when the folder
    with the weights (hf.base_model) is not on this machine."""
    from flaxformer_lite.interop import hf
    from flaxformer_lite.interop.weights import INDEX_FILE, WEIGHTS_FILE

    if source is None:
        return None
    folder = pathlib.Path(hf.base_model(source) or source)
    if not any((folder / name).is_file() for name in (WEIGHTS_FILE, INDEX_FILE)):
        return None
    m = cfg.model
    return hf.load(folder, scan_layers=m.scan_layers, param_dtype=m.param_dtype)[1], str(folder)


def _onto_original(cfg, params, source, flag: str):
    """(cfg, params) with a reduced-precision base swapped for the original weights, and a
    line on stderr saying the adapters were trained against the rounded base and by how
    much a probe batch's logits differ on the two; (cfg, params) unchanged otherwise."""
    import dataclasses

    import jax
    import numpy as np
    from flax import traverse_util

    from flaxformer_lite.layers import lora
    from flaxformer_lite.models import build_model, dummy_inputs

    base_dtype = cfg.model.lora.base_dtype
    if not cfg.model.lora.rank or base_dtype in (None, "float32"):
        return cfg, params
    found = _original_base(cfg, source)
    head = f"{flag}: the adapters were trained against a base stored in {base_dtype}"
    if found is None:
        print(f"{head}; its original weights are not on this machine (run directory's hf/ records none there), "
              "so the difference on them was not measured" + (" and the rounded weights are merged" if flag == "--to-hf"
                                                              else ""), file=sys.stderr)
        return cfg, params
    original, folder = found
    flat, plain = traverse_util.flatten_dict(params), traverse_util.flatten_dict(original)
    suffixes = tuple(lora.QUANTIZED.values())
    swapped = traverse_util.unflatten_dict({k: plain.get(k, v) for k, v in flat.items()
                                            if not (str(k[-1]).endswith(suffixes) and k not in plain)})
    float_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, lora=dataclasses.replace(cfg.model.lora, base_dtype=None)))
    shape = dummy_inputs(cfg.model, batch=2, length=min(32, cfg.model.max_len))
    probe = [np.random.default_rng(i).integers(0, cfg.model.vocab_size, x.shape).astype(np.int32)
             for i, x in enumerate(shape)]
    logits = [np.asarray(jax.jit(lambda p, *ids, c=c: build_model(c).apply(p, *ids).logits)(p, *probe), np.float32)
              for c, p in ((cfg.model, params), (float_cfg.model, swapped))]
    diff = np.abs(logits[0] - logits[1])
    print(f"{head}: on a probe batch ({' and '.join('x'.join(map(str, x.shape)) for x in probe)} random tokens) "
          f"their logits there and on the original weights of {folder} differ by at most {diff.max():.4g} "
          f"(mean {diff.mean():.3g})", file=sys.stderr)
    return float_cfg, swapped


def _to_peft(args: argparse.Namespace) -> dict:
    from flaxformer_lite.interop import hf, peft

    out = pathlib.Path(args.to_peft)
    cfg, params, source, model_type = _exported_run(args)
    _onto_original(cfg, params, source, "--to-peft")
    base = (hf.base_model(source) or str(source.resolve())) if source is not None else None
    peft.save_adapters(cfg.model, params, out, model_type=model_type, base_model=base)
    written = json.loads((out / peft.CONFIG_FILE).read_text())
    return {"peft_dir": str(out), "r": written["r"], "lora_alpha": written["lora_alpha"],
            "target_modules": written["target_modules"], "base_model": base}


def _to_hf(args: argparse.Namespace) -> dict:
    import dataclasses

    from flaxformer_lite.config import LoraConfig
    from flaxformer_lite.interop import hf
    from flaxformer_lite.layers import lora

    out = pathlib.Path(args.to_hf)
    cfg, params, source, model_type = _exported_run(args)
    cfg, params = _onto_original(cfg, params, source, "--to-hf")  # never the rounded weights, if at hand
    if cfg.model.lora.rank:  # a plain model of the same family: W + (alpha / r) A B
        params = lora.merge(params, cfg.model)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=LoraConfig()))
    # The byte tokenizer has no tokenizer.json form; anything else is a file to copy along.
    tokenizer = None if cfg.data.tokenizer == "byte" else cfg.data.tokenizer
    hf.save(cfg.model, params, out, model_type=model_type, tokenizer=tokenizer, source=source,
            max_shard_size=args.max_shard_size)
    written = json.loads((out / hf.CONFIG_FILE).read_text())
    return {"hf_dir": str(out), "model_type": written["model_type"], "architecture": written["architectures"][0],
            "tokenizer": str(out / hf.TOKENIZER_FILE) if tokenizer else None,
            "files": sorted(p.name for p in out.iterdir())}


def run_convert(args: argparse.Namespace) -> int:
    """Convert one way or the other; print a JSON summary."""
    from flaxformer_lite.config import ConfigError
    from flaxformer_lite.data import DataError
    from flaxformer_lite.interop.hf import HFError

    if bool(args.from_hf) != bool(args.to):
        print("error: use --from-hf DIR --to WORKDIR, or --from WORKDIR --to-hf DIR (or --to-peft DIR)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        summary = _from_hf(args) if args.from_hf else _to_peft(args) if args.to_peft else _to_hf(args)
    except (HFError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(summary, indent=2))
    return 0
