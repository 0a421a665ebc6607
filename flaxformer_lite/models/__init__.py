"""Model assemblies: Encoder, Decoder, EncoderDecoder, built from a ModelConfig; their
FLOPs (flops.py), summaries (summary.py) and the `summary` command (commands.py).

The public names are imported on first use (PEP 562), so `flaxformer-lite summary --help`
reaches commands.py without starting JAX.
"""

from flaxformer_lite import lazy_exports

_PUBLIC = {
    **{name: ("flaxformer_lite.models.layout", name) for name in ("stack_layers", "unstack_layers")},
    "Stack": ("flaxformer_lite.models.stack", "Stack"),
    **{name: ("flaxformer_lite.models.transformer", name) for name in (
        "FAMILIES", "Decoder", "Encoder", "EncoderDecoder", "ModelOutput", "build_model", "count_params",
        "dummy_inputs", "init_params", "lm_head_inputs", "param_logical_axes",
    )},
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _PUBLIC)
