"""Model assemblies: Encoder, Decoder, EncoderDecoder, built from a ModelConfig."""

from flaxformer_lite.models.layout import stack_layers, unstack_layers
from flaxformer_lite.models.stack import Stack
from flaxformer_lite.models.transformer import (
    FAMILIES,
    Decoder,
    Encoder,
    EncoderDecoder,
    ModelOutput,
    build_model,
    count_params,
    dummy_inputs,
    init_params,
    lm_head_inputs,
    param_logical_axes,
)
