"""HF model families: config.json <-> ModelConfig, and HF tensor names <-> our parameters.

The only module that knows HF config keys and tensor names. Each family is data: how its config.json maps to a
ModelConfig (`config_in`, raising HFError on an option we cannot represent), the inverse
(`config_out`), and the list of `Map`s between its tensors and our parameters. Export
re-imports what `config_out` writes and compares, so the two directions cannot drift
(hf.save does that check).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Protocol

import numpy as np

from flaxformer_lite.config import ModelConfig, RopeScaling
from flaxformer_lite.interop.layout import HFError, Map


class Tensors(Protocol):
    """Named tensors read on demand: a checkpoint being loaded or one being written."""

    def keys(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


# HF activation names (transformers ACT2FN) -> ours. "gelu" there is the exact erf form.
_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
           "silu": "silu", "swish": "silu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _m(hf: str, ours: str | tuple[str, ...], kind: str = "reshape", in_axes: int = 1, row_offset: int = 0) -> Map:
    return Map(hf, ours if isinstance(ours, tuple) else (ours,), kind, in_axes, row_offset)


def _norm(hf: str, ours: str, bias: bool = True) -> list[Map]:
    maps = [_m(f"{hf}.weight", f"{ours}/scale", in_axes=0)]
    return maps + ([_m(f"{hf}.bias", f"{ours}/bias", in_axes=0)] if bias else [])


def _attention(q: str, k: str, v: str, o: str, ours: str, bias: bool) -> list[Map]:
    """torch nn.Linear projections -> query/key/value [D,N|K,H] and out [N,H,D]."""
    maps = []
    for hf, name, in_axes in ((q, "query", 1), (k, "key", 1), (v, "value", 1), (o, "out", 2)):
        maps.append(_m(f"{hf}.weight", f"{ours}/{name}", "linear", in_axes))
        if bias:
            maps.append(_m(f"{hf}.bias", f"{ours}/{name}_bias", in_axes=0))
    return maps


def _linear_ffn(wi: str, wo: str, ours: str, bias: bool, wg: Optional[str] = None) -> list[Map]:
    maps = [_m(f"{wi}.weight", f"{ours}/wi", "linear"), _m(f"{wo}.weight", f"{ours}/wo", "linear")]
    if wg is not None:
        maps.append(_m(f"{wg}.weight", f"{ours}/wg", "linear"))
    if bias:
        maps += [_m(f"{wi}.bias", f"{ours}/bi", in_axes=0), _m(f"{wo}.bias", f"{ours}/bo", in_axes=0)]
    return maps


def _required(hf: dict, key: str, model_type: str):
    if hf.get(key) is None:
        raise HFError(f"config.json has no {key!r}, which a {model_type} model needs")
    return hf[key]


def _expect(hf: dict, key: str, default, allowed: tuple, model_type: str, why: str = "") -> None:
    """An HF option we support only at the given values."""
    value = hf.get(key, default)
    if value not in allowed:
        shown = " or ".join(repr(a) for a in allowed)
        raise HFError(
            f"config.json {key}={value!r} is not supported for {model_type} (only {shown}){why}; "
            "converting it would silently change the model"
        )


def _activation(hf: dict, key: str, default: str, allowed: tuple = tuple(_ACT_IN)) -> str:
    name = hf.get(key, default)
    if name not in allowed:
        raise HFError(
            f"config.json {key}={name!r} has no equivalent here (supported: {', '.join(allowed)})"
        )
    return _ACT_IN[name]


def _same(t: Tensors, a: str, b: str) -> bool:
    return a in t.keys() and b in t.keys() and t.shape(a) == t.shape(b) and np.array_equal(t.get(a), t.get(b))


def _lm_head_tied(hf: dict, t: Tensors, head: str, table: str, default: bool) -> bool:
    """Tied iff the checkpoint has no separate head (and config.json ties) or an equal copy.

    transformers 5 unties a head present with different values whatever the config says;
    a head absent while config.json unties is reported missing by the tensor check.
    """
    if head not in t.keys():
        return bool(hf.get("tie_word_embeddings", default))
    return _same(t, head, table)


def _token_ids(hf: dict, defaults: dict) -> dict:
    """pad/bos/eos ids; a null pad falls back to eos (GPT-2 has none), then to 0."""
    ids = {k: hf.get(k) if hf.get(k) is not None else v for k, v in defaults.items()}
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"] if ids["eos_token_id"] is not None else 0
    return {k: (int(v[0]) if isinstance(v, list) else int(v)) for k, v in ids.items() if v is not None}


# ---------------------------------------------------------------------------------- BERT / RoBERTa


def _encoder_heads(model_type: str, base: str, keys: set[str]) -> tuple[bool, bool, str]:
    """(MLM head?, pooler?, classifier HF name or "") from the tensors present."""
    if model_type == "roberta":
        classifier = "classifier.out_proj" if "classifier.out_proj.weight" in keys else ""
        # RobertaForSequenceClassification's head is dense + tanh + out_proj: our pooler + classifier.
        pooler = "classifier.dense" if classifier else f"{base}pooler.dense"
        return "lm_head.dense.weight" in keys, f"{pooler}.weight" in keys, classifier
    classifier = "classifier" if "classifier.weight" in keys else ""
    mlm = "cls.predictions.transform.dense.weight" in keys
    return mlm, f"{base}pooler.dense.weight" in keys, classifier


def _bert_config_in(hf: dict, t: Tensors, base: str) -> tuple[ModelConfig, set[str]]:
    model_type = hf["model_type"]
    roberta = model_type == "roberta"
    _expect(hf, "position_embedding_type", "absolute", ("absolute",), model_type,
            ": relative_key attention scores are not implemented here")
    _expect(hf, "is_decoder", False, (False,), model_type, ": use a decoder family")
    _expect(hf, "add_cross_attention", False, (False,), model_type)
    mlm, pooler, classifier = _encoder_heads(model_type, base, t.keys())
    activation = _activation(hf, "hidden_act", "gelu")
    if roberta and mlm and activation != "gelu":
        raise HFError(
            f"config.json hidden_act={hf['hidden_act']!r}: RoBERTa's LM head applies exact GELU "
            "whatever hidden_act says, and ours uses the model's activation; not supported"
        )
    dropout = hf.get("hidden_dropout_prob", 0.1)
    if classifier and hf.get("classifier_dropout") not in (None, dropout):
        raise HFError(
            f"config.json classifier_dropout={hf['classifier_dropout']} differs from "
            f"hidden_dropout_prob={dropout}; the classifier here uses model.dropout_rate: set them equal"
        )
    redundant = set()
    decoder = "lm_head.decoder" if roberta else "cls.predictions.decoder"
    bias = "lm_head.bias" if roberta else "cls.predictions.bias"
    words = f"{base}embeddings.word_embeddings.weight"
    for copy, of in ((f"{decoder}.weight", words), (f"{decoder}.bias", bias)):
        if copy in t.keys():
            if not _same(t, copy, of):
                raise HFError(f"tensor {copy} differs from {of}: the MLM head here is tied to them")
            redundant.add(copy)
    ids = _token_ids(hf, {"pad_token_id": 1 if roberta else 0, "bos_token_id": None, "eos_token_id": None})
    # RoBERTa numbers positions from padding_idx + 1; the rows before are never read.
    offset = ids["pad_token_id"] + 1 if roberta else 0
    num_labels = t.shape(f"{classifier}.weight")[0] if classifier else 0
    cfg = ModelConfig(
        family="encoder",
        vocab_size=_required(hf, "vocab_size", model_type),
        d_model=_required(hf, "hidden_size", model_type),
        num_heads=_required(hf, "num_attention_heads", model_type),
        d_ff=_required(hf, "intermediate_size", model_type),
        num_layers=_required(hf, "num_hidden_layers", model_type),
        max_len=hf.get("max_position_embeddings", 512) - offset,
        position="learned",
        norm="layernorm",
        norm_position="post",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        embedding_norm=True,
        final_norm=False,
        activation=activation,
        use_bias=True,
        type_vocab_size=hf.get("type_vocab_size", 2),
        mlm_head=mlm,
        pooler=pooler,
        num_labels=num_labels,
        dropout_rate=dropout,
        attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        **ids,
    )
    return cfg, redundant


def _bert_config_out(cfg: ModelConfig, model_type: str) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "max_position_embeddings": cfg.max_len + (cfg.pad_token_id + 1 if model_type == "roberta" else 0),
        "position_embedding_type": "absolute",
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": _ACT_OUT.get(cfg.activation, cfg.activation),
        "type_vocab_size": cfg.type_vocab_size,
        "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "initializer_range": cfg.initializer_range,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        **({"num_labels": cfg.num_labels} if cfg.num_labels else {}),
    }


def _encoder_maps(cfg: ModelConfig, base: str, keys: Optional[set[str]], model_type: str) -> list[Map]:
    roberta = model_type == "roberta"
    e = f"{base}embeddings."
    maps = [
        _m(f"{e}word_embeddings.weight", "token_embed/embedding"),
        _m(f"{e}position_embeddings.weight", "encoder/position_embedding/embedding",
           row_offset=cfg.pad_token_id + 1 if roberta else 0),
        *_norm(f"{e}LayerNorm", "encoder/embedding_norm"),
    ]
    if cfg.type_vocab_size:
        maps.append(_m(f"{e}token_type_embeddings.weight", "type_embed/embedding"))
    for i in range(cfg.num_layers):
        h, o = f"{base}encoder.layer.{i}.", f"encoder/layers_{i}/"
        a = f"{h}attention.self."
        maps += _attention(f"{a}query", f"{a}key", f"{a}value", f"{h}attention.output.dense",
                           f"{o}self_attention", bias=True)
        maps += _norm(f"{h}attention.output.LayerNorm", f"{o}self_attention_norm")
        maps += _linear_ffn(f"{h}intermediate.dense", f"{h}output.dense", f"{o}mlp", bias=True)
        maps += _norm(f"{h}output.LayerNorm", f"{o}mlp_norm")
    if cfg.mlm_head:
        head = "lm_head." if roberta else "cls.predictions."
        dense, norm = ("dense", "layer_norm") if roberta else ("transform.dense", "transform.LayerNorm")
        maps += [
            _m(f"{head}{dense}.weight", "mlm_transform/kernel", "linear"),
            _m(f"{head}{dense}.bias", "mlm_transform/bias", in_axes=0),
            *_norm(f"{head}{norm}", "mlm_norm"),
            _m(f"{head}bias", "mlm_bias", in_axes=0),
        ]
    if cfg.pooler:
        if roberta:
            pooler = "classifier.dense" if cfg.num_labels else f"{base}pooler.dense"
            classifier = "classifier.out_proj"
        else:
            pooler, classifier = f"{base}pooler.dense", "classifier"
        maps += [_m(f"{pooler}.weight", "pooler/kernel", "linear"), _m(f"{pooler}.bias", "pooler/bias", in_axes=0)]
        if cfg.num_labels:
            maps += [_m(f"{classifier}.weight", "classifier/kernel", "linear"),
                     _m(f"{classifier}.bias", "classifier/bias", in_axes=0)]
    return maps


def _bert_architecture(cfg: ModelConfig, model_type: str) -> str:
    name = "Roberta" if model_type == "roberta" else "Bert"
    if cfg.mlm_head and cfg.pooler and name == "Bert":
        # A base encoder (a sentence-transformers model) given an MLM head: the class holding
        # both (its next-sentence head, which no model here has, is the one thing it lacks).
        return "BertForPreTraining"
    if cfg.mlm_head:
        return f"{name}ForMaskedLM"
    if cfg.num_labels:
        return f"{name}ForSequenceClassification"
    return f"{name}Model"


# ---------------------------------------------------------------------------------- GPT-2


def _gpt2_config_in(hf: dict, t: Tensors, base: str) -> tuple[ModelConfig, set[str]]:
    mt = "gpt2"
    _expect(hf, "scale_attn_by_inverse_layer_idx", False, (False,), mt)
    _expect(hf, "add_cross_attention", False, (False,), mt)
    d_model = _required(hf, "n_embd", mt)
    tied = _lm_head_tied(hf, t, "lm_head.weight", f"{base}wte.weight", True)
    cfg = ModelConfig(
        family="decoder",
        vocab_size=_required(hf, "vocab_size", mt),
        d_model=d_model,
        num_heads=_required(hf, "n_head", mt),
        d_ff=hf.get("n_inner") or 4 * d_model,
        num_layers=_required(hf, "n_layer", mt),
        max_len=hf.get("n_positions", 1024),
        position="learned",
        norm="layernorm",
        norm_position="pre",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_activation(hf, "activation_function", "gelu_new"),
        use_bias=True,
        scale_attention=bool(hf.get("scale_attn_weights", True)),
        tie_embeddings=tied,
        dropout_rate=hf.get("resid_pdrop", 0.1),
        attention_dropout_rate=hf.get("attn_pdrop", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        **_token_ids(hf, {"pad_token_id": None, "bos_token_id": 50256, "eos_token_id": 50256}),
    )
    return cfg, {"lm_head.weight"} & t.keys() if tied else set()


def _gpt2_config_out(cfg: ModelConfig, model_type: str) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_head": cfg.num_heads,
        "n_inner": cfg.d_ff,
        "n_layer": cfg.num_layers,
        "n_positions": cfg.max_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": _ACT_OUT.get(cfg.activation, cfg.activation),
        "scale_attn_weights": cfg.scale_attention,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": cfg.dropout_rate,
        "embd_pdrop": cfg.dropout_rate,
        "attn_pdrop": cfg.attention_dropout_rate,
        "initializer_range": cfg.initializer_range,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def _gpt2_maps(cfg: ModelConfig, base: str, keys: Optional[set[str]]) -> list[Map]:
    # GPT-2 uses Conv1D: weights are [in, out], so no transposes; c_attn fuses q, k, v.
    maps = [
        _m(f"{base}wte.weight", "token_embed/embedding"),
        _m(f"{base}wpe.weight", "decoder/position_embedding/embedding"),
        *_norm(f"{base}ln_f", "decoder/final_norm"),
    ]
    for i in range(cfg.num_layers):
        h, o = f"{base}h.{i}.", f"decoder/layers_{i}/"
        a = f"{o}self_attention/"
        maps += [
            *_norm(f"{h}ln_1", f"{o}self_attention_norm"),
            _m(f"{h}attn.c_attn.weight", (f"{a}query", f"{a}key", f"{a}value")),
            _m(f"{h}attn.c_attn.bias", (f"{a}query_bias", f"{a}key_bias", f"{a}value_bias"), in_axes=0),
            _m(f"{h}attn.c_proj.weight", f"{a}out", in_axes=2),
            _m(f"{h}attn.c_proj.bias", f"{a}out_bias", in_axes=0),
            *_norm(f"{h}ln_2", f"{o}mlp_norm"),
            _m(f"{h}mlp.c_fc.weight", f"{o}mlp/wi"),
            _m(f"{h}mlp.c_fc.bias", f"{o}mlp/bi", in_axes=0),
            _m(f"{h}mlp.c_proj.weight", f"{o}mlp/wo"),
            _m(f"{h}mlp.c_proj.bias", f"{o}mlp/bo", in_axes=0),
        ]
    if not cfg.tie_embeddings:
        maps.append(_m("lm_head.weight", "lm_head/kernel", "linear"))
    return maps


# ---------------------------------------------------------------------------------- RoPE decoders

# LLaMA, Mistral, Qwen and Gemma are one block with options (DESIGN.md, "Families are data"):
# what each model_type fixes, beyond what its config.json says.
_ROPE_DECODERS = {
    "llama": dict(architecture="LlamaForCausalLM", ids=(None, 1, 2), tied=False),
    "mistral": dict(architecture="MistralForCausalLM", ids=(None, 1, 2), tied=False),
    "qwen2": dict(architecture="Qwen2ForCausalLM", ids=(None, None, None), tied=False, qkv_bias=True),
    "qwen3": dict(architecture="Qwen3ForCausalLM", ids=(None, None, None), tied=False, qk_norm=True),
    "gemma2": dict(architecture="Gemma2ForCausalLM", ids=(0, 2, 1), tied=True, gemma=True),
    "gemma3_text": dict(architecture="Gemma3ForCausalLM", ids=(0, 2, 1), tied=True, gemma=True, qk_norm=True),
}
# Keys a RoPE parameter set may hold, by rope_type (besides rope_type/type and rope_theta).
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}
_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local"}


def _rope_scaling(params: dict, where: str, mt: str) -> Optional[RopeScaling]:
    """One RoPE parameter set (rope_parameters or the older rope_scaling) -> RopeScaling or None."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise HFError(
            f"config.json {where} has rope_type {kind!r}, not supported for {mt}: only "
            f"{', '.join(_ROPE_KEYS)} RoPE are implemented here"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"config.json {where} partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    unread = set(params) - _ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if unread:
        raise HFError(f"config.json {where} has {', '.join(sorted(unread))}, which {kind} RoPE does not use here")
    if kind == "default":
        return None
    factor = float(_required(params, "factor", f"{mt} {where}"))
    if kind == "linear":
        return RopeScaling("linear", factor)
    return RopeScaling(
        "llama3", factor, float(_required(params, "low_freq_factor", f"{mt} {where}")),
        float(_required(params, "high_freq_factor", f"{mt} {where}")),
        int(_required(params, "original_max_position_embeddings", f"{mt} {where}")),
    )


