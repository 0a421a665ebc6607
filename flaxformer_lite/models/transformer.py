"""The three families as data: which stacks, which masks, which heads.

Encoder (BERT): bidirectional stack, optional MLM head, pooler and classifier.
Decoder (GPT-2, LLaMA): causal stack, tied or untied LM head.
EncoderDecoder (Vaswani et al. 2017, T5): both stacks, cross-attention, shared or
separate input embeddings.
"""

from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig, validate_model
from flaxformer_lite.layers import Dense, Embed, Norm, lora
from flaxformer_lite.layers.common import dtype, param_dtype
from flaxformer_lite.models.stack import Stack

Array = jax.Array


@flax.struct.dataclass
class ModelOutput:
    """What every model returns.

    logits: [B,T,V] LM or MLM logits (None for an encoder without an MLM head).
    hidden_states: [B,T,D] output of the last stack (the decoder's, encoder-decoder).
    encoder_hidden_states: [B,S,D] (encoder-decoder only).
    pooled / class_logits: [B,D] / [B,num_labels] (encoder with pooler / classifier).
    attentions: per-layer attention probabilities when asked, stacked on a leading
      layer axis: {"encoder": [L,B,N,T,T]}, {"decoder": ...}, {"cross": [L,B,N,T,S]}.
    """

    logits: Optional[Array] = None
    hidden_states: Optional[Array] = None
    encoder_hidden_states: Optional[Array] = None
    pooled: Optional[Array] = None
    class_logits: Optional[Array] = None
    attentions: Optional[dict] = None


def _valid(ids_BT, attention_mask, segment_ids):
    if attention_mask is not None:
        return attention_mask.astype(bool)
    if segment_ids is not None:
        return segment_ids != 0
    return jnp.ones(ids_BT.shape, bool)


def _positions(ids_BT, positions):
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)


def _lm_logits(cfg: ModelConfig, embed: Embed, lm_head: Optional[Dense], h_BTD):
    # T5 v1.0 rescales before the tied projection; HF T5 can also rescale before an untied one.
    if cfg.tied_logits_scale:
        h_BTD = h_BTD * jnp.asarray(cfg.d_model**-0.5, h_BTD.dtype)
    logits = embed.attend(h_BTD) if lm_head is None else lm_head(h_BTD)
    return ops.soft_cap(logits, cfg.logits_softcap)


def _attn(prefix, weights):
    if weights is None:
        return None
    out = {prefix: weights["self"]}
    if "cross" in weights:
        out["cross"] = weights["cross"]
    return out


class Decoder(nn.Module):
    """Decoder-only LM. `decode=True` reads/writes the KV cache (see Stack)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.token_embed = Embed(cfg, cfg.vocab_size)
        self.decoder = Stack(cfg, cfg.num_layers, causal=True)
        self.lm_head = None if cfg.tie_embeddings else Dense(cfg, cfg.vocab_size, ("embed", "vocab"), use_bias=False)

    def __call__(
        self,
        input_ids: Array,
        *,
        attention_mask: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        positions: Optional[Array] = None,
        deterministic: bool = True,
        decode: bool = False,
        return_attentions: bool = False,
    ) -> ModelOutput:
        h_BTD, w = self.decoder(
            self.token_embed(input_ids),
            valid_BT=_valid(input_ids, attention_mask, segment_ids),
            positions_BT=_positions(input_ids, positions),
            segment_ids_BT=segment_ids,
            deterministic=deterministic, decode=decode, return_weights=return_attentions,
        )
        logits = _lm_logits(self.cfg, self.token_embed, self.lm_head, h_BTD)
        return ModelOutput(logits=logits, hidden_states=h_BTD, attentions=_attn("decoder", w))


class Encoder(nn.Module):
    """Bidirectional encoder with BERT-style heads: MLM, pooler, classifier."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.token_embed = Embed(cfg, cfg.vocab_size)
        if cfg.type_vocab_size:
            self.type_embed = Embed(cfg, cfg.type_vocab_size, axes=("type_vocab", "embed"))
        self.encoder = Stack(cfg, cfg.num_layers, causal=False)
        if cfg.mlm_head:
            self.mlm_transform = Dense(cfg, cfg.d_model, ("embed", "mlp"))
            self.mlm_norm = Norm(cfg)
            self.mlm_bias = self.param(
                "mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                (cfg.vocab_size,), param_dtype(cfg),
            )
        if cfg.pooler:
            self.pooler = Dense(cfg, cfg.d_model, ("embed", "mlp"))
        if cfg.num_labels:
            self.classifier_dropout = nn.Dropout(cfg.dropout_rate)
            self.classifier = Dense(cfg, cfg.num_labels, ("embed", "labels"))

    def __call__(
        self,
        input_ids: Array,
        *,
        attention_mask: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        positions: Optional[Array] = None,
        token_type_ids: Optional[Array] = None,
        deterministic: bool = True,
        return_attentions: bool = False,
    ) -> ModelOutput:
        cfg = self.cfg
        x_BTD = self.token_embed(input_ids)
        if cfg.type_vocab_size:
            types_BT = token_type_ids if token_type_ids is not None else jnp.zeros_like(input_ids)
            x_BTD = x_BTD + self.type_embed(types_BT)
        h_BTD, w = self.encoder(
            x_BTD,
            valid_BT=_valid(input_ids, attention_mask, segment_ids),
            positions_BT=_positions(input_ids, positions),
            segment_ids_BT=segment_ids,
            deterministic=deterministic, return_weights=return_attentions,
        )
        logits = pooled = class_logits = None
        if cfg.mlm_head:
            t_BTD = self.mlm_norm(ops.activate(self.mlm_transform(h_BTD), cfg.activation))
            logits = self.token_embed.attend(t_BTD) + jnp.asarray(self.mlm_bias, t_BTD.dtype)
        if cfg.pooler:
            pooled = jnp.tanh(self.pooler(h_BTD[:, 0]))
            if cfg.num_labels:
                dropped = self.classifier_dropout(pooled, deterministic=deterministic)
                class_logits = self.classifier(dropped)
        return ModelOutput(
            logits=logits, hidden_states=h_BTD, pooled=pooled, class_logits=class_logits,
            attentions=_attn("encoder", w),
        )


