"""SFT then DPO through the command line: DPO's reference is the policy it starts from,
--init-from RUN_DIR takes the run's config, and run directories work from any folder,
moved or copied."""

import dataclasses
import json
import math
import os
import re
import shutil
import stat

import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxformer_lite import cli
from flaxformer_lite.layers import lora
from flaxformer_lite.runtime import checkpoint
from flaxformer_lite.train import metrics
from hf_chat_folder import write_llama_chat_folder

SMALL = ["data.batch_size=8", "data.seq_len=64", "train.eval_batches=1", "train.log_every=1", "train.peak_flops=1e12",
         "train.num_samples=0"]
DPO = ["data.objective=dpo", "data.corpus=prefs.jsonl", "train.num_steps=1", "train.eval_every=1", "train.dpo_beta=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder holding an HF model, SFT and DPO data, and a LoRA and a full SFT run made
    from it with paths relative to that folder (the working directory of the runs)."""
    root = tmp_path_factory.mktemp("posttrain")
    write_llama_chat_folder(root / "src")
    chat = [{"messages": [{"role": "user", "content": f"the number {i}"}, {"role": "assistant", "content": f"is {i}"}]}
            for i in range(24)]
    prefs = [{"prompt": [{"role": "user", "content": f"the number {i}"}], "chosen": f"is {i}", "rejected": f"not {i + 1}"}
             for i in range(24)]
    for name, lines in (("chat.jsonl", chat), ("prefs.jsonl", prefs)):
        (root / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    sft = ["data.objective=sft", "data.corpus=chat.jsonl", "train.num_steps=3", "train.learning_rate=1e-2",
           "train.warmup_steps=0", *SMALL]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli.main(["train", "--init-from", "src", "--workdir", "lora-sft", "--set", "model.lora.rank=4",
                         "model.lora.targets=[query,value,wi,wo]", *sft]) == 0
        assert cli.main(["train", "--init-from", "src", "--workdir", "full-sft", "--set", *sft]) == 0
    finally:
        os.chdir(cwd)
    return root


def _first_record(workdir):
    return next(r for r in metrics.read_metrics(workdir) if "loss" in r)


@pytest.mark.parametrize("source", ["src", "lora-sft", "full-sft"])
def test_dpo_starts_from_its_reference_whatever_it_starts_from(runs, monkeypatch, capsys, source):
    """Step 1 of DPO scores the policy against itself: loss ln 2, margin 0 (before, from
    a LoRA run the reference was the base with the SFT adapters off)."""
    monkeypatch.chdir(runs)
    lora_rank = ["model.lora.rank=4"] if source == "src" else []  # the runs bring their own model section
    argv = ["train", "--init-from", source, "--workdir", f"dpo-{source}", "--set", *DPO, *SMALL, *lora_rank]
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    split = re.search(r"\((\d+) examples for training, (\d+) for validation\)", log)
    assert split and int(split[1]) + int(split[2]) == 24 and int(split[2]) > 0, log
    if source == "src":  # fresh adapters: counted in a short line, not listed one by one
        line = next(x for x in log.splitlines() if x.startswith("initialised from src: "))
        assert "16 new LoRA adapter arrays (*_lora_a, *_lora_b of rank 4 on query, key, value, out)" in line, line
        assert "lora_a']" not in line
    first = _first_record(runs / f"dpo-{source}")
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) < 1e-6 and abs(first["reward_margin"]) < 1e-6, first
    cfg, params = checkpoint.load_params(runs / f"dpo-{source}")
    assert cfg.data.objective == "dpo" and cfg.train.dpo_beta == 0.5
    reference = checkpoint.load_extra(runs / f"dpo-{source}")["ref_params"]
    if source == "src":
        return
    start = checkpoint.load_params(runs / source)[1]
    if source == "lora-sft":  # the SFT adapters went on training, against a frozen copy of them
        assert cfg.model.lora.rank == 4
        trained = traverse_util.flatten_dict(lora.split(start)[0])
        assert any(np.any(b != 0) for k, b in trained.items() if k[-1].endswith("_lora_b"))
        start = lora.split(start)[0]
    jax.tree.map(np.testing.assert_array_equal, reference, start)


def test_init_from_a_run_without_config_takes_its_config_and_set_changes_it(runs, monkeypatch):
    monkeypatch.chdir(runs)
    saved = checkpoint.read_config("lora-sft")
    assert cli.main(["train", "--init-from", "lora-sft", "--workdir", "more-sft", "--set", "train.num_steps=1",
                     "train.eval_every=1"]) == 0
    cfg = checkpoint.read_config("more-sft")
    assert cfg.model == saved.model and cfg.train.num_steps == 1
    assert cfg.data == dataclasses.replace(saved.data, tokenizer=str(runs / "more-sft" / "hf"))  # the run's own copy
    assert cfg.train.learning_rate == saved.train.learning_rate


def test_a_moved_or_copied_run_works_from_another_folder(runs, tmp_path, monkeypatch, capsys):
    text = (runs / "lora-sft" / "config.yaml").read_text()
    assert "tokenizer: hf\n" in text and f"corpus: {runs / 'chat.jsonl'}\n" in text  # inside: relative; outside: absolute
    copied = tmp_path / "copied"
    shutil.copytree(runs / "lora-sft", copied)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.copytree(runs / "lora-sft", tmp_path / "tmp-run")
    (tmp_path / "tmp-run").rename(moved)
    monkeypatch.chdir("/")
    chat = ["--chat", "the number 5", "--max-new-tokens", "6", "--ignore-eos"]
    replies = []
    for run in (copied, moved):
        assert str(checkpoint.read_config(run).data.tokenizer) == str(run / "hf")
        assert cli.main(["generate", "--workdir", str(run), *chat]) == 0
        replies.append(capsys.readouterr().out)
        assert cli.main(["eval", "--workdir", str(run)]) == 0
        assert json.loads((run / "eval.json").read_text())["eval_loss"] > 0
        adapter = run.parent / f"{run.name}-adapter"
        assert cli.main(["convert", "--from", str(run), "--to-peft", str(adapter)]) == 0
        umask = os.umask(0)
        os.umask(umask)
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in adapter.iterdir()} == {
            "adapter_config.json": 0o666 & ~umask, "adapter_model.safetensors": 0o666 & ~umask}
        assert cli.main(["train", "--init-from", str(run), "--workdir", str(run.parent / f"{run.name}-dpo"), "--set",
                         *DPO[:1], f"data.corpus={runs / 'prefs.jsonl'}", *DPO[2:]]) == 0
        capsys.readouterr()
    assert replies[0] == replies[1] and replies[0].strip()