def _rope_in(hf: dict, mt: str) -> dict:
    """rope_theta, rope_scaling, rope_local_theta from transformers 5's rope_parameters (one
    set, or one per layer type as Gemma 3 writes) or the older rope_theta / rope_scaling /
    rope_local_base_freq keys."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        glob, where = params.get("full_attention") or {}, "rope_parameters.full_attention"
        local = params.get("sliding_attention") or {}
    else:
        # transformers reads an older rope_scaling in place of rope_parameters, when both are there.
        legacy = hf.get("rope_scaling")
        if legacy:
            glob, where = {**{k: v for k, v in params.items() if k == "rope_theta"}, **legacy}, "rope_scaling"
        else:
            glob, where = params, "rope_parameters"
        local = {"rope_theta": hf["rope_local_base_freq"]} if "rope_local_base_freq" in hf else {}
    gemma3 = mt == "gemma3_text"
    theta = float(glob.get("rope_theta", hf.get("rope_theta", 1e6 if gemma3 else 10000.0)))
    scaling = _rope_scaling(glob, where, mt)
    local_theta = None
    if gemma3:
        if _rope_scaling(local, "rope_parameters.sliding_attention", mt) is not None:
            raise HFError("config.json rope_parameters.sliding_attention: scaled RoPE on local layers is not supported")
        local_theta = float(local.get("rope_theta", 10000.0))
        if local_theta == theta and scaling is None:
            local_theta = None  # the same RoPE on every layer
    elif local:
        raise HFError(f"config.json: a separate RoPE for local layers is not part of {mt}; use gemma3_text")
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta)


def _rope_out(cfg: ModelConfig, mt: str) -> dict:
    glob = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        glob.update(rope_type=r.kind, factor=r.factor)
        if r.kind == "llama3":
            glob.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                        original_max_position_embeddings=r.original_max_len)
    if mt == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        return {"rope_parameters": {"full_attention": glob, "sliding_attention": local}}
    # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta and rope_scaling.
    legacy = {k: v for k, v in glob.items() if k != "rope_theta"} if cfg.rope_scaling is not None else None
    return {"rope_parameters": glob, "rope_theta": cfg.rope_theta, "rope_scaling": legacy}


def _pattern(types: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest prefix whose repetition gives every layer's type."""
    return next(types[:p] for p in range(1, len(types) + 1)
                if all(t == types[i % p] for i, t in enumerate(types)))