class EncoderDecoder(nn.Module):
    """Encoder + cross-attending decoder. Methods `encode` and `decode` for generation."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.token_embed = Embed(cfg, cfg.vocab_size)
        self.decoder_token_embed = None if cfg.share_embeddings else Embed(cfg, cfg.vocab_size)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False)
        self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, has_cross=True)
        self.lm_head = None if cfg.tie_embeddings else Dense(cfg, cfg.vocab_size, ("embed", "vocab"), use_bias=False)

    def encode(
        self,
        input_ids: Array,
        *,
        attention_mask: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        positions: Optional[Array] = None,
        deterministic: bool = True,
        return_attentions: bool = False,
    ) -> ModelOutput:
        """Run the encoder; hidden_states is the encoder output."""
        h_BSD, w = self.encoder(
            self.token_embed(input_ids),
            valid_BT=_valid(input_ids, attention_mask, segment_ids),
            positions_BT=_positions(input_ids, positions),
            segment_ids_BT=segment_ids,
            deterministic=deterministic, return_weights=return_attentions,
        )
        return ModelOutput(hidden_states=h_BSD, encoder_hidden_states=h_BSD, attentions=_attn("encoder", w))

    def decode(
        self,
        decoder_input_ids: Array,
        encoder_hidden_states: Optional[Array],
        *,
        encoder_attention_mask: Optional[Array] = None,
        encoder_segment_ids: Optional[Array] = None,
        decoder_attention_mask: Optional[Array] = None,
        decoder_segment_ids: Optional[Array] = None,
        decoder_positions: Optional[Array] = None,
        deterministic: bool = True,
        decode: bool = False,
        return_attentions: bool = False,
    ) -> ModelOutput:
        """Run the decoder over the encoder output.

        With decode=True, pass encoder_hidden_states on the first (prefill) call only;
        later calls pass None and reuse the cached cross-attention keys and values.
        """
        embed = self.token_embed if self.decoder_token_embed is None else self.decoder_token_embed
        enc_valid = encoder_attention_mask
        if enc_valid is None and encoder_segment_ids is not None:
            enc_valid = encoder_segment_ids != 0
        h_BTD, w = self.decoder(
            embed(decoder_input_ids),
            valid_BT=_valid(decoder_input_ids, decoder_attention_mask, decoder_segment_ids),
            positions_BT=_positions(decoder_input_ids, decoder_positions),
            segment_ids_BT=decoder_segment_ids,
            encoder_BSD=encoder_hidden_states,
            encoder_valid_BS=enc_valid,
            encoder_segment_ids_BS=encoder_segment_ids,
            deterministic=deterministic, decode=decode, return_weights=return_attentions,
        )
        logits = _lm_logits(self.cfg, embed, self.lm_head, h_BTD)
        return ModelOutput(
            logits=logits, hidden_states=h_BTD, encoder_hidden_states=encoder_hidden_states,
            attentions=_attn("decoder", w),
        )

    def __call__(
        self,
        input_ids: Array,
        decoder_input_ids: Array,
        *,
        attention_mask: Optional[Array] = None,
        decoder_attention_mask: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        decoder_segment_ids: Optional[Array] = None,
        positions: Optional[Array] = None,
        decoder_positions: Optional[Array] = None,
        deterministic: bool = True,
        return_attentions: bool = False,
    ) -> ModelOutput:
        enc = self.encode(
            input_ids, attention_mask=attention_mask, segment_ids=segment_ids, positions=positions,
            deterministic=deterministic, return_attentions=return_attentions,
        )
        dec = self.decode(
            decoder_input_ids, enc.hidden_states,
            encoder_attention_mask=attention_mask, encoder_segment_ids=segment_ids,
            decoder_attention_mask=decoder_attention_mask, decoder_segment_ids=decoder_segment_ids,
            decoder_positions=decoder_positions, deterministic=deterministic,
            return_attentions=return_attentions,
        )
        attentions = None
        if return_attentions:
            attentions = {**enc.attentions, **dec.attentions}
        return dec.replace(encoder_hidden_states=enc.hidden_states, attentions=attentions)


FAMILIES = {"encoder": Encoder, "decoder": Decoder, "encoder_decoder": EncoderDecoder}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The flax.linen Module for cfg.family (validated first)."""
    validate_model(cfg)
    return FAMILIES[cfg.family](cfg)


