"""Parity with transformers on tiny random models, both directions.

    python -m flaxformer_lite.interop.parity        # prints the markdown table

For each case: build a randomly initialised tiny PyTorch model with transformers,
`save_pretrained` it, `hf.load` it here and compare last hidden states and logits on
random token ids (a batch with one right-padded row, compared at real tokens); then
`hf.save` it back, reload with transformers' `from_pretrained` and compare again. Needs
torch and transformers (the test extras); nothing is downloaded.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Callable, Optional

import jax
import numpy as np

from flaxformer_lite.config import ModelConfig
from flaxformer_lite.interop import hf
from flaxformer_lite.models import build_model, count_params

BATCH, LENGTH, TARGET_LENGTH, PADDED = 2, 9, 7, 3
TOLERANCE = 1e-4  # issue 5: max abs diff in float32


def _t5(tr, **kw):
    base = dict(vocab_size=96, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return tr.T5Config(**{**base, **kw})


def _t5_v1_1(tr):
    """The published v1.1 layout: no logit scaling, untied head, one input table."""
    import torch

    model = tr.T5ForConditionalGeneration(_t5(tr, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


def _t5_own_tables(tr):
    """transformers 5 with tie_word_embeddings set after construction: every table its own, scaled."""
    cfg = _t5(tr, feed_forward_proj="gated-silu")
    cfg.tie_word_embeddings = False
    return tr.T5ForConditionalGeneration(cfg)


def _bert(tr, **kw):
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=32)
    return tr.BertConfig(**{**base, **kw})


def _roberta(tr, **kw):
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=34, type_vocab_size=1)
    return tr.RobertaConfig(**{**base, **kw})


def _llama_like(config_cls, **kw):
    base = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, max_position_embeddings=32)
    return config_cls(**{**base, **kw})


def spread(model, std: float = 0.15, embed_std: Optional[float] = None, seed: int = 0):
    """Weights drawn wider than HF's init (norm scales around their identity), so soft caps
    bite, attention is peaked and greedy paths vary instead of repeating a token.

    embed_std: the input table's (default std): Gemma scales it by sqrt(d_model), and a
    wide tied table then makes every greedy step repeat the last token.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 0.0 if p.ndim > 1 or "bias" in name or "gemma" in type(model).__name__.lower() else 1.0
            width = embed_std if embed_std is not None and "embed_tokens" in name else std
            p.copy_(centre + width * torch.randn(p.shape, generator=g))
    return model


# Families as options of one block: each case turns on its family's options, with a
# sliding window of 4 where the family has one (the inputs are longer).
def _llama3(tr):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return spread(tr.LlamaForCausalLM(_llama_like(tr.LlamaConfig, head_dim=24, rope_parameters=rope)))


def _llama_linear(tr):
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    return spread(tr.LlamaForCausalLM(_llama_like(tr.LlamaConfig, tie_word_embeddings=True, rope_parameters=rope)))


def _qwen2(tr):
    """Biases on q, k, v; layer 1 local (use_sliding_window from max_window_layers)."""
    cfg = _llama_like(tr.Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                      bos_token_id=1, eos_token_id=2)
    return spread(tr.Qwen2ForCausalLM(cfg))


def _qwen3(tr):
    cfg = _llama_like(tr.Qwen3Config, head_dim=16, num_hidden_layers=3, bos_token_id=1, eos_token_id=2)
    return spread(tr.Qwen3ForCausalLM(cfg))


def _gemma2(tr):
    cfg = _llama_like(tr.Gemma2Config, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                      num_hidden_layers=3, attn_logit_softcapping=2.0, final_logit_softcapping=0.5)
    return spread(tr.Gemma2ForCausalLM(cfg), embed_std=0.02)


def _gemma3(tr):
    """Local layers 0-1 and global layer 2 (Gemma 3's 5:1, shortened), linear RoPE scaling on
    it; an untied head (Gemma 3 ties it) so that greedy paths vary."""
    cfg = _llama_like(
        tr.Gemma3TextConfig, head_dim=16, query_pre_attn_scalar=8, sliding_window=4, num_hidden_layers=3,
        tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )
    return spread(tr.Gemma3ForCausalLM(cfg), std=0.3)


