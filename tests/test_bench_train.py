"""`flaxformer-lite bench train` runs end to end on a tiny shape and reports what it measured."""

import json

import pytest

from flaxformer_lite.cli import main


def test_bench_train_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--json", str(out), "--layers", "1", "--d-model", "32", "--heads", "2",
                 "--vocab", "64", "--seq-len", "16", "--batch", "2", "--steps", "1", "--rounds", "1",
                 "--warmup", "1", "--peak-size", "64", "--compile-depths", "1", "--memory-layers", "0",
                 "--loss-vocab", "512", "--loss-chunk", "8", "--profile", str(tmp_path / "trace")]) == 0
    r = json.loads(out.read_text())
    ours, theirs = r["steps"]["ours"], r["steps"]["transformers"]
    for side in (ours, theirs):
        assert side["tokens_per_s"] > 0 and side["mfu"] > 0
        assert side["tokens_per_s"] * side["ms_per_step"] * 1e-3 == pytest.approx(2 * 16)  # B*T tokens a step
    assert r["speedup"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert {(c["layers"], c["scan"]) for c in r["compile"]} == {(1, True), (1, False)}
    assert r["memory"] == []  # --memory-layers 0; tests/core measure remat memory
    whole, chunked = r["loss_memory"]
    assert (whole["loss_chunk_size"], chunked["loss_chunk_size"]) == (None, 8)
    assert chunked["temp_bytes"] < whole["temp_bytes"]  # 32 x 512 float32 logits and their gradient are never whole
    profile = r["profile"]
    assert list((tmp_path / "trace").glob("**/*.xplane.pb"))
    phases = {s["phase"] for s in profile["split"]}
    assert {"forward", "backward"} <= phases
    assert sum(s["ms_per_step"] for s in profile["split"]) == pytest.approx(profile["op_ms_per_step"])
    assert profile["top_ops"][0]["ms_per_step"] > 0
    assert "load_average_1m" in r["machine"]
    assert "| flaxformer_lite (jit, optax) |" in capsys.readouterr().out
