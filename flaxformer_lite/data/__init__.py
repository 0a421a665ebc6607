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

from flaxformer_lite import lazy_exports

# Imported on first use, so `flaxformer-lite prepare --help` does not start JAX (objectives
# and pipelines import grain, which imports JAX).
_PUBLIC = {
    **{name: ("flaxformer_lite.data.corpora", name) for name in (
        "BUILTIN", "LabeledCorpus", "builtin_classification", "builtin_documents", "load_labeled",
        "load_pairs", "load_texts", "split",
    )},
    **{name: ("flaxformer_lite.data.chat", name) for name in (
        "tokenizer_template",
    )},
    **{name: ("flaxformer_lite.data.errors", name) for name in (
        "DataError",
    )},
    **{name: ("flaxformer_lite.data.objectives", name) for name in (
        "FINETUNE_OBJECTIVES", "OBJECTIVES", "STREAM_OBJECTIVES", "causal_lm_batch", "classification_batch",
        "dpo_batch", "grpo_batch", "sft_batch",
        "load_corpus", "make_dataset", "mask_tokens", "masked_lm_batch", "random_spans_noise_mask",
        "seq2seq_batch", "span_corruption", "span_corruption_lengths",
    )},
    **{name: ("flaxformer_lite.data.pipeline", name) for name in (
        "build", "check_ids", "shard",
    )},
    **{name: ("flaxformer_lite.data.preparation", name) for name in (
        "PrepareOptions", "cached", "corpus_store", "merge", "prepare", "prepare_source",
    )},
    **{name: ("flaxformer_lite.data.sources", name) for name in (
        "iter_texts",
    )},
    **{name: ("flaxformer_lite.data.store", name) for name in (
        "Documents", "Store", "chat_template_record", "is_store",
    )},
    **{name: ("flaxformer_lite.data.tokenizers", name) for name in (
        "ByteTokenizer", "HFTokenizer", "SamplingDefaults", "Tokenizer", "bos_or_none", "leading_bos",
        "load_tokenizer", "sampling_defaults", "train_tokenizer",
    )},
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _PUBLIC)
