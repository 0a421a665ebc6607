"""Frozen config dataclasses, YAML presets with `extends:`, `key.sub=value` overrides.

Every choice a run makes lives here; models, data and trainer read these objects and
nothing else. Errors name the key and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from flaxformer_lite.errors import UserError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

Family = Literal["encoder", "decoder", "encoder_decoder"]
Position = Literal["learned", "sinusoidal", "relative", "rope", "alibi", "none"]
Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post", "sandwich"]
AttentionType = Literal["global", "local"]
Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "glu", "reglu", "geglu", "swiglu"]


class ConfigError(UserError):
    """A config file, key or value is wrong; the message names it and the fix."""


LORA_PROJECTIONS = ("query", "key", "value", "out", "wi", "wg", "wo")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on the named projections; rank 0: none.

    With rank > 0 each targeted kernel W gains A [in, rank] (random) and B [rank, out]
    (zero), the projection computes x W + (alpha / rank) dropout(x) A B, and training
    updates the adapters only: the base gets no gradient and no optimizer state.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "key", "value", "out")  # of LORA_PROJECTIONS
    # Storage of the frozen base: float32/bfloat16 for every parameter but the adapters;
    # int8 for the projection kernels (weight-only, a float32 scale per output channel),
    # nf4 for them (QLoRA's 4-bit NormalFloat, a float32 absmax per block of 64), the rest
    # in param_dtype. None: param_dtype.
    base_dtype: Optional[Literal["float32", "bfloat16", "int8", "nf4"]] = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequencies stretched for contexts longer than pre-training (ops.rope_frequencies).

    linear: every inverse frequency divided by `factor` (position interpolation).
    llama3: Llama 3.1's: wavelengths above original_max_len / low_freq_factor divided by
    `factor`, below original_max_len / high_freq_factor kept, smoothly blended between.
    """

    kind: Literal["linear", "llama3"] = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_len: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. `num_layers` is the encoder depth (or the decoder's, decoder-only)."""

    family: Family = "decoder"
    vocab_size: int = 384
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: = num_heads (MHA); 1: MQA; else GQA
    head_dim: Optional[int] = None  # None: d_model // num_heads
    d_ff: int = 512
    num_layers: int = 2
    num_decoder_layers: Optional[int] = None  # encoder_decoder only; None: = num_layers
    max_len: int = 256
    position: Position = "learned"
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None  # on global layers (all layers without attention_types)
    rope_local_theta: Optional[float] = None  # local layers' RoPE base, unscaled (Gemma 3); None: as global
    relative_buckets: int = 32
    relative_max_distance: int = 128
    sliding_window: Optional[int] = None  # keys further back than this are masked
    # Per-layer attention, a pattern repeated over the layers (layer i: [i % len]): "local"
    # layers mask keys beyond sliding_window, "global" ones do not (Gemma 2: local, global).
    # Empty: sliding_window (if any) applies to every layer (Mistral).
    attention_types: tuple[AttentionType, ...] = ()
    norm: Norm = "layernorm"
    norm_position: NormPosition = "pre"
    norm_eps: float = 1e-5
    norm_offset: bool = False  # norms multiply by 1 + scale, scale starting at 0 (Gemma)
    embedding_norm: bool = False  # BERT: LayerNorm after the summed embeddings
    final_norm: bool = True  # a norm after the last block (pre-LN stacks need it)
    activation: Activation = "gelu"
    use_bias: bool = True
    qkv_bias: bool = False  # biases on the query, key and value projections even without use_bias (Qwen2)
    qk_norm: bool = False  # a norm over each head's queries and keys before RoPE (Qwen3, Gemma 3)
    scale_attention: bool = True  # T5 folds 1/sqrt(H) into its init and does not scale
    query_scale_dim: Optional[float] = None  # logits times this**-0.5, not H**-0.5 (Gemma's query_pre_attn_scalar)
    attention_softcap: Optional[float] = None  # attention logits c * tanh(logits / c) (Gemma 2)
    logits_softcap: Optional[float] = None  # output logits c * tanh(logits / c) (Gemma 2)
    scale_embeddings: bool = False  # 2017 paper: embeddings times sqrt(d_model)
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    tie_embeddings: bool = True  # output projection is the input embedding transposed
    tied_logits_scale: bool = False  # T5 v1.0: logits of h * d_model**-0.5 (tied or untied head)
    share_embeddings: bool = True  # encoder_decoder: one input table for both stacks
    type_vocab_size: int = 0  # BERT token-type embeddings; 0: none
    mlm_head: bool = False  # encoder: BERT transform + LayerNorm before the tied decoder
    pooler: bool = False  # encoder: tanh dense over the first token
    num_labels: int = 0  # encoder: classifier over the pooled output; 0: none
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 0
    initializer_range: float = 0.02
    # Token-embedding init std; None: initializer_range. T5 draws its shared table with std
    # 1.0: its tied head scales logits by d_model**-0.5, so a table drawn at 0.05 starts
    # every logit near zero, and t5_tiny's copy loss then sat at the unigram level for
    # hundreds of steps (docs/performance-notes.md).
    embedding_init_std: Optional[float] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention_impl: Literal["xla", "auto", "cudnn", "splash"] = "xla"
    scan_layers: bool = False
    remat_policy: str = "none"  # none | full | a jax.checkpoint_policies name
    lora: LoraConfig = LoraConfig()

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def attention_scale(self) -> Optional[float]:
        """What attention logits are multiplied by; None: the default H**-0.5."""
        if not self.scale_attention:
            return 1.0
        return None if self.query_scale_dim is None else self.query_scale_dim**-0.5

    def layer_attention_types(self, num_layers: Optional[int] = None) -> tuple[str, ...]:
        """Each layer's attention type (attention_types repeated; "local" for all with a bare sliding_window)."""
        n = self.num_layers if num_layers is None else num_layers
        if not self.attention_types:
            return ("global" if self.sliding_window is None else "local",) * n
        return tuple(self.attention_types[i % len(self.attention_types)] for i in range(n))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on and how it becomes batches (see flaxformer_lite.data)."""

    objective: Literal[
        "causal_lm", "masked_lm", "span_corruption", "seq2seq", "classification", "copy", "reverse", "sft", "dpo",
        "grpo",
    ] = "causal_lm"
    # builtin | a prepared DATADIR | path/glob to text, .jsonl[.gz|.zst], .parquet, .tsv.
    # Language-model text that is not a DATADIR is prepared into the cache first
    # ($FLAXFORMER_LITE_CACHE, default ~/.cache/flaxformer_lite; docs/data.md).
    corpus: str = "builtin"
    text_field: str = "text"
    label_field: str = "label"
    # Language-model objectives: a document is a paragraph (text cut at blank lines), a
    # line, or a whole file (a built-in topic). Long documents span several rows.
    document_unit: Literal["paragraph", "line", "file"] = "paragraph"
    tokenizer: str = "byte"  # byte | path to tokenizer.json (or its folder)
    seq_len: int = 128
    # grpo: tokens each rollout may add to its prompt (prompt + these must fit in seq_len).
    max_new_tokens: int = 64
    target_len: Optional[int] = None  # seq2seq targets; None: = seq_len
    batch_size: int = 32
    pack: bool = True
    # causal_lm / masked_lm training: cut long documents at new places every epoch.
    shift_windows: bool = True
    val_fraction: float = 0.05
    # hash: items ranked by a seeded content hash; tail: the last items in corpus order.
    split: Literal["hash", "tail"] = "hash"
    mask_probability: float = 0.15
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    synthetic_vocab: int = 32  # copy / reverse tasks: symbols drawn from this many ids
    seed: int = 0
    # Checksum every shard of a prepared corpus at startup (about 1 s per GB of tokens);
    # sizes are always checked.
    verify_shards: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, loop, checkpoints."""

    learning_rate: float = 3e-3
    schedule: Literal["cosine", "linear", "inverse_sqrt", "constant"] = "cosine"
    # None: 10% of num_steps, at most DEFAULT_WARMUP_STEPS (train.optim.warmup_steps).
    warmup_steps: Optional[int] = None
    num_steps: int = 1000
    time_budget_s: Optional[float] = None  # stop early after this many seconds of training
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: Optional[float] = 1.0
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    # data.objective=dpo: how far the policy may move from the reference (DPO's beta).
    dpo_beta: float = 0.1
    # data.objective=grpo (docs/finetuning.md, "GRPO"): the reward, "FILE.py:NAME" or
    # "module:NAME" (a list for several, summed with reward_weights, default 1 each),
    # called as NAME(prompt, completion, **row) -> float.
    reward_fn: Optional[Union[str, tuple[str, ...]]] = None
    reward_weights: Optional[tuple[float, ...]] = None
    grpo_group: int = 8  # completions sampled per prompt (G); data.batch_size counts prompts
    grpo_kl: float = 0.04  # beta: weight of the k3 KL to the reference (0: off)
    grpo_clip: float = 0.2  # epsilon of the clipped policy ratio
    grpo_temperature: float = 1.0  # sampling temperature of the rollouts
    # causal_lm only: project onto the vocabulary this many tokens at a time, so the
    # [B,T,V] float32 logits are never whole (ops.chunked_cross_entropy); None: at once.
    loss_chunk_size: Optional[int] = None
    log_every: int = 50
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 3  # the newest N (>= 1, so the last good one stays) plus the best
    # A step with a non-finite loss, gradient or learning rate never updates the state. skip: warn and go
    # on, but stop after max_nonfinite_streak such steps in a row; stop: stop at once.
    nan_policy: Literal["skip", "stop"] = "skip"
    max_nonfinite_streak: int = 10
    peak_flops: Optional[float] = None  # FLOP/s that MFU divides by; None: measure a matmul
    num_samples: int = 2  # LM samples printed at the end
    sample_len: int = 64
    seed: int = 0


DEFAULT_WARMUP_STEPS = 50  # the most warmup an unset train.warmup_steps gives

# `train --init-from HF_DIR` without --config: fine-tuning a pretrained model, not training
# one from scratch (TrainConfig's defaults, lr 3e-3 and warmup 50, raised a pretrained
# SmolLM2's held-out loss). AdamW with transformers Trainer's betas and no decay, warmup
# left to its rule (10% of num_steps, at most 50), cosine to zero, no time budget;
# checkpoints every 250 steps.
FINE_TUNE_TRAIN = {
    "learning_rate": 2e-5, "schedule": "cosine", "num_steps": 1000, "time_budget_s": None,
    "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_norm": 1.0,
    "eval_every": 250, "checkpoint_every": 250,
}
# The same with model.lora.rank set and no train.learning_rate given: adapters start at
# zero and need a far larger step than full weights (BENCHMARKS.md, "LoRA fine-tuning").
FINE_TUNE_LORA_LEARNING_RATE = 1e-3
# And, unless --set gives them: remat every layer, and the loss a chunk of tokens at a
# time (causal_lm and sft, without a logits soft-cap). A SmolLM2-135M-shaped full
# fine-tune at batch 32 x 128 peaked at 4.05 GiB with both, 4.72 GiB with remat alone and
# was killed for memory at 12.75 GiB with neither (BENCHMARKS.md, "Fine-tuning memory").
FINE_TUNE_MEMORY = {"model.remat_policy": "full", "train.loss_chunk_size": 512}


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh shape and the logical-axis -> mesh-axis rules (used only by runtime/parallel.py)."""

    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    # Each rule: (logical axis, mesh axes...); no mesh axis = replicated. YAML: [batch, data, fsdp]
    rules: tuple[tuple[str, ...], ...] = (
        ("batch", "data", "fsdp"),
        ("cache_rows", "data", "fsdp", "tensor"),  # KV cache rows: (batch, kv head) pairs
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim",),
        ("layers",),
        ("length",),
        ("kv_length",),
        ("norm",),
        ("relpos_buckets",),
        ("type_vocab",),
        ("positions",),
        ("labels",),
        ("lora_rank",),
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: model, data, training, parallelism."""

    name: str = "unnamed"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()


# ---------------------------------------------------------------------------- validation

_REMAT_NAMED = ("none", "full")
# jax.checkpoint_policies usable by name alone; the others there (save_only_these_names,
# offload_dot_with_no_batch_dims, ...) are factories that need arguments.
_REMAT_POLICIES = (
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "everything_saveable",
    "nothing_saveable",
)


def validate_model(cfg: ModelConfig, prefix: str = "model") -> ModelConfig:
    """Raise ConfigError for combinations that cannot build a model; return cfg."""
    p = prefix + "."
    positive = ["vocab_size", "d_model", "num_heads", "d_ff", "num_layers", "max_len"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{p}{key}={getattr(cfg, key)} must be positive")
    if cfg.head_dim is None and cfg.d_model % cfg.num_heads:
        raise ConfigError(
            f"{p}d_model={cfg.d_model} is not divisible by {p}num_heads={cfg.num_heads}: "
            f"pick num_heads dividing d_model, or set {p}head_dim explicitly"
        )
    if cfg.num_heads % cfg.kv_heads:
        raise ConfigError(
            f"{p}num_kv_heads={cfg.kv_heads} does not divide {p}num_heads={cfg.num_heads}: "
            "each key/value head must serve a whole group of query heads"
        )
    if cfg.position == "rope" and cfg.dim_per_head % 2:
        raise ConfigError(
            f"{p}position=rope needs an even head dim, got {cfg.dim_per_head}: "
            f"change {p}d_model/{p}num_heads or set an even {p}head_dim"
        )
    if cfg.family == "encoder_decoder" and cfg.position == "alibi":
        # ALiBi is defined for causal self-attention; the encoder side has no published form.
        raise ConfigError(
            f"{p}position=alibi is for decoder-only models: use relative or rope for encoder_decoder"
        )
    if cfg.family != "encoder" and (cfg.mlm_head or cfg.pooler or cfg.num_labels):
        raise ConfigError(
            f"{p}mlm_head/pooler/num_labels are encoder heads; {p}family={cfg.family} has none: "
            "remove them or set family: encoder"
        )
    if cfg.num_labels and not cfg.pooler:
        raise ConfigError(f"{p}num_labels={cfg.num_labels} classifies the pooled output: set {p}pooler: true")
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        raise ConfigError(f"{p}sliding_window must be positive or null")
    lora = cfg.lora
    if lora.rank < 0 or lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(
            f"{p}lora: rank={lora.rank} must be >= 0 (0: no adapters), alpha={lora.alpha} positive "
            f"and dropout={lora.dropout} in [0, 1)"
        )
    unknown = [t for t in lora.targets if t not in LORA_PROJECTIONS]
    if unknown or (lora.rank and not lora.targets):
        raise ConfigError(
            f"{p}lora.targets={list(lora.targets)}: name projections among {', '.join(LORA_PROJECTIONS)}"
        )
    if lora.base_dtype is not None and not lora.rank:
        raise ConfigError(
            f"{p}lora.base_dtype={lora.base_dtype} stores a frozen base, but {p}lora.rank=0 trains every weight: "
            f"set {p}lora.rank (adapters) or drop {p}lora.base_dtype (use {p}param_dtype for a full fine-tune)"
        )
    if lora.rank and "wg" in lora.targets and cfg.activation not in ("glu", "reglu", "geglu", "swiglu"):
        raise ConfigError(
            f"{p}lora.targets has wg, the gate projection, but {p}activation={cfg.activation} has no gate: drop wg"
        )
    if "local" in cfg.attention_types and cfg.sliding_window is None:
        raise ConfigError(f"{p}attention_types has local layers but {p}sliding_window is null: set the window")
    if cfg.attention_types and cfg.family == "encoder_decoder":
        raise ConfigError(f"{p}attention_types is for single-stack models; set {p}attention_types=[] for encoder_decoder")
    if (cfg.rope_scaling is not None or cfg.rope_local_theta is not None) and cfg.position != "rope":
        raise ConfigError(f"{p}rope_scaling / {p}rope_local_theta need {p}position=rope")
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        if r.factor <= 0 or r.original_max_len <= 0:
            raise ConfigError(f"{p}rope_scaling.factor and .original_max_len must be positive")
        if r.kind == "llama3" and not 0 < r.low_freq_factor < r.high_freq_factor:
            raise ConfigError(f"{p}rope_scaling needs 0 < low_freq_factor < high_freq_factor for kind llama3")
    for key in ("query_scale_dim", "attention_softcap", "logits_softcap", "rope_local_theta"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise ConfigError(f"{p}{key}={getattr(cfg, key)} must be positive or null")
    if cfg.attention_impl == "splash":
        # The kernel takes a static mask (causal, window) and segment ids, nothing added to the logits.
        unsupported = {f"{p}position={cfg.position}": cfg.position in ("alibi", "relative"),
                       f"{p}attention_dropout_rate={cfg.attention_dropout_rate}": cfg.attention_dropout_rate > 0}
        for what, bad in unsupported.items():
            if bad:
                raise ConfigError(f"{p}attention_impl=splash cannot take {what}: the splash kernel adds no bias to "
                                  f"its logits and drops nothing; set {p}attention_impl=xla")
    if cfg.remat_policy not in _REMAT_NAMED + _REMAT_POLICIES:
        near = difflib.get_close_matches(cfg.remat_policy, _REMAT_NAMED + _REMAT_POLICIES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"{p}remat_policy={cfg.remat_policy!r} is not none, full or one of the "
            f"jax.checkpoint_policies {', '.join(_REMAT_POLICIES)}{hint}"
        )
    return cfg


def validate(cfg: Config) -> Config:
    """Validate a whole run config; return it unchanged."""
    validate_model(cfg.model)
    if cfg.data.seq_len > cfg.model.max_len and cfg.model.position in ("learned", "sinusoidal"):
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={cfg.model.max_len} "
            "with absolute positions: lower data.seq_len or raise model.max_len"
        )
    positive = {
        "data.batch_size": cfg.data.batch_size, "data.seq_len": cfg.data.seq_len,
        "train.num_steps": cfg.train.num_steps, "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.max_nonfinite_streak": cfg.train.max_nonfinite_streak,
    }
    if cfg.data.target_len is not None:
        positive["data.target_len"] = cfg.data.target_len
    if cfg.train.peak_flops is not None:
        positive["train.peak_flops"] = cfg.train.peak_flops
    if cfg.train.loss_chunk_size is not None:
        positive["train.loss_chunk_size"] = cfg.train.loss_chunk_size
        if cfg.data.objective not in ("causal_lm", "sft"):
            raise ConfigError(
                f"train.loss_chunk_size={cfg.train.loss_chunk_size} applies to data.objective=causal_lm or sft only "
                f"(got {cfg.data.objective}): set train.loss_chunk_size=null"
            )
        if cfg.model.logits_softcap is not None:
            raise ConfigError(
                f"train.loss_chunk_size={cfg.train.loss_chunk_size} cannot project a chunk at a time through "
                "model.logits_softcap: set train.loss_chunk_size=null"
            )
    if cfg.data.objective == "dpo":
        positive["train.dpo_beta"] = cfg.train.dpo_beta
    if cfg.data.objective == "grpo":
        _validate_grpo(cfg)
    if cfg.train.warmup_steps is not None and cfg.train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps} must be 0 or more (null: 10% of num_steps)")
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    rows = cfg.data.batch_size * (cfg.train.grpo_group if cfg.data.objective == "grpo" else 1)
    if rows % cfg.train.grad_accum_steps:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (grpo: times train.grpo_group) is not divisible by "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}"
        )
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    return cfg


