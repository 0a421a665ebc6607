"""flaxformer_lite: encoder-only, decoder-only and encoder-decoder Transformers in JAX/Flax."""

from flaxformer_lite.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    dump_config,
    load_config,
)
from flaxformer_lite.models import (
    ModelOutput,
    build_model,
    count_params,
    init_params,
)
from flaxformer_lite.interop import hf
from flaxformer_lite.decode import generate
from flaxformer_lite import viz
from flaxformer_lite.embeddings import embed
from flaxformer_lite.model_summary import summary

__version__ = "0.1.0"