def _attention_types_in(hf: dict, mt: str, num_layers: int) -> dict:
    """sliding_window and attention_types from layer_types (or each family's default pattern)."""
    if mt in ("llama", "mistral"):
        return {"sliding_window": hf.get("sliding_window", 4096) if mt == "mistral" else None}
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if mt.startswith("qwen"):
        if not hf.get("use_sliding_window", False):
            window = None
        if layer_types is None:
            start = hf.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if window is not None and i >= start else "full_attention"
                           for i in range(num_layers)]
    elif layer_types is None:  # Gemma 2: every other layer local; Gemma 3: 5 local, 1 global
        period = hf.get("sliding_window_pattern", 2 if mt == "gemma2" else 6)
        layer_types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
    bad = sorted(set(layer_types) - set(_LAYER_TYPES))
    if bad or len(layer_types) != num_layers:
        raise HFError(
            f"config.json layer_types must list one of {', '.join(_LAYER_TYPES)} per layer "
            f"({num_layers}); got {len(layer_types)} entries{', with ' + ', '.join(map(repr, bad)) if bad else ''}"
        )
    types = tuple(_LAYER_TYPES[t] for t in layer_types)
    if "local" not in types:
        return {"sliding_window": None}
    if window is None:
        raise HFError(f"config.json layer_types has sliding_attention layers but sliding_window is null ({mt})")
    return {"sliding_window": int(window), "attention_types": () if "global" not in types else _pattern(types)}