# name -> (HF class name, what the logits column compares, builder(transformers) -> model)
CASES: dict[str, tuple[str, str, Callable]] = {
    "bert": ("BertForMaskedLM", "MLM logits", lambda tr: tr.BertForMaskedLM(_bert(tr))),
    "bert (MiniLM-shaped)": (
        "BertModel", "pooled",
        lambda tr: tr.BertModel(_bert(tr, hidden_size=48, num_attention_heads=3, intermediate_size=192)),
    ),
    "roberta": ("RobertaForMaskedLM", "MLM logits", lambda tr: tr.RobertaForMaskedLM(_roberta(tr))),
    "roberta (classifier)": (
        "RobertaForSequenceClassification", "class logits",
        lambda tr: tr.RobertaForSequenceClassification(_roberta(tr, num_labels=3)),
    ),
    "gpt2": (
        "GPT2LMHeadModel", "LM logits",
        lambda tr: tr.GPT2LMHeadModel(tr.GPT2Config(
            vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=2, eos_token_id=2)),
    ),
    "llama": ("LlamaForCausalLM", "LM logits", lambda tr: tr.LlamaForCausalLM(_llama_like(tr.LlamaConfig))),
    "mistral (window 4, MQA)": (
        "MistralForCausalLM", "LM logits",
        lambda tr: tr.MistralForCausalLM(_llama_like(tr.MistralConfig, num_key_value_heads=1, sliding_window=4)),
    ),
    "llama 3 (llama3 RoPE, head_dim 24)": ("LlamaForCausalLM", "LM logits", _llama3),
    "llama (linear RoPE, tied)": ("LlamaForCausalLM", "LM logits", _llama_linear),
    "qwen2 (qkv bias, window 4 on layer 1)": ("Qwen2ForCausalLM", "LM logits", _qwen2),
    "qwen3 (q/k norms)": ("Qwen3ForCausalLM", "LM logits", _qwen3),
    "gemma2 (window 4, soft caps)": ("Gemma2ForCausalLM", "LM logits", _gemma2),
    "gemma3 (q/k norms, local RoPE base)": ("Gemma3ForCausalLM", "LM logits", _gemma3),
    "t5 v1.0": ("T5ForConditionalGeneration", "decoder logits", lambda tr: tr.T5ForConditionalGeneration(_t5(tr))),
    "t5 v1.1": ("T5ForConditionalGeneration", "decoder logits", _t5_v1_1),
    "t5 (own tables, gated-silu)": ("T5ForConditionalGeneration", "decoder logits", _t5_own_tables),
}


def build_hf(name: str, folder: str | pathlib.Path, seed: int = 0):
    """Build case `name` with random weights, save_pretrained it to `folder`; return it (eval mode)."""
    import torch
    import transformers as tr

    torch.manual_seed(seed)
    model = CASES[name][2](tr).eval()
    model.save_pretrained(folder)
    return model


def hf_class(name: str):
    import transformers as tr

    return getattr(tr, CASES[name][0])


