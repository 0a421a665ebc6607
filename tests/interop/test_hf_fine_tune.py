"""An HF folder as a run's source: `train --init-from HF_DIR`, then `convert --to-hf`, in
subprocesses; transformers loads the export with the source's tokenizer files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
import yaml
from hf_chat_folder import CHATML, write_llama_chat_folder

from flaxformer_lite import checkpoint, cli, data
from flaxformer_lite.config import FINE_TUNE_TRAIN
from flaxformer_lite.interop import hf

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
    assert saved["data"]["objective"] == "causal_lm" and saved["data"]["tokenizer"] == str(run / hf.HF_SOURCE_DIR)
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