def _validate_grpo(cfg: Config) -> None:
    """ConfigError naming the key unless the data.objective=grpo settings make sense."""
    t, d = cfg.train, cfg.data
    if not t.reward_fn:
        raise ConfigError('data.objective=grpo needs train.reward_fn="FILE.py:NAME" (or "module:NAME", or a list '
                          "of them): the function NAME(prompt, completion, **row) -> float that scores a completion")
    names = (t.reward_fn,) if isinstance(t.reward_fn, str) else t.reward_fn
    if t.reward_weights is not None and len(t.reward_weights) != len(names):
        raise ConfigError(f"train.reward_weights has {len(t.reward_weights)} entries and train.reward_fn "
                          f"{len(names)}: give one weight a reward function (or none: 1 each)")
    if t.grpo_group < 2:
        raise ConfigError(f"train.grpo_group={t.grpo_group} must be >= 2: advantages compare completions of a prompt")
    if not 0 < t.grpo_clip < 1 or t.grpo_kl < 0 or t.grpo_temperature <= 0:
        raise ConfigError(f"train.grpo_clip={t.grpo_clip} must be in (0, 1), train.grpo_kl={t.grpo_kl} >= 0 "
                          f"and train.grpo_temperature={t.grpo_temperature} > 0")
    if not 0 < d.max_new_tokens < d.seq_len:
        raise ConfigError(f"data.max_new_tokens={d.max_new_tokens} must be in [1, data.seq_len={d.seq_len}): "
                          "a row holds the prompt and its completion")
    if d.seq_len > cfg.model.max_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_len={cfg.model.max_len}, the longest "
                          "context the rollouts' KV cache may hold: lower data.seq_len")
    m = cfg.model
    if m.dropout_rate or m.attention_dropout_rate or m.lora.dropout:
        raise ConfigError("data.objective=grpo compares the trainer's log-probabilities with the rollouts': set "
                          "model.dropout_rate=0, model.attention_dropout_rate=0 and model.lora.dropout=0")