def random_inputs(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids (never a special id) with the last PADDED tokens of row 1 padded."""
    rng = np.random.default_rng(seed)
    lengths = {"input": LENGTH, "decoder_input": TARGET_LENGTH}
    out = {}
    for kind, length in lengths.items():
        if kind == "decoder_input" and cfg.family != "encoder_decoder":
            continue
        ids = rng.integers(3, cfg.vocab_size, (BATCH, length)).astype(np.int64)
        mask = np.ones((BATCH, length), np.int64)
        mask[1, length - PADDED :] = 0
        ids[mask == 0] = cfg.pad_token_id
        out[f"{kind}_ids"], out[f"{kind}_mask"] = ids, mask
    if cfg.type_vocab_size > 1:
        out["token_type_ids"] = rng.integers(0, cfg.type_vocab_size, (BATCH, LENGTH)).astype(np.int64)
    return out


def our_outputs(cfg: ModelConfig, params, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{'hidden': [...], 'logits': ...} from the model here."""
    apply = jax.jit(build_model(cfg).apply)  # one compile beats dispatching each op
    if cfg.family == "encoder_decoder":
        out = apply(params, x["input_ids"], x["decoder_input_ids"], attention_mask=x["input_mask"],
                          decoder_attention_mask=x["decoder_input_mask"])
        return {"hidden": [np.asarray(out.encoder_hidden_states), np.asarray(out.hidden_states)],
                "logits": np.asarray(out.logits)}
    kwargs = {"token_type_ids": x["token_type_ids"]} if "token_type_ids" in x else {}
    out = apply(params, x["input_ids"], attention_mask=x["input_mask"], **kwargs)
    head = out.class_logits if cfg.num_labels else out.logits if out.logits is not None else out.pooled
    return {"hidden": [np.asarray(out.hidden_states)], "logits": np.asarray(head)}


def hf_outputs(model, cfg: ModelConfig, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same quantities from a transformers model."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        if cfg.family == "encoder_decoder":
            enc = model.encoder(input_ids=t["input_ids"], attention_mask=t["input_mask"]).last_hidden_state
            dec = model.decoder(input_ids=t["decoder_input_ids"], attention_mask=t["decoder_input_mask"],
                                encoder_hidden_states=enc, encoder_attention_mask=t["input_mask"]).last_hidden_state
            logits = model(input_ids=t["input_ids"], attention_mask=t["input_mask"],
                           decoder_input_ids=t["decoder_input_ids"],
                           decoder_attention_mask=t["decoder_input_mask"]).logits
            return {"hidden": [enc.numpy(), dec.numpy()], "logits": logits.numpy()}
        kwargs = {"token_type_ids": t["token_type_ids"]} if "token_type_ids" in t else {}
        base = model.base_model(input_ids=t["input_ids"], attention_mask=t["input_mask"], **kwargs)
        if model is model.base_model:
            head = base.pooler_output
        else:
            head = model(input_ids=t["input_ids"], attention_mask=t["input_mask"], **kwargs).logits
        return {"hidden": [base.last_hidden_state.numpy()], "logits": head.numpy()}


def max_diffs(ours: dict, theirs: dict, x: dict[str, np.ndarray]) -> tuple[float, float]:
    """(hidden, logits) max abs differences at real (unpadded) tokens."""
    input_mask = x["input_mask"].astype(bool)
    last_mask = x["decoder_input_mask"].astype(bool) if "decoder_input_mask" in x else input_mask
    hidden = max(
        float(np.abs(a - b)[m].max())
        for a, b, m in zip(ours["hidden"], theirs["hidden"], (input_mask, last_mask))
    )
    a, b = ours["logits"], theirs["logits"]
    if a.ndim == 3:  # per-token logits of the last stack
        a, b = a[last_mask], b[last_mask]
    return hidden, float(np.abs(a - b).max())


def measure(name: str, workdir: str | pathlib.Path, scan_layers: bool = False) -> dict:
    """Import and export max abs diffs of one case; folders are written under workdir."""
    workdir = pathlib.Path(workdir)
    original = build_hf(name, workdir / "hf")
    cfg, params = hf.load(workdir / "hf", scan_layers=scan_layers)
    x = random_inputs(cfg)
    ours = our_outputs(cfg, params, x)
    row = dict(zip(("import_hidden", "import_logits"), max_diffs(ours, hf_outputs(original, cfg, x), x)))
    row["parameters"] = (count_params(params), original.num_parameters())  # (here, transformers)
    hf.save(cfg, params, workdir / "exported", model_type=hf.read_config(workdir / "hf")["model_type"])
    reloaded = hf_class(name).from_pretrained(workdir / "exported").eval()
    row.update(zip(("export_hidden", "export_logits"), max_diffs(ours, hf_outputs(reloaded, cfg, x), x)))
    row["round_trip"] = round_trip_changes(original, reloaded)
    return row


def round_trip_changes(original, reloaded) -> list[str]:
    """What HF -> here -> HF changed: tensor names, or rows of 2-D tensors; [] if nothing."""
    a, b = original.state_dict(), reloaded.state_dict()
    changes = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        x, y = a[name].numpy(), b[name].numpy()
        if x.shape != y.shape:
            changes.append(f"{name} (shape {x.shape} -> {y.shape})")
        elif not np.array_equal(x, y):
            rows = np.flatnonzero((x != y).reshape(len(x), -1).any(axis=1))
            changes.append(name if len(rows) == len(x) else f"{name} rows {rows.tolist()}")
    return changes


def table(scan_settings=(False, True)) -> list[dict]:
    """One row per case and scan setting."""
    rows = []
    for name, (cls, head, _) in CASES.items():
        for scan in scan_settings:
            with tempfile.TemporaryDirectory() as tmp:
                row = {"case": name, "hf_class": cls, "head": head, "scan_layers": scan}
                rows.append({**row, **measure(name, tmp, scan)})
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| case | HF class | logits compared | scan_layers | hidden (import) | logits (import) "
        "| hidden (export) | logits (export) | HF -> here -> HF changed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['hf_class']} | {r['head']} | {r['scan_layers']} | {r['import_hidden']:.1e} | "
            f"{r['import_logits']:.1e} | {r['export_hidden']:.1e} | {r['export_logits']:.1e} | "
            f"{'; '.join(r['round_trip']) or 'nothing'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import transformers

    transformers.logging.set_verbosity_error()
    print(markdown(table()))
