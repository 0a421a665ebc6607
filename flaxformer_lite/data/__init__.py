"""Tokenizers, corpora, objectives and grain input pipelines. Never imports models/.

    from flaxformer_lite import data
    tok = data.load_tokenizer("byte")
    train_docs, val_docs = data.split(data.load_corpus("causal_lm"), val_fraction=0.05)
    ds = data.make_dataset("causal_lm", train_docs, tokenizer=tok, batch_size=32, seq_len=128)

At scale, a corpus is tokenized once into a token store that training streams from:

    prepare("corpus/", "data/web", PrepareOptions(tokenizer="tok.json"))
    ds = make_dataset("causal_lm", Store.open("data/web").documents("train"), ...)

See objectives.py for the batch contract, pipeline.py for resuming iterators, store.py
for the on-disk format and prepare.py for making one.
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
    STREAM_OBJECTIVES,
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
from flaxformer_lite.data.preparation import PrepareOptions, cached, corpus_store, merge, prepare, prepare_source
from flaxformer_lite.data.sources import iter_texts
from flaxformer_lite.data.store import Documents, Store, is_store
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
    "Documents",
    "HFTokenizer",
    "LabeledCorpus",
    "OBJECTIVES",
    "PrepareOptions",
    "STREAM_OBJECTIVES",
    "Store",
    "Tokenizer",
    "build",
    "builtin_classification",
    "builtin_documents",
    "causal_lm_batch",
    "cached",
    "check_ids",
    "classification_batch",
    "corpus_store",
    "is_store",
    "iter_texts",
    "load_corpus",
    "load_labeled",
    "load_pairs",
    "load_texts",
    "load_tokenizer",
    "make_dataset",
    "mask_tokens",
    "masked_lm_batch",
    "merge",
    "prepare",
    "prepare_source",
    "random_spans_noise_mask",
    "seq2seq_batch",
    "shard",
    "span_corruption",
    "span_corruption_lengths",
    "split",
    "train_tokenizer",
]