# ---------------------------------------------------------------------------- dict <-> dataclass


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (tuples from lists)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] + (" or null" if type(None) in args else ""))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{key}={value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 5e-3 (no dot) as a string
    if tp in (int, float, str, bool):
        # bool is an int in Python; an int field given `true` is still a mistake.
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(
                f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, naming any unknown or ill-typed key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean {prefix + near[0]!r}?" if near else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# ---------------------------------------------------------------------------- YAML


def resolve_config_path(path: str | pathlib.Path) -> pathlib.Path:
    """A path as given, or a preset name (`gpt_tiny`) looked up in configs/."""
    p = pathlib.Path(path)
    if p.exists():
        return p
    preset = CONFIG_DIR / (p.name if p.suffix else p.name + ".yaml")
    if preset.exists():
        return preset
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    near = difflib.get_close_matches(p.stem, names, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"config file {str(path)!r} not found{hint} (presets: {', '.join(names)})")


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: pathlib.Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `extends:` cycle through {[str(s) for s in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is not None:
        parent_path = path.parent / parent
        if not parent_path.exists():
            raise ConfigError(f"{path}: extends {parent!r}, which does not exist next to it")
        data = _deep_merge(_read_yaml(parent_path, seen + (path.resolve(),)), data)
    return data


def apply_override(data: dict, override: str) -> dict:
    """Apply one `a.b.c=value` string (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value, e.g. model.num_layers=2")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from None
    parts = key.strip().split(".")
    out = dict(data)
    node = out
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part) or {}, dict):
            raise ConfigError(
                f"override {override!r}: {'.'.join(parts[: i + 1])} is a value, not a section; "
                "set it directly (e.g. name=my_run) or fix the key path"
            )
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[parts[-1]] = value
    return out


def load_config(path: str | pathlib.Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML run config (following `extends:`), apply overrides, validate."""
    file = resolve_config_path(path)
    return build_config(_read_yaml(file), overrides, source=str(file))


def read_config_dict(path: str | pathlib.Path) -> dict:
    """A YAML run config as the dict it holds (with `extends:` followed), not yet validated."""
    return _read_yaml(resolve_config_path(path))


def build_config(data: dict, overrides: typing.Sequence[str] = (), *, source: str = "") -> Config:
    """A validated Config from a dict shaped as the YAML is, after key=value overrides.

    source names where the dict came from in error messages.
    """
    for o in overrides:
        data = apply_override(data, o)
    try:
        return validate(from_dict(Config, data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def dump_config(cfg: Config, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML (loadable by load_config)."""
    pathlib.Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