def _attention_types_out(cfg: ModelConfig, mt: str) -> dict:
    if mt in ("llama", "mistral"):
        return {"sliding_window": cfg.sliding_window} if mt == "mistral" else {}
    types = cfg.layer_attention_types()
    out = {"layer_types": [{"global": "full_attention", "local": "sliding_attention"}[t] for t in types],
           "sliding_window": cfg.sliding_window}
    if mt.startswith("qwen"):
        out["use_sliding_window"] = "local" in types
    return out


def _gemma_activation(hf: dict) -> str:
    key = "hidden_activation" if "hidden_activation" in hf else "hidden_act"
    return _activation(hf, key, "gelu_pytorch_tanh", allowed=("gelu_pytorch_tanh", "gelu_new"))


def _llama_config_in(hf: dict, t: Tensors, base: str) -> tuple[ModelConfig, set[str]]:
    mt = hf["model_type"]
    shape = _ROPE_DECODERS[mt]
    gemma = shape.get("gemma", False)
    no_bias = ": projections with biases are not implemented for rope decoders"
    _expect(hf, "attention_bias", False, (False,), mt, no_bias)
    _expect(hf, "mlp_bias", False, (False,), mt, no_bias)
    _expect(hf, "use_bidirectional_attention", None, (None, False), mt, ": only causal attention is implemented here")
    d_model = _required(hf, "hidden_size", mt)
    num_heads = _required(hf, "num_attention_heads", mt)
    head_dim = hf.get("head_dim") or d_model // num_heads
    num_layers = _required(hf, "num_hidden_layers", mt)
    if gemma:
        act = _gemma_activation(hf)
        scalar = hf.get("query_pre_attn_scalar", 256)
        default_caps = (50.0, 30.0) if mt == "gemma2" else (None, None)
        family = dict(
            norm_offset=True, norm_position="sandwich", scale_embeddings=True,
            query_scale_dim=None if scalar == head_dim else float(scalar),
            attention_softcap=hf.get("attn_logit_softcapping", default_caps[0]),
            logits_softcap=hf.get("final_logit_softcapping", default_caps[1]),
        )
    else:
        act = _activation(hf, "hidden_act", "silu", allowed=("silu", "gelu_pytorch_tanh", "gelu_new"))
        family = dict(norm_position="pre")
    tied = _lm_head_tied(hf, t, "lm_head.weight", f"{base}embed_tokens.weight", shape["tied"])
    cfg = ModelConfig(
        family="decoder",
        vocab_size=_required(hf, "vocab_size", mt),
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=None if head_dim * num_heads == d_model else head_dim,
        d_ff=_required(hf, "intermediate_size", mt),
        num_layers=num_layers,
        max_len=hf.get("max_position_embeddings", 2048),
        position="rope",
        **_rope_in(hf, mt),
        **_attention_types_in(hf, mt, num_layers),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu" if act == "silu" else "geglu",
        use_bias=False,
        qkv_bias=shape.get("qkv_bias", False),
        qk_norm=shape.get("qk_norm", False),
        tie_embeddings=tied,
        dropout_rate=0.0,
        attention_dropout_rate=hf.get("attention_dropout", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        **family,
        **_token_ids(hf, dict(zip(("pad_token_id", "bos_token_id", "eos_token_id"), shape["ids"]))),
    )
    return cfg, {"lm_head.weight"} & t.keys() if tied else set()


def _llama_config_out(cfg: ModelConfig, model_type: str) -> dict:
    gemma = _ROPE_DECODERS[model_type].get("gemma", False)
    act = "silu" if cfg.activation == "swiglu" else "gelu_pytorch_tanh"
    out = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        **({"hidden_activation": act} if gemma else {"hidden_act": act}),
        **_rope_out(cfg, model_type),
        **_attention_types_out(cfg, model_type),
        "attention_bias": False,  # a model with biases fails the round-trip check on use_bias
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.attention_dropout_rate,
        "initializer_range": cfg.initializer_range,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    if gemma:
        scalar = cfg.query_scale_dim or cfg.dim_per_head
        out.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # an int in HF
                   attn_logit_softcapping=cfg.attention_softcap, final_logit_softcapping=cfg.logits_softcap)
    return out


