"""Every command's bad input: one line naming the bad flag, file or key, exit 2, nothing written.

The table runs each command in this process (`cli.main(argv)`), so a case costs its own
work only. To cover a new command or flag, add a row: the argv (with the placeholders
below) and the name its error line must carry.
  {tmp}     a fresh, empty folder for the case (nothing may appear in it)
  {run}     a run directory (a random GPT-2 converted from an HF folder, with a tokenizer)
  {hf}      that HF folder
  {corpus}  a small text file
"""

import os

import numpy as np
import pytest
import transformers

from flaxformer_lite import cli, data
from flaxformer_lite.interop import parity

transformers.logging.set_verbosity_error()

CASES = [
    # the command itself
    (["nope"], "nope"),
    # train
    (["train", "--workdir", "{tmp}/w"], "--config"),
    (["train", "--config", "nope", "--workdir", "{tmp}/w"], "nope"),
    (["train", "--config", "gpt_tiny", "--workdir", "{tmp}/w", "--set", "model.nope=1"], "model.nope"),
    (["train", "--config", "gpt_tiny", "--workdir", "{tmp}/w", "--set", "train.num_steps=0"], "train.num_steps"),
    (["train", "--config", "gpt_tiny", "--workdir", "{tmp}/w", "--set", "model.attention_impl=cudnn"],
     "model.attention_impl"),
    (["train", "--config", "gpt_tiny", "--workdir", "{tmp}/w", "--set", "data.corpus={tmp}/missing.txt"],
     "missing.txt"),
    (["train", "--config", "gpt_tiny", "--workdir", "{tmp}/w", "--init-from", "{tmp}/norun"], "norun"),
    # eval
    (["eval", "--workdir", "{tmp}/norun"], "norun"),
    (["eval", "--workdir", "{run}", "--step", "-1"], "--step"),
    (["eval", "--workdir", "{run}", "--set", "data.nope=1"], "data.nope"),
    # generate
    (["generate", "--prompt", "hi"], "--workdir"),
    (["generate", "--hf", "{tmp}/nohf", "--prompt", "hi"], "nohf"),
    (["generate", "--workdir", "{run}", "--prompt", "hi", "--method", "nope"], "--method"),
    (["generate", "--workdir", "{run}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--workdir", "{run}", "--prompt", "hi", "--top-p", "2"], "--top-p"),
    (["generate", "--workdir", "{run}", "--prompt", "hi", "--method", "sample", "--top-p", "0"], "--top-p"),
    (["generate", "--workdir", "{run}", "--prompt", "hi", "--step", "7"], "7"),
    # embed
    (["embed", "--hf", "{tmp}/nohf", "--text", "hi"], "nohf"),
    (["embed", "--hf", "{hf}", "--text", "hi", "--pooling", "nope"], "--pooling"),
    # summary
    (["summary", "--config", "gpt_tiny", "--set", "model.num_layers=0"], "model.num_layers"),
    (["summary", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    # convert
    (["convert"], "--from"),
    (["convert", "--from-hf", "{tmp}/nohf", "--to", "{tmp}/out"], "nohf"),
    (["convert", "--from", "{tmp}/norun", "--to-hf", "{tmp}/out"], "norun"),
    (["convert", "--from", "{run}", "--to-hf", "{tmp}/out", "--step", "-2"], "--step"),
    # viz
    (["viz", "--workdir", "{tmp}/norun"], "--out"),
    (["viz", "--workdir", "{tmp}/norun", "--out", "{tmp}/v", "--text", "hi"], "norun"),
    (["viz", "--positions", "--config", "gpt_tiny", "--out", "{tmp}/v", "--length", "0"], "--length"),
    # bench
    (["bench", "nope"], "nope"),
    (["bench", "train", "--layers", "0"], "--layers"),
    (["bench", "train", "--warmup", "0"], "--warmup"),
    (["bench", "train", "--preset", "bert_tiny"], "bert_tiny"),
    (["bench", "decode", "--batch", "0"], "--batch"),
    (["bench", "decode", "--max-len", "8", "--json", "{tmp}/d.json"], "--max-len"),
    # serve (each fails before a server starts)
    (["serve", "--hf", "{tmp}/nohf"], "nohf"),
    (["serve", "--hf", "{hf}", "--max-batch", "0"], "--max-batch"),
    (["serve", "--hf", "{hf}", "--chunk", "0"], "--chunk"),
    (["serve", "--workdir", "{run}", "--step", "-1"], "--step"),
    (["serve", "--hf", "{hf}", "--max-len", "0"], "--max-len"),
    # prepare
    (["prepare", "--out", "{tmp}/s"], "--corpus"),
    (["prepare", "--corpus", "{tmp}/missing.txt", "--out", "{tmp}/s"], "missing.txt"),
    (["prepare", "--corpus", "{corpus}", "--out", "{tmp}/s", "--tokenizer", "{tmp}/no.json"], "no.json"),
    (["prepare", "--corpus", "{corpus}", "--out", "{tmp}/s", "--workers", "0"], "--workers"),
    (["prepare", "--corpus", "{corpus}", "--out", "{tmp}/s", "--val-fraction", "1.5"], "--val-fraction"),
    # tokenizer
    (["tokenizer"], "ACTION"),
    (["tokenizer", "train", "--corpus", "{corpus}", "--out", "{tmp}/t.json", "--vocab-size", "0"], "--vocab-size"),
    (["tokenizer", "train", "--corpus", "{tmp}/missing.txt", "--out", "{tmp}/t.json", "--vocab-size", "300"],
     "missing.txt"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random GPT-2 HF folder with a tokenizer that fits its vocabulary, its run directory, and a corpus."""
    root = tmp_path_factory.mktemp("bad_input")
    parity.build_hf("gpt2", root / "hf")
    rng = np.random.default_rng(0)
    words = "the cat sat on the mat and the dog ate the hat".split()
    texts = [" ".join(rng.choice(words, 8)) for _ in range(50)]
    data.train_tokenizer(texts, kind="wordpiece", vocab_size=60, out_path=root / "hf", num_sentinels=0)
    assert cli.main(["convert", "--from-hf", str(root / "hf"), "--to", str(root / "run")]) == 0
    (root / "corpus.txt").write_text("\n\n".join(texts))
    return {"run": str(root / "run"), "hf": str(root / "hf"), "corpus": str(root / "corpus.txt")}


def _files(*folders) -> dict:
    """path -> (size, mtime) of everything under the folders."""
    found = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                stat = os.stat(path)
                found[path] = (stat.st_size if name in filenames else 0, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize("argv, name", CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_bad_input_is_one_line_naming_it_exit_2_nothing_written(argv, name, inputs, tmp_path, capfd):
    places = {**inputs, "tmp": str(tmp_path)}
    argv = [arg.format(**places) for arg in argv]
    watched = (tmp_path, inputs["run"], inputs["hf"])
    before = _files(*watched)
    capfd.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        status = e.code
    out, err = capfd.readouterr()
    assert status == 2, (status, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and not out, (out + err)[-2000:]
    assert "error: " in lines[0] and name in lines[0], lines[0]
    assert _files(*watched) == before


def test_reading_a_checkpoint_prints_only_the_result(inputs, capfd):
    """No orbax notices that a read-only checkpoint manager is read-only, no progress bars."""
    capfd.readouterr()
    assert cli.main(["generate", "--workdir", inputs["run"], "--prompt", "the cat", "--max-new-tokens", "2",
                     "--method", "greedy"]) == 0
    out, err = capfd.readouterr()
    assert out.strip() and not err.strip(), err
