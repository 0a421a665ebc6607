"""flaxformer_lite: encoder-only, decoder-only and encoder-decoder Transformers in JAX/Flax.

The public names below are imported on first use (PEP 562), so `import flaxformer_lite`
and `flaxformer-lite --help` do not start JAX; `ffl.init_params` and the rest behave as
ordinary attributes.
"""

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute in it; None: the module itself)
_PUBLIC = {
    **{name: ("flaxformer_lite.config", name) for name in (
        "Config", "ConfigError", "DataConfig", "ModelConfig", "ParallelConfig", "TrainConfig",
        "dump_config", "load_config",
    )},
    **{name: ("flaxformer_lite.models", name) for name in (
        "ModelOutput", "build_model", "count_params", "init_params",
    )},
    "hf": ("flaxformer_lite.interop.hf", None),
    "generate": ("flaxformer_lite.inference.decode", "generate"),
    "viz": ("flaxformer_lite.viz", None),
    "embed": ("flaxformer_lite.inference.embeddings", "embed"),
    "summary": ("flaxformer_lite.models.summary", "summary"),
}

__all__ = sorted(_PUBLIC)


def lazy_exports(package: str, namespace: dict, public: dict):
    """(__getattr__, __dir__) for a package whose `public` names, {name: (module,
    attribute or None for the module itself)}, are imported on first use (PEP 562)."""

    def __getattr__(name):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, attribute = public[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(__name__, globals(), _PUBLIC)
