"""The loop end to end: run directory, metrics, throughput, resume, eval command."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from flaxformer_lite import cli, data
from flaxformer_lite.config import ConfigError
from flaxformer_lite.models import flops
from flaxformer_lite.runtime import checkpoint
from flaxformer_lite.train import loop, metrics


def _records(workdir, key):
    return [r for r in metrics.read_metrics(workdir) if key in r]


def _without_timing(workdir):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in metrics.read_metrics(workdir)]


def _same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def test_run_directory_holds_config_metrics_events_curve_samples(gpt_run, gpt_cfg):
    workdir, summary = gpt_run
    assert checkpoint.read_config(workdir) == gpt_cfg
    train = _records(workdir, "loss")
    assert [r["step"] for r in train] == list(range(1, 21))
    evals = _records(workdir, "eval_loss")
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert r["eval_bits_per_byte"] == pytest.approx(r["eval_loss"] / math.log(2))
        assert 0 < r["eval_accuracy"] < 1
    # Short version of the gpt_tiny benchmark: the loss falls from the uniform guess.
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(gpt_cfg.model.vocab_size)
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])
    assert summary["eval_loss"] == evals[-1]["eval_loss"]
    assert json.loads((workdir / "summary.json").read_text())["eval_loss"] == summary["eval_loss"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = summary["samples"]
    assert len(samples) == 2 and all(s in (workdir / "samples.txt").read_text() for s in samples)


def test_throughput_counts_real_tokens(gpt_run, gpt_cfg):
    workdir, summary = gpt_run
    setup = loop.prepare_data(gpt_cfg)
    it = iter(setup.train)
    batches = [next(it) for _ in range(20)]
    it.close()
    real = np.cumsum([np.count_nonzero(b["segment_ids"]) for b in batches])
    assert real[-1] < 20 * batches[0]["segment_ids"].size  # the batches do hold padding
    train = _records(workdir, "loss")
    assert [r["tokens"] for r in train] == real.tolist()
    timed = [r for r in train if "tokens_per_s" in r]
    assert len(timed) == 19  # all but the first step, which compiles
    for previous, r in zip(train, train[1:]):
        # tokens of the step over its seconds, which are fewer than the whole run's
        assert r["tokens_per_s"] > (r["tokens"] - previous["tokens"]) / summary["seconds"]


def test_resume_gives_identical_params_and_losses(gpt_run, gpt_cfg, tmp_path):
    reference, _ = gpt_run
    workdir = tmp_path / "run"
    loop.train(gpt_cfg, workdir, stop_at=10)
    assert max(_records(workdir, "loss"), key=lambda r: r["step"])["step"] == 10
    loop.train(gpt_cfg, workdir, resume=True)
    # Every record but the wall-clock throughput: losses, grad norms, learning rates,
    # token counts and evaluations, step by step.
    assert _without_timing(workdir) == _without_timing(reference)
    assert _same_params(checkpoint.load_params(workdir)[1], checkpoint.load_params(reference)[1])


def test_eval_command_reproduces_the_final_evaluation(gpt_run, capsys):
    workdir, summary = gpt_run
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 20
    assert result["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert json.loads((workdir / "eval.json").read_text()) == result


def test_a_finished_run_dir_refuses_a_fresh_run(gpt_run, gpt_cfg):
    workdir, _ = gpt_run
    before = sorted(p.name for p in workdir.rglob("*"))
    with pytest.raises(ConfigError, match="already holds a run's checkpoints: pass --resume"):
        loop.train(gpt_cfg, workdir)
    assert sorted(p.name for p in workdir.rglob("*")) == before


def test_sample_prompts_prefer_prose_openings():
    tok = data.ByteTokenizer()
    prose = "Lists are mutable sequences, " * 3
    texts = ["+----+----+", "Notes:", prose, "  indented " * 10, "Tuples are immutable. " * 4]
    prompts = loop.sample_prompts(texts, 2, tok)
    assert prompts == [[tok.bos_id] + tok.encode(t)[: loop.SAMPLE_PROMPT_TOKENS - 1] for t in (prose, texts[4])]
    # Too few prose documents: the others fill in, in corpus order.
    assert [p[1:] for p in loop.sample_prompts(texts[:3], 3, tok)] == [
        tok.encode(t)[: loop.SAMPLE_PROMPT_TOKENS - 1] for t in (prose, texts[0], texts[1])
    ]


def test_progress_bar_counts_completed_steps_and_records_carry_mfu(tiny, monkeypatch, tmp_path):
    shown = []  # (bar count, postfix) each time the bar changes

    class Recorder(loop.tqdm):
        def update(self, n=1):
            super().update(n)
            shown.append((self.n, None))

        def set_postfix(self, **postfix):
            super().set_postfix(**postfix)
            shown.append((self.n, postfix))

    monkeypatch.setattr(loop, "tqdm", Recorder)
    cfg = tiny("gpt_tiny", "train.num_steps=12", "train.log_every=4", "train.eval_every=100",
               "train.checkpoint_every=100", "train.peak_flops=1e11")
    summary = loop.train(cfg, tmp_path / "run")
    # The bar moves only when a log step has fetched its window's metrics, which means
    # those steps are complete; then it counts exactly them, never dispatched ones.
    assert [n for n, postfix in shown if postfix is None] == [4, 8, 12]
    assert [n for n, postfix in shown if postfix is not None] == [4, 8, 12]
    assert all({"tok_s", "mfu", "loss"} <= set(postfix) for _, postfix in shown if postfix is not None)

    fpt = flops.training_flops_per_token(cfg.model, cfg.data.seq_len)
    records = _records(tmp_path / "run", "tokens")
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        assert r["flops_per_token"] == fpt
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e11)
    assert summary["peak_flops"] == 1e11 and summary["peak_flops_source"] == "train.peak_flops"
    assert summary["train_mfu"] == pytest.approx(summary["train_tokens_per_s"] * fpt / 1e11)


def test_measured_peak_is_recorded(gpt_run, gpt_cfg):
    _, summary = gpt_run
    assert summary["peak_flops_source"].startswith("measured matmul (cpu, float32, ")
    assert summary["peak_flops"] == metrics.peak_flops(gpt_cfg)[0]  # kept: the next run divides by the same
    assert 0 < summary["train_mfu"] < 1


def test_the_peak_is_measured_once_a_machine_or_taken_from_the_datasheet(tmp_path, monkeypatch, gpt_cfg):
    """MFU compares across runs: the matmul peak is timed once and kept in the cache
    folder (a damaged file is measured again), a known accelerator's comes from its
    datasheet, and train.peak_flops wins over both; the source is named."""
    monkeypatch.setenv("FLAXFORMER_LITE_CACHE", str(tmp_path))
    measured, source = metrics.peak_flops(gpt_cfg)
    kept = tmp_path / metrics.PEAK_FLOPS_FILE
    assert measured > 0 and str(kept) in source
    entries = json.loads(kept.read_text())
    (key,) = entries
    entries[key]["flops"] = 1.5e11  # a later run reads the file, whatever this process timed
    kept.write_text(json.dumps(entries))
    assert metrics.peak_flops(gpt_cfg) == (1.5e11, source)
    kept.write_text("{not json")
    assert metrics.peak_flops(gpt_cfg)[0] == measured and json.loads(kept.read_text())[key]["flops"] == measured
    monkeypatch.setattr(metrics, "_device_kind", lambda: "NVIDIA H100 80GB HBM3")
    bf16 = dataclasses.replace(gpt_cfg, model=dataclasses.replace(gpt_cfg.model, dtype="bfloat16"))
    assert metrics.peak_flops(bf16) == (989e12, "datasheet (NVIDIA H100 80GB HBM3, bfloat16)")
    given = dataclasses.replace(bf16, train=dataclasses.replace(bf16.train, peak_flops=2e12))
    assert metrics.peak_flops(given) == (2e12, "train.peak_flops")