def dummy_inputs(cfg: ModelConfig, batch: int = 1, length: int = 2) -> tuple:
    """Positional arguments that initialise `build_model(cfg)`."""
    ids = jnp.ones((batch, length), jnp.int32)
    return (ids, ids) if cfg.family == "encoder_decoder" else (ids,)


def _boxed_params(model: nn.Module, cfg: ModelConfig, rng: Array) -> dict:
    """model.init's boxed parameters, with activation sharding constraints switched off.

    The dummy batch of 1 cannot be split over a mesh's batch axes, and init needs no
    activation placement; parameter constraints apply when the boxes are unboxed.
    """
    with nn.logical_axis_rules(()):
        return lora.quantize_base(model.init(rng, *dummy_inputs(cfg))["params"], cfg)


def lm_head_inputs(cfg: ModelConfig, params: dict, h_BTD: Array) -> tuple[Array, Array]:
    """(h_BTD, table_VD) whose product h @ table.T is a Decoder's LM logits.

    For a loss that projects onto the vocabulary a chunk of tokens at a time
    (ops.chunked_cross_entropy). `h_BTD` is the Decoder's ModelOutput.hidden_states;
    `params` is {'params': ...}.
    """
    if cfg.family != "decoder":
        raise ValueError(f"lm_head_inputs: family {cfg.family!r}; only a decoder-only model's logits are h @ table.T")
    if cfg.logits_softcap is not None:
        raise ValueError("lm_head_inputs: model.logits_softcap caps the logits, which are then not h @ table.T")
    if cfg.tied_logits_scale:
        h_BTD = h_BTD * jnp.asarray(cfg.d_model**-0.5, h_BTD.dtype)
    tree = params["params"]
    if cfg.tie_embeddings:  # as Embed.attend: the table in the compute dtype
        return h_BTD, jnp.asarray(tree["token_embed"]["embedding"], dtype(cfg))
    kernel_DV = tree["lm_head"]["kernel"]  # as Dense: computed in the kernel's dtype
    return h_BTD.astype(kernel_DV.dtype), kernel_DV.T


def init_params(cfg: ModelConfig, rng: Array) -> dict:
    """{'params': ...}: unboxed parameters of a fresh model (logical names dropped).

    Works inside any mesh and logical-axis rules (parallel.use_mesh); there the parameters
    carry their rules' sharding constraints.
    """
    return {"params": nn.unbox(_boxed_params(build_model(cfg), cfg, rng))}


def param_logical_axes(cfg: ModelConfig) -> dict:
    """{'params': tree of PartitionSpec of logical axis names}, without allocating."""
    model = build_model(cfg)
    boxed = jax.eval_shape(lambda: _boxed_params(model, cfg, jax.random.key(0)))
    return {"params": nn.get_partition_spec(boxed)}


def count_params(params) -> int:
    """Total number of parameter entries in a pytree."""
    return sum(x.size for x in jax.tree.leaves(params))
