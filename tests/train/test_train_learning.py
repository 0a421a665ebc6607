"""Short versions of the learning benchmarks (BENCHMARKS.md): the loss falls.

Masked LM (bert_tiny, with gradient accumulation), copy (t5_tiny, bfloat16 compute) and
classification fine-tuned from the masked-LM run (--init-from), on a TSV file.
"""

import math

import jax
import numpy as np
import pytest

from flaxformer_lite.runtime import checkpoint
from flaxformer_lite.train import loop, metrics

SHORT = ("train.num_steps=30", "train.log_every=5", "train.eval_every=15", "train.checkpoint_every=30")


def _losses(workdir):
    return [r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r]


def _evals(workdir):
    return [r for r in metrics.read_metrics(workdir) if "eval_loss" in r]


@pytest.fixture(scope="module")
def mlm_run(tiny, tmp_path_factory):
    cfg = tiny("bert_tiny", *SHORT, "data.batch_size=16", "train.grad_accum_steps=2")
    workdir = tmp_path_factory.mktemp("mlm") / "run"
    return cfg, workdir, loop.train(cfg, workdir)


def test_masked_lm_loss_falls(mlm_run):
    cfg, workdir, summary = mlm_run
    first, last = _evals(workdir)
    assert last["eval_loss"] < first["eval_loss"] < math.log(cfg.model.vocab_size)
    assert _losses(workdir)[-1] < _losses(workdir)[0]
    assert 0 < summary["baseline_unigram_accuracy"] < 1


def test_copy_task_loss_falls_in_bfloat16(tiny, tmp_path):
    cfg = tiny("t5_tiny", *SHORT, "data.objective=copy", "data.target_len=32", "model.dtype=bfloat16")
    summary = loop.train(cfg, tmp_path / "run")
    first, last = _evals(tmp_path / "run")
    assert last["eval_loss"] < first["eval_loss"] < math.log(cfg.model.vocab_size)
    assert 0 <= summary["eval_seq_accuracy"] <= 1
    params = checkpoint.load_params(tmp_path / "run")[1]
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}  # bf16 compute, fp32 params


def test_classification_fine_tunes_from_the_masked_lm_run(mlm_run, tiny, tmp_path, capsys):
    _, mlm_workdir, _ = mlm_run
    rng = np.random.default_rng(0)
    words = {"warm": ["sunny", "bright", "hot"], "cold": ["icy", "snowy", "frozen"]}
    rows = [
        " ".join(rng.choice(words[label], size=rng.integers(2, 5))) + f"\t{label}"
        for label in rng.choice(["warm", "cold"], size=300)
    ]
    rows.append("sunny " * 20 + "\twarm")  # longer than seq_len: truncated, with a counted warning
    corpus = tmp_path / "weather.tsv"
    corpus.write_text("\n".join(rows) + "\n")
    cfg = tiny("bert_tiny", *SHORT, "data.objective=classification", f"data.corpus={corpus}")
    with pytest.warns(UserWarning, match="classification texts: truncated 1 of"):
        summary = loop.train(cfg, tmp_path / "run", init_from=mlm_workdir)
    fresh = capsys.readouterr().out.split("new parameter arrays")[1].split("unused")[0]
    assert "classifier" in fresh and "encoder" not in fresh and "pooler" not in fresh
    assert checkpoint.read_config(tmp_path / "run").model.num_labels == 2  # set from the data
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert summary["eval_accuracy"] > summary["baseline_majority_accuracy"]