def _llama_maps(cfg: ModelConfig, base: str, keys: Optional[set[str]]) -> list[Map]:
    maps = [_m(f"{base}embed_tokens.weight", "token_embed/embedding"),
            *_norm(f"{base}norm", "decoder/final_norm", bias=False)]
    for i in range(cfg.num_layers):
        h, o = f"{base}layers.{i}.", f"decoder/layers_{i}/"
        a = f"{h}self_attn."
        maps += _norm(f"{h}input_layernorm", f"{o}self_attention_norm", bias=False)
        maps += _attention(f"{a}q_proj", f"{a}k_proj", f"{a}v_proj", f"{a}o_proj", f"{o}self_attention", bias=False)
        if cfg.qkv_bias:
            maps += [_m(f"{a}{x}_proj.bias", f"{o}self_attention/{name}_bias", in_axes=0)
                     for x, name in (("q", "query"), ("k", "key"), ("v", "value"))]
        if cfg.qk_norm:
            maps += _norm(f"{a}q_norm", f"{o}self_attention/query_norm", bias=False)
            maps += _norm(f"{a}k_norm", f"{o}self_attention/key_norm", bias=False)
        if cfg.norm_position == "sandwich":  # Gemma: a norm before and after each sublayer
            maps += _norm(f"{h}post_attention_layernorm", f"{o}self_attention_post_norm", bias=False)
            maps += _norm(f"{h}pre_feedforward_layernorm", f"{o}mlp_norm", bias=False)
            maps += _norm(f"{h}post_feedforward_layernorm", f"{o}mlp_post_norm", bias=False)
        else:
            maps += _norm(f"{h}post_attention_layernorm", f"{o}mlp_norm", bias=False)
        maps += _linear_ffn(f"{h}mlp.up_proj", f"{h}mlp.down_proj", f"{o}mlp", bias=False, wg=f"{h}mlp.gate_proj")
    if not cfg.tie_embeddings:
        maps.append(_m("lm_head.weight", "lm_head/kernel", "linear"))
    return maps


