"""Greedy parity with transformers' generate (PyTorch) on tiny random GPT-2 and T5 folders,
and `flaxformer-lite generate` from such a folder and from a run directory made of one.

All generate calls on the GPT-2 use 3 prompts of at most 16 tokens and 8 new tokens, so
the API and both command-line sources share one compiled program.
"""

import numpy as np
import pytest
import torch
import transformers
from decode_helpers import NEW_TOKENS, PROMPT_LENGTHS

import flaxformer_lite as ffl
from flaxformer_lite import data
from flaxformer_lite.cli import main
from flaxformer_lite.inference.decode import generate
from flaxformer_lite.interop import hf, parity
from flaxformer_lite.models import build_model
from flaxformer_lite.runtime import checkpoint

VOCAB = 320  # byte-level BPE: 4 specials + 256 bytes + 60 merges


def _randomize(model):
    """Weights far from HF's small init, so greedy paths vary instead of repeating a token."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = ("ln_" in name or "layer_norm" in name) and name.endswith("weight")
            p.copy_(float(is_norm) + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2 folder: config.json, model.safetensors and a tokenizer.json trained here."""
    path = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    _randomize(transformers.GPT2LMHeadModel(config)).save_pretrained(path)
    data.train_tokenizer(data.builtin_documents()[:50], kind="bpe", vocab_size=VOCAB, out_path=path, num_sentinels=0)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    _randomize(transformers.T5ForConditionalGeneration(config)).save_pretrained(path)
    return path


def _hf_greedy(model, prompts, decoder_only, new_tokens=NEW_TOKENS):
    """transformers' greedy generate on prompts padded as HF expects (left for decoders)."""
    P = max(map(len, prompts))
    ids, mask = torch.zeros((len(prompts), P), dtype=torch.long), torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        cols = slice(P - len(p), P) if decoder_only else slice(0, len(p))
        ids[b, cols], mask[b, cols] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
    return out[:, P:].numpy() if decoder_only else out[:, 1:].numpy()  # T5: drop the start token


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_greedy_tokens_match_transformers(kind, request):
    folder = request.getfixturevalue(f"{kind}_dir")
    reference = transformers.AutoModelForPreTraining.from_pretrained(folder)
    cfg, params = hf.load(folder)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in PROMPT_LENGTHS]
    theirs = _hf_greedy(reference, prompts, decoder_only=kind == "gpt2")
    ours = np.asarray(generate(build_model(cfg), params, prompts, max_new_tokens=NEW_TOKENS).tokens)
    # transformers stops the batch when every row has ended; the rest is padding here.
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == cfg.pad_token_id).all()


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_repetition_penalty_matches_transformers(kind, request):
    """Greedy with repetition_penalty 1.8: the same tokens as transformers', which penalises
    the prompt (decoder-only) or the start token (T5) and every token generated. Rows of
    one length: transformers also penalises a left-padded row's pad id."""
    folder = request.getfixturevalue(f"{kind}_dir")
    reference = transformers.AutoModelForPreTraining.from_pretrained(folder)
    cfg, params = hf.load(folder)
    rng = np.random.default_rng(2)
    prompts = rng.integers(3, VOCAB, (3, 12))
    with torch.no_grad():
        out = reference.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                 max_new_tokens=16, do_sample=False, num_beams=1, repetition_penalty=1.8)
    theirs = out[:, 12:].numpy() if kind == "gpt2" else out[:, 1:].numpy()
    model = build_model(cfg)
    ours = np.asarray(generate(model, params, prompts.tolist(), max_new_tokens=16, repetition_penalty=1.8).tokens)
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    plain = np.asarray(generate(model, params, prompts.tolist(), max_new_tokens=16).tokens)
    assert (plain != ours).any()  # the penalty changed the text


# One parity case (interop/parity.py) per HF model_type added with the block's family
# options, with prompts of 3-14 tokens and 16 new tokens: longer than the windows (4).
FAMILY_CASES = ["llama 3 (llama3 RoPE, head_dim 24)", "qwen2 (qkv bias, window 4 on layer 1)", "qwen3 (q/k norms)",
                "gemma2 (window 4, soft caps)", "gemma3 (q/k norms, local RoPE base)"]


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_greedy_tokens_match_transformers(case, tmp_path):
    reference = parity.build_hf(case, tmp_path)
    cfg, params = hf.load(tmp_path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    theirs = _hf_greedy(reference, prompts, decoder_only=True, new_tokens=16)
    ours = np.asarray(generate(build_model(cfg), params, prompts, max_new_tokens=16).tokens)
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert theirs.shape[1] == 16 or (ours[:, theirs.shape[1]:] == cfg.pad_token_id).all()


TEXTS = ["The", "Python docs say", "A list is"]


def _cli(*args):
    return main(["generate", *args, *sum((["--prompt", t] for t in TEXTS), []), "--max-new-tokens", str(NEW_TOKENS)])


def test_cli_generates_from_an_hf_folder(gpt2_dir, capsys):
    assert _cli("--hf", str(gpt2_dir)) == 0
    printed = capsys.readouterr().out.splitlines()
    tokenizer = hf.load_tokenizer(gpt2_dir)
    prompts = [tokenizer.encode(t) for t in TEXTS]  # GPT-2 prompts carry no BOS
    theirs = _hf_greedy(transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir), prompts, decoder_only=True)
    assert printed == [t + tokenizer.decode(row) for t, row in zip(TEXTS, theirs)]


@pytest.fixture(scope="module")
def workdir(gpt2_dir, tmp_path_factory):
    """A run directory holding the GPT-2's weights, its config and its tokenizer."""
    path = tmp_path_factory.mktemp("run")
    model_cfg, params = hf.load(gpt2_dir)
    data_cfg = ffl.DataConfig(tokenizer=str(gpt2_dir / "tokenizer.json"), seq_len=64)
    checkpoint.save_params(path, ffl.Config(name="gpt2_run", model=model_cfg, data=data_cfg), params)
    return path


def test_cli_generates_from_a_run_directory(workdir, capsys):
    assert _cli("--workdir", str(workdir)) == 0
    printed = capsys.readouterr().out.splitlines()
    cfg, params = checkpoint.load_params(workdir)
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    # Runs train on bos + text + eos, so the command starts their prompts with BOS.
    prompts = [tokenizer.encode(t, bos=True) for t in TEXTS]
    out = generate(build_model(cfg.model), params, prompts, max_new_tokens=NEW_TOKENS)
    rows = [row[:n] for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]
    assert printed == [t + tokenizer.decode(row) for t, row in zip(TEXTS, rows)]

    assert main(["generate", "--workdir", str(workdir), "--prompt", TEXTS[1], "--stream",
                 "--max-new-tokens", str(NEW_TOKENS)]) == 0
    # --stream prints what the command prints without it: the prompt, then the continuation.
    assert capsys.readouterr().out.splitlines() == [printed[1]]
