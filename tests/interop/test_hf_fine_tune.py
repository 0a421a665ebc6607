"""An HF folder as a run's source: `train --init-from HF_DIR`, then `convert --to-hf`, in
subprocesses; transformers loads the export with the source's tokenizer files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tokenizers as hf_tokenizers
import torch
import transformers
import yaml
from hf_chat_folder import CHATML, write_llama_chat_folder

from flaxformer_lite import cli, data
from flaxformer_lite.config import FINE_TUNE_TRAIN
from flaxformer_lite.interop import hf
from flaxformer_lite.runtime import checkpoint

transformers.logging.set_verbosity_error()
STEPS = 3
SMALL = ["train.num_steps=3", "data.batch_size=8", "data.seq_len=32", "train.eval_batches=1", "train.log_every=1",
         "train.num_samples=0", "train.peak_flops=1e12"]


def _cli(*args):
    result = subprocess.run([sys.executable, "-m", "flaxformer_lite", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine_tune")
    write_llama_chat_folder(root / "src")
    corpus = root / "corpus.txt"  # a small corpus: the builtin one takes seconds to tokenize
    corpus.write_text("\n\n".join(data.builtin_documents()[:60]))
    _cli("train", "--init-from", root / "src", "--workdir", root / "run", "--set", *SMALL, f"data.corpus={corpus}")
    _cli("convert", "--from", root / "run", "--to-hf", root / "out")
    return root


def test_the_run_fine_tunes_with_defaults_and_keeps_its_source(exported):
    run = exported / "run"
    saved = yaml.safe_load((run / checkpoint.CONFIG_FILE).read_text())
    overridden = {k.split("=")[0].split(".")[1] for k in SMALL if k.startswith("train.")}
    assert {k: saved["train"][k] for k in FINE_TUNE_TRAIN if k not in overridden} == {
        k: v for k, v in FINE_TUNE_TRAIN.items() if k not in overridden
    }
    assert saved["train"]["learning_rate"] == 2e-5 and saved["train"]["time_budget_s"] is None
    assert saved["data"]["objective"] == "causal_lm" and saved["data"]["tokenizer"] == hf.HF_SOURCE_DIR  # in the run
    assert checkpoint.read_config(run).data.tokenizer == str((run / hf.HF_SOURCE_DIR).absolute())
    assert saved["model"] == json.loads(json.dumps(saved["model"]))  # plain YAML, the folder's model
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (run / hf.HF_SOURCE_DIR / name).read_bytes() == (exported / "src" / name).read_bytes()
    # The tokenizer has no pad token, and causal LM trained anyway; the loss was measured.
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r][-1] == STEPS


def test_transformers_loads_the_export_with_the_source_tokenizer(exported):
    src, out = exported / "src", exported / "out"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    source_model = transformers.AutoModelForCausalLM.from_pretrained(src)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, source_model.state_dict()[n])]
    assert changed  # it trained
    ours, theirs = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(src)
    assert ours.special_tokens_map == theirs.special_tokens_map and ours.pad_token is None
    assert ours.chat_template == theirs.chat_template == CHATML
    chat = [{"role": "user", "content": "hello there"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert model.generation_config.eos_token_id == source_model.generation_config.eos_token_id == [2, 0]
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (out, src))
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert {k: config.get(k, "absent") for k in hf.TOKEN_ID_KEYS} == {
        k: source_config.get(k, "absent") for k in hf.TOKEN_ID_KEYS
    }
    # The exported weights are the run's: same logits here and in transformers.
    cfg, params = checkpoint.load_params(exported / "run")
    ids = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (1, 12))
    from flaxformer_lite.models import build_model

    logits = np.asarray(build_model(cfg.model).apply(params, ids).logits)
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_init_from_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    assert cli.main(["train", "--init-from", str(tmp_path / "src"), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init-from ") and "whisper" in err and "\n" not in err
    assert cli.main(["train", "--workdir", str(tmp_path / "run")]) == 2
    assert "train needs --config FILE" in capsys.readouterr().err
    write_llama_chat_folder(tmp_path / "bare")
    (tmp_path / "bare" / "tokenizer.json").unlink()
    assert cli.main(["train", "--init-from", str(tmp_path / "bare"), "--workdir", str(tmp_path / "run")]) == 2
    assert "has no tokenizer.json, and the model needs the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_run_chats_with_the_kept_template(exported, capsys):
    run = exported / "run"
    assert cli.main(["generate", "--workdir", str(run), "--chat", "hello there", "--max-new-tokens", "4"]) == 0
    reply = capsys.readouterr().out
    assert "<|im_start|>" not in reply and reply.endswith("\n")


def _minilm_folder(folder):
    """A sentence-transformers folder: a BertModel (pooler, no MLM head), a WordPiece
    tokenizer with BERT's special tokens, modules.json and its Pooling module."""
    words = "the cat sat on a mat dog ran far away and then came back home".split()
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.BertPreTokenizer()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
        unk_token="[UNK]",
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    ))
    return words


def test_a_base_encoder_fine_tunes_with_a_fresh_head_and_keeps_its_files(tmp_path, capsys):
    import sentence_transformers

    src, run, out = tmp_path / "src", tmp_path / "run", tmp_path / "out"
    words = _minilm_folder(src)
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(80)))
    overrides = [*SMALL, f"data.corpus={corpus}", "data.seq_len=16"]
    assert cli.main(["train", "--init-from", str(src), "--workdir", str(run), "--set", *overrides]) == 0
    cfg, _ = checkpoint.load_params(run)
    assert cfg.data.objective == "masked_lm" and cfg.model.mlm_head and cfg.model.pooler
    assert cfg.data.tokenizer == str(run / hf.HF_SOURCE_DIR)
    capsys.readouterr()
    assert cli.main(["convert", "--from", str(run), "--to-hf", str(out)]) == 0
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (out, src))
    assert config["architectures"] == ["BertForPreTraining"]  # MLM head and pooler, as the export holds
    assert {k: config.get(k, "absent") for k in hf.TOKEN_ID_KEYS} == {
        k: source_config.get(k, "absent") for k in hf.TOKEN_ID_KEYS
    }
    _, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    encoder = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    assert encoder.encode(["the cat sat"]).shape == (1, 32)
    # A run converted as it is (no MLM head) cannot train masked_lm; the error names the fix.
    assert cli.main(["convert", "--from-hf", str(src), "--to", str(tmp_path / "conv")]) == 0
    capsys.readouterr()
    argv = ["train", "--config", str(tmp_path / "conv" / "config.yaml"), "--workdir", str(tmp_path / "again"),
            "--init-from", str(tmp_path / "conv"), "--set", *overrides]
    assert cli.main(argv) == 2
    assert "set model.mlm_head=true" in capsys.readouterr().err
