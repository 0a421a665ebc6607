"""`flaxformer-lite bench train` runs end to end on a tiny shape and reports what it measured."""

import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite.bench.measure import one_cpu
from flaxformer_lite.bench.profile import matmul_flops
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
    peak = r["matmul_peak"]  # sampled before the rounds and once in each; the best run counts
    assert len(peak["seconds_samples"]) == 5 + 1
    assert peak["flops_per_s"] == pytest.approx(2 * 64**3 / min(peak["seconds_samples"]))
    assert ours["mfu"] == pytest.approx(ours["tokens_per_s"] * r["model"]["flops_per_token"] / peak["flops_per_s"])
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
    # Every product of the step is traced and counted. By hand, 1 layer, D 32, F 128, V 64,
    # B 2, T 16, forward: 2 x (4 D^2 + 2 D F + D V) per token, 2 x 2 T^2 D per sequence for
    # the attention products (dense: XLA computes the causal mask's other half too);
    # training is three times that.
    forward = 2 * (4 * 32 * 32 + 2 * 32 * 128 + 32 * 64) * 2 * 16 + 4 * 16 * 16 * 32 * 2
    assert sum(m["flops_per_step"] for m in profile["matmuls"]) == 3 * forward
    assert all(m["flops_per_s"] > 0 and m["count"] >= 1 for m in profile["matmuls"])
    assert any("mlp" in m["jax_name"] for m in profile["matmuls"])
    assert r["machine"]["cpus_used"] == len(os.sched_getaffinity(0))
    assert "load_average_1m" in r["machine"]
    assert "| flaxformer_lite (jit, optax) |" in capsys.readouterr().out


def test_bench_train_lora_reports_its_three_figures_and_computes_no_base_weight_gradient(tmp_path, capsys):
    out = tmp_path / "lora.json"
    D, F, V, T, B, R = 32, 64, 64, 16, 2, 2
    assert main(["bench", "train", "--lora", str(R), "--json", str(out), "--layers", "1", "--d-model", str(D),
                 "--heads", "2", "--kv-heads", "2", "--d-ff", str(F), "--vocab", str(V), "--seq-len", str(T),
                 "--batch", str(B), "--steps", "1", "--rounds", "1", "--warmup", "1", "--peak-size", "64",
                 "--rss-steps", "1", "--profile", str(tmp_path / "trace")]) == 0
    r = json.loads(out.read_text())
    m, o = r["model"], r["optimizer_state"]
    # AdamW keeps two float32 moments a trained parameter (and its step counts): the adapters',
    # against the plain model's.
    assert o["lora"]["optimizer_state_bytes"] - 8 == 2 * 4 * m["adapter_parameters"]
    assert o["full"]["optimizer_state_bytes"] - 8 == 2 * 4 * m["parameters"]
    assert m["adapter_parameters"] == R * (4 * 2 * D + 3 * (D + F))  # one layer
    assert o["ratio"] == o["lora"]["optimizer_state_bytes"] / o["full"]["optimizer_state_bytes"]
    for mode in ("lora", "full"):
        run = r["peak_rss"][mode]
        assert run["peak_rss_bytes"] > run["baseline_rss_bytes"] > 0 and "load_average_1m" in run
    assert r["peak_rss"]["full"]["optimizer_state_bytes"] == o["full"]["optimizer_state_bytes"]
    ours, theirs = r["steps"]["ours"], r["steps"]["transformers"]
    assert r["speedup"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert ours["mfu"] == pytest.approx(ours["tokens_per_s"] * m["flops_per_token"] / r["matmul_peak"]["flops_per_s"])
    # Every product the compiled step runs, by hand: the forward (base weights, dense attention,
    # adapters), the input gradients of the base and the attention's backward, the adapters'
    # gradients; no [in, out] gradient of a base weight. The first layer's q/k/v input gradients
    # (base and adapters) are left out by XLA: nothing trained lies below them.
    weights = 4 * D * D + 3 * D * F + D * V  # a token's base matrices: q, k, v, o, wi, wg, wo, the head
    adapters = R * (4 * 2 * D + 3 * (D + F))
    attention = 4 * T * T * D * B  # per step, both products, dense
    unneeded = 2 * B * T * 3 * (D * D + R * D)
    expected = 2 * (2 * weights * B * T) + 3 * attention + 3 * (2 * adapters * B * T) - unneeded
    assert sum(x["flops_per_step"] for x in r["profile"]["matmuls"]) == expected
    assert "ours / transformers + peft" in capsys.readouterr().out


def test_matmul_flops_are_counted_from_the_compiled_module():
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32), jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    q, k = (jnp.asarray(rng.normal(size=(2, 3, n, 4)), jnp.float32) for n in (5, 7))
    fn = jax.jit(lambda x, w, q, k: (jnp.tanh(x @ w), jnp.einsum("bhqd,bhkd->bhqk", q, k)))
    counted = matmul_flops(fn.lower(x, w, q, k).compile().as_text())
    # [32,16] x [16,8]; 6 batched [5,4] x [4,7]. One entry per op that runs, fused or not.
    assert sorted(counted.values()) == sorted([2 * 32 * 16 * 8, 2 * 6 * 5 * 7 * 4])


def test_matmul_flops_count_cublas_custom_calls():
    """XLA:GPU's cuBLAS products are custom calls (text in the form XLA:GPU prints them)."""
    hlo = """HloModule jit_step, entry_computation_layout={(bf16[2048,256]{1,0}, bf16[256,1024]{1,0})->bf16[2048,1024]{1,0}}

ENTRY %main.1 (p0: bf16[2048,256], p1: bf16[256,1024], p2: f32[4,128,64], p3: f32[4,64,128]) -> bf16[2048,1024] {
  %p0 = bf16[2048,256]{1,0} parameter(0)
  %p1 = bf16[256,1024]{1,0} parameter(1)
  %p2 = f32[4,128,64]{2,1,0} parameter(2)
  %p3 = f32[4,64,128]{2,1,0} parameter(3)
  %custom-call.1 = (bf16[2048,1024]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %custom-call.2 = (f32[4,128,128]{2,1,0}, s8[0]{0}) custom-call(f32[4,128,64]{2,1,0} %p2, f32[4,64,128]{2,1,0} %p3), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
  ROOT %get-tuple-element.1 = bf16[2048,1024]{1,0} get-tuple-element(%custom-call.1), index=0
}
"""
    assert matmul_flops(hlo) == {"custom-call.1": 2 * 2048 * 1024 * 256, "custom-call.2": 2 * 4 * 128 * 128 * 64}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs Linux")
def test_one_cpu_pins_every_thread_and_restores(monkeypatch):
    import torch
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    started, stop = threading.Event(), threading.Event()

    def worker():  # a thread that exists before the pinning, as XLA's pools do
        started.set()
        stop.wait()

    t = threading.Thread(target=worker)
    t.start()
    started.wait()
    try:
        with one_cpu():
            assert os.sched_getaffinity(0) == {min(before)}
            assert os.sched_getaffinity(t.native_id) == {min(before)}
            assert torch.get_num_threads() == 1
        assert os.sched_getaffinity(0) == before and os.sched_getaffinity(t.native_id) == before
        assert torch.get_num_threads() == threads
    finally:
        stop.set()
        t.join()
    monkeypatch.delattr(os, "sched_setaffinity")
    with pytest.raises(SystemExit, match="needs Linux"):
        with one_cpu():
            pass