# ---------------------------------------------------------------------------------- T5

_T5_TABLES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def _t5_sources(keys: Optional[set[str]], share_embeddings: bool) -> tuple[str, str, str]:
    """HF names holding the encoder input table, the decoder's, and the output head.

    Loading: the stack's own table where the checkpoint has one, else `shared` (what
    transformers ties the missing ones to). Export: `shared` when one table serves both.
    """
    if keys is None:
        enc = "shared.weight" if share_embeddings else "encoder.embed_tokens.weight"
        return enc, "decoder.embed_tokens.weight", "lm_head.weight"
    pick = lambda name: name if name in keys else "shared.weight"  # noqa: E731
    return pick("encoder.embed_tokens.weight"), pick("decoder.embed_tokens.weight"), pick("lm_head.weight")


def _t5_activation(hf: dict) -> str:
    proj = hf.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    if gated:
        # transformers runs "gated-gelu" with gelu_new (tanh), as the T5 v1.1 release did.
        named = {"gelu": "geglu", "gelu_new": "geglu", "silu": "swiglu"}
    else:
        named = _ACT_IN
    if act not in named:
        raise HFError(
            f"config.json feed_forward_proj={proj!r} has no equivalent here (supported: relu, gelu, "
            "gelu_new, silu, gated-gelu, gated-silu)"
        )
    return named[act]


