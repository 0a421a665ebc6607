"""`flaxformer-lite train` on bad input: one clear error line, exit status 2, no run left behind."""

import re
import subprocess
import sys

import jax
import pytest

from flaxformer_lite import cli
from flaxformer_lite.train import loop


def _bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "rows.tsv").write_text("a fine row\tyes\nno tab in this row\n")
    (tmp_path / "chat.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"text": "no fields"}\n')
    return tmp_path


CASES = {
    "missing corpus": (["data.corpus={d}/nope.txt"], r"{d}/nope.txt: no such file or folder"),
    "empty corpus": (["data.corpus={d}/empty.txt"], r"{d}/empty.txt: no text found; the corpus is empty"),
    "TSV row without a tab": (
        ["data.objective=classification", "data.corpus={d}/rows.tsv", "model.family=encoder", "model.mlm_head=true"],
        r"{d}/rows.tsv:2: row has no tab; expected text<TAB>label",
    ),
    "JSONL line without the sft fields": (
        ["data.objective=sft", "data.corpus={d}/chat.jsonl"], r"{d}/chat.jsonl:2: no sft fields \(has: text\)"
    ),
    "ids past the vocabulary": (["model.vocab_size=200"], r"token id \d+ is outside \[0, vocab_size=200\)"),
    "misspelt key": (["train.learning_rat=0.1"], r"unknown config key 'train.learning_rat'; did you mean 'train.learning_rate'"),
    "objective for another family": (["data.objective=span_corruption"], r"data.objective=span_corruption needs model.family: encoder_decoder"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, capsys):
    data_dir = _bad_files(tmp_path)
    overrides, message = CASES[case]
    workdir = tmp_path / "run"
    argv = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--set"]
    argv += [o.format(d=data_dir) for o in overrides]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message.format(d=data_dir), err), err
    assert not workdir.exists()


def test_bytes_that_are_not_utf8_are_replaced_counted_and_reported(tiny, tmp_path):
    # As `prepare` does: a stray byte in a large corpus should not stop a run.
    lines = [f"paragraph {i} about caf\xe9 and na\xefve things, long enough to be a document" for i in range(40)]
    (tmp_path / "latin1.txt").write_bytes("\n\n".join(lines).encode("latin-1"))
    cfg = tiny("gpt_tiny", f"data.corpus={tmp_path}/latin1.txt")
    with pytest.warns(UserWarning, match=r"80 invalid UTF-8 sequences were replaced .*latin1\.txt:1"):
        setup = loop.prepare_data(cfg)
    assert setup.eval_batches


def test_resume_with_another_model_is_refused_and_changes_nothing(gpt_run, gpt_overrides, capsys):
    workdir, _ = gpt_run
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    argv = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--resume", "--set", *gpt_overrides]
    assert cli.main(argv + ["model.d_ff=128"]) == 2
    assert "--resume: model.d_ff differ from" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_the_command_exits_with_status_2_and_no_traceback(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "flaxformer_lite", "train", "--config", "gpt_tiny", "--workdir", str(workdir),
         "--set", f"data.corpus={tmp_path}/missing"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {tmp_path}/missing: no such file or folder" in result.stderr
    assert not workdir.exists()


def test_init_from_a_differently_shaped_model_names_the_parameter(gpt_run, gpt_overrides, tmp_path, capsys):
    source, _ = gpt_run
    workdir = tmp_path / "run"
    argv = ["train", "--config", "gpt_tiny", "--workdir", str(workdir), "--init-from", str(source),
            "--set", *gpt_overrides, "model.d_ff=128"]
    assert cli.main(argv) == 2
    assert re.search(r"--init-from .*: parameter \['params'\]\['decoder'\]\['layers_0'\]\['mlp'\]\['bi'\] "
                     r"has shape \(64,\) there but \(128,\) in this model", capsys.readouterr().err)
    assert not workdir.exists()


def test_cli_keeps_compiled_programs_in_a_persistent_cache(tmp_path, monkeypatch):
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        assert cli.use_compilation_cache() == str(tmp_path / "mine")  # the user's own is kept

        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_compilation_cache_max_size", -1)
        monkeypatch.setenv("FLAXFORMER_LITE_CACHE", str(tmp_path / "cache"))
        assert cli.use_compilation_cache() == str(tmp_path / "cache" / "xla")
        assert jax.config.jax_compilation_cache_max_size == cli.COMPILATION_CACHE_MAX_BYTES

        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(cli.COMPILATION_CACHE_ENV, "0")
        assert cli.use_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_fine_tunes_without_a_config_get_the_adapters_rate_and_the_memory_savers(tmp_path):
    """A LoRA fine-tune's default learning rate is the adapters'; every fine-tune without
    --config remats and chunks its loss (config.FINE_TUNE_MEMORY) unless --set says otherwise."""
    import argparse

    from hf_chat_folder import write_llama_chat_folder

    from flaxformer_lite.config import FINE_TUNE_LORA_LEARNING_RATE, FINE_TUNE_MEMORY, FINE_TUNE_TRAIN
    from flaxformer_lite.train.commands import _run_config

    write_llama_chat_folder(tmp_path / "src")

    def run_config(*overrides, config=None):
        args = argparse.Namespace(init_from=str(tmp_path / "src"), resume=False, config=config, set=list(overrides),
                                  workdir=str(tmp_path / "run"), peft=None)
        return _run_config(args)

    def rate(*overrides, config=None):
        return run_config(*overrides, config=config).train.learning_rate

    def memory(*overrides, config=None):
        cfg = run_config(*overrides, config=config)
        return cfg.model.remat_policy, cfg.train.loss_chunk_size

    assert rate("model.lora.rank=8") == FINE_TUNE_LORA_LEARNING_RATE == 1e-3
    assert rate("model.lora.rank=8", "train.learning_rate=3e-4") == 3e-4  # a given one is kept
    assert rate() == FINE_TUNE_TRAIN["learning_rate"] == 2e-5  # full weights
    assert rate("model.lora.rank=8", config="gpt_tiny") == 6e-3  # a config's own train section wins
    assert memory() == memory("model.lora.rank=8") == ("full", 512) == tuple(FINE_TUNE_MEMORY.values())
    assert memory("model.remat_policy=none", "train.loss_chunk_size=null") == ("none", None)
    assert memory("data.objective=span_corruption")[1] is None  # the chunked loss is causal_lm's and sft's
    assert memory(config="gpt_tiny") == ("none", None)
