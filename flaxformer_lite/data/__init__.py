"""Tokenizers, corpora, objectives and grain input pipelines. Never imports models/.

    from flaxformer_lite import data
    tok = data.load_tokenizer("byte")
    train_docs, val_docs = data.split(data.load_corpus("causal_lm"), val_fraction=0.05)
    ds = data.make_dataset("causal_lm", train_docs, tokenizer=tok, batch_size=32, seq_len=128)

See objectives.py for the batch contract and pipeline.py for resuming iterators.
"""

from flaxformer_lite.data.corpora import (
    BUILTIN,
    LabeledCorpus,
    builtin_classification,
    builtin_documents,
    load_labeled,
    load_pairs,
    load_texts,
    split,
)
from flaxformer_lite.data.errors import DataError
from flaxformer_lite.data.objectives import (
    OBJECTIVES,
    causal_lm_batch,
    classification_batch,
    load_corpus,
    make_dataset,
    mask_tokens,
    masked_lm_batch,
    random_spans_noise_mask,
    seq2seq_batch,
    span_corruption,
    span_corruption_lengths,
)
from flaxformer_lite.data.pipeline import build, check_ids, shard
from flaxformer_lite.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BUILTIN",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "LabeledCorpus",
    "OBJECTIVES",
    "Tokenizer",
    "build",
    "builtin_classification",
    "builtin_documents",
    "causal_lm_batch",
    "check_ids",
    "classification_batch",
    "load_corpus",
    "load_labeled",
    "load_pairs",
    "load_texts",
    "load_tokenizer",
    "make_dataset",
    "mask_tokens",
    "masked_lm_batch",
    "random_spans_noise_mask",
    "seq2seq_batch",
    "shard",
    "span_corruption",
    "span_corruption_lengths",
    "split",
    "train_tokenizer",
]
