"""A tiny chat model's HF folder, as the Hub has them: a random Llama written by transformers,
a BPE tokenizer.json with special tokens and no pad token, a tokenizer_config.json holding
the chat template, and a generation_config.json with two stop ids."""

import json

import tokenizers as hf
import torch
import transformers

from flaxformer_lite import data

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_CONFIG = {
    "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
    "chat_template": CHATML, "model_max_length": 128, "tokenizer_class": "PreTrainedTokenizerFast",
}


def write_tokenizer(folder, vocab_size=320):
    """tokenizer.json (byte-level BPE over the builtin corpus, SPECIALS first) and tokenizer_config.json."""
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(data.builtin_documents()[:40], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    return tok.get_vocab_size()


def write_llama_chat_folder(folder, *, stop_ids=(), seed=0):
    """The folder; `stop_ids` are extra eos ids for generation_config.json. Returns the torch model."""
    vocab = write_tokenizer(folder)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random weights at a scale that makes greedy decoding vary
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=[2, 0, *stop_ids], max_length=None
    )
    model.save_pretrained(folder)
    return model
