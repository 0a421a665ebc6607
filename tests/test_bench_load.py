"""`flaxformer-lite bench load` runs end to end on a tiny checkpoint and reports what it measured."""

import json

from flaxformer_lite.cli import main


def test_bench_load_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "load.json"
    args = ["bench", "load", "--json", str(out), "--layers", "2", "--d-model", "64", "--d-ff", "128", "--heads", "4",
            "--kv-heads", "2", "--vocab", "512", "--max-shard-size", "100KB", "--folder", str(tmp_path / "ckpt")]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert results["files"] > 1 and (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    # bfloat16 parameters: half the float32 bytes on disk, less the headers.
    assert 0.45 * results["file_bytes"] < results["param_bytes"] < 0.5 * results["file_bytes"]
    for run in results["runs"].values():
        assert run["param_bytes"] == results["param_bytes"]
        assert run["load_cold_s"] > 0 and run["read_cold_s"] > 0 and run["peak_above_baseline_bytes"] > 0
        for when in ("cold", "warm"):
            parts = run[f"load_{when}_parts"]
            assert parts["read"] > 0 and parts["convert"] > 0 and 0 < parts["read_wall"] <= run[f"load_{when}_s"]
    printed = capsys.readouterr().out
    assert "peak RSS added" in printed and "CPU s by part" in printed