def _t5_config_in(hf: dict, t: Tensors, base: str) -> tuple[ModelConfig, set[str]]:
    mt = "t5"
    _expect(hf, "is_encoder_decoder", True, (True,), mt, ": encoder-only T5 (T5EncoderModel) is not supported")
    keys = t.keys()
    enc, dec, head = _t5_sources(keys, share_embeddings=True)
    share = enc == dec or _same(t, enc, dec)
    tied = head == dec or _same(t, head, dec)
    num_layers = _required(hf, "num_layers", mt)
    dropout = hf.get("dropout_rate", 0.1)
    # transformers 5: scale_decoder_outputs when written, else tie_word_embeddings (T5 v1.0
    # scales, v1.1 configs say false); 4.x reads tie_word_embeddings alone, the same way.
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    ids = _token_ids(hf, {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": 1})
    # The decoder starts from decoder_start_token_id (T5: the pad id); it is also its "bos".
    start = hf.get("decoder_start_token_id")
    start = ids["pad_token_id"] if start is None else start
    ids.setdefault("bos_token_id", start)
    cfg = ModelConfig(
        family="encoder_decoder",
        vocab_size=_required(hf, "vocab_size", mt),
        d_model=_required(hf, "d_model", mt),
        num_heads=_required(hf, "num_heads", mt),
        head_dim=_required(hf, "d_kv", mt),
        d_ff=_required(hf, "d_ff", mt),
        num_layers=num_layers,
        num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
        max_len=hf.get("n_positions", 512),
        position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        activation=_t5_activation(hf),
        use_bias=False,
        scale_attention=False,
        tie_embeddings=tied,
        tied_logits_scale=bool(scale),
        share_embeddings=share,
        dropout_rate=dropout,
        attention_dropout_rate=dropout,  # T5 drops attention weights at the same rate
        # HF T5 draws projections at about factor * d_model**-0.5 and the tables at factor.
        initializer_range=_t5_factor(hf) * _required(hf, "d_model", mt) ** -0.5,
        embedding_init_std=_t5_factor(hf),
        decoder_start_token_id=start,
        **ids,
    )
    # Tables not read as a source are copies of one that is (or `shared` while both stacks
    # have their own, which transformers keeps but never reads).
    used = {enc} | ({dec} if not share else set()) | ({head} if not tied else set())
    return cfg, (set(_T5_TABLES) & keys) - used


def _t5_factor(hf: dict) -> float:
    return float(hf.get("initializer_factor", 1.0))


def _t5_config_out(cfg: ModelConfig, model_type: str) -> dict:
    gated = {"geglu": "gated-gelu", "swiglu": "gated-silu"}
    return {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "num_heads": cfg.num_heads,
        "d_kv": cfg.dim_per_head,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "n_positions": cfg.max_len,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": gated.get(cfg.activation) or _ACT_OUT.get(cfg.activation, cfg.activation),
        # 4.x reads tie_word_embeddings as "tied and scaled"; 5.x reads scale_decoder_outputs
        # and unties whatever head is written with different values.
        "tie_word_embeddings": cfg.tied_logits_scale,
        "scale_decoder_outputs": cfg.tied_logits_scale,
        "is_encoder_decoder": True,
        "dropout_rate": cfg.dropout_rate,
        "initializer_factor": cfg.initializer_range * cfg.d_model**0.5,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.bos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
    }


def _t5_maps(cfg: ModelConfig, base: str, keys: Optional[set[str]]) -> list[Map]:
    enc, dec, head = _t5_sources(keys, cfg.share_embeddings)
    maps = [_m(enc, "token_embed/embedding")]
    if not cfg.share_embeddings:
        maps.append(_m(dec, "decoder_token_embed/embedding"))
    if not cfg.tie_embeddings:
        maps.append(_m(head, "lm_head/kernel", "linear"))
    gated = cfg.activation in ("geglu", "swiglu")
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        # Only the first block holds the relative position table; all layers share it.
        relpos = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        maps.append(_m(relpos, f"{stack}/relpos_bias"))
        maps += _norm(f"{stack}.final_layer_norm", f"{stack}/final_norm", bias=False)
        for i in range(n):
            h, o = f"{stack}.block.{i}.layer.", f"{stack}/layers_{i}/"
            s = f"{h}0.SelfAttention."
            maps += _attention(f"{s}q", f"{s}k", f"{s}v", f"{s}o", f"{o}self_attention", bias=False)
            maps += _norm(f"{h}0.layer_norm", f"{o}self_attention_norm", bias=False)
            ffn = 1
            if stack == "decoder":
                c = f"{h}1.EncDecAttention."
                maps += _attention(f"{c}q", f"{c}k", f"{c}v", f"{c}o", f"{o}cross_attention", bias=False)
                maps += _norm(f"{h}1.layer_norm", f"{o}cross_attention_norm", bias=False)
                ffn = 2
            d = f"{h}{ffn}.DenseReluDense."
            if gated:
                maps += _linear_ffn(f"{d}wi_1", f"{d}wo", f"{o}mlp", bias=False, wg=f"{d}wi_0")
            else:
                maps += _linear_ffn(f"{d}wi", f"{d}wo", f"{o}mlp", bias=False)
            maps += _norm(f"{h}{ffn}.layer_norm", f"{o}mlp_norm", bias=False)
    return maps


def _t5_export_extras(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    """Tables transformers needs written out beside the ones our parameters map to."""
    enc, dec, head = _t5_sources(None, cfg.share_embeddings)
    if not cfg.share_embeddings:
        tensors["shared.weight"] = tensors[enc]  # what get_input_embeddings() returns
    # A tied head is written when transformers would otherwise tie it to `shared` (the
    # encoder's table) or read it unscaled-and-untied (4.x, tie_word_embeddings false).
    if cfg.tie_embeddings and not (cfg.share_embeddings and cfg.tied_logits_scale):
        tensors[head] = tensors[dec if not cfg.share_embeddings else enc]


# ---------------------------------------------------------------------------------- registry

# Architectures whose checkpoints carry no base-model prefix ("embeddings...", not "bert.embeddings...").
BASE_MODELS = {"BertModel", "RobertaModel"}


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model family: names, config mapping and tensor maps."""

    prefix: str  # base-model prefix of the ...For* classes' tensors ("bert.", "model.")
    config_in: Callable[[dict, Tensors, str], tuple[ModelConfig, set[str]]]
    config_out: Callable[[ModelConfig, str], dict]
    maps: Callable[[ModelConfig, str, Optional[set[str]]], list[Map]]
    architecture: Callable[[ModelConfig, str], str]
    buffers: str = r"$^"  # regex of non-parameter buffers some checkpoints carry
    export_extras: Callable[[ModelConfig, dict], None] = lambda cfg, tensors: None


FAMILIES = {
    "bert": Family(
        "bert.", _bert_config_in, _bert_config_out,
        lambda cfg, base, keys: _encoder_maps(cfg, base, keys, "bert"), _bert_architecture,
        buffers=r"embeddings\.(position_ids|token_type_ids)$",
    ),
    "roberta": Family(
        "roberta.", _bert_config_in, _bert_config_out,
        lambda cfg, base, keys: _encoder_maps(cfg, base, keys, "roberta"), _bert_architecture,
        buffers=r"embeddings\.(position_ids|token_type_ids)$",
    ),
    "gpt2": Family(
        "transformer.", _gpt2_config_in, _gpt2_config_out, _gpt2_maps, lambda cfg, mt: "GPT2LMHeadModel",
        buffers=r"(^|\.)h\.\d+\.attn\.(masked_)?bias$",  # causal-mask buffers of older checkpoints
    ),
    **{
        mt: Family(
            "model.", _llama_config_in, _llama_config_out, _llama_maps,
            lambda cfg, mt: _ROPE_DECODERS[mt]["architecture"], buffers=r"rotary_emb\.\w*inv_freq$",
        )
        for mt in _ROPE_DECODERS
    },
    "t5": Family(
        "", _t5_config_in, _t5_config_out, _t5_maps, lambda cfg, mt: "T5ForConditionalGeneration",
        export_extras=_t5_export_extras,
    ),
}


def family_for(model_type: Optional[str]) -> Family:
    """The Family of an HF model_type, or an HFError listing the supported ones."""
    if model_type not in FAMILIES:
        raise HFError(
            f"HF model_type={model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF family a ModelConfig exports to by default."""
    if cfg.family == "encoder":
        return "bert"
    if cfg.family == "encoder_decoder":
        return "t5"
    if cfg.position == "rope":
        if cfg.norm_offset or cfg.norm_position == "sandwich":
            return "gemma3_text" if cfg.qk_norm or cfg.rope_local_theta is not None else "gemma2"
        if cfg.qk_norm:
            return "qwen3"
        if cfg.qkv_bias or cfg.attention_types:
            return "qwen2"
        return "mistral" if cfg.sliding_window is not None else "llama"
    return "gpt2"


def is_buffer(family: Family, name: str) -> bool:
    """True for derived, non-learned tensors (causal masks, position ids) to skip."""
    return re.search(family.buffers, name) is not None
