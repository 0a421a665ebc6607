"""`flaxformer-lite plan`: the tiny presets' train steps, and the serving engine's programs,
compiled for a v5e 2x2 slice by libtpu (the test extra installs it; no TPU chip is used).
The plans run in subprocesses, which load libtpu (tests/conftest.py sets
ALLOW_MULTIPLE_LIBTPU_LOAD, so pytest -n 2 may run two); this process checks their figures
against eval_shape sizes and models/flops.py."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from flaxformer_lite.config import load_config
from flaxformer_lite.models import init_params
from flaxformer_lite.plan import topology
from flaxformer_lite.runtime import parallel

TOPOLOGY = "v5e:2x2"
PRESETS = ("bert_tiny", "gemma2_tiny", "gemma3_tiny", "gpt_tiny", "llama3_tiny", "llama_tiny", "qwen2_tiny",
           "qwen3_tiny", "t5_tiny")
# llama_tiny sharded over fsdp, so that parameters and moments are split, not replicated.
SHARDED = ("parallel.data=1", "parallel.fsdp=-1")
# flops.py counts a local layer's window only; the xla path computes the causal blocks the
# window masks (BENCHMARKS.md "Planned on TPU"). A window as long as the rows makes the
# two counts comparable.
UNWINDOWED = {"gemma2_tiny": ["model.sliding_window=128"], "gemma3_tiny": ["model.sliding_window=128"]}
# XLA counts every operation, flops.py the matmuls: softmax, norms, activations, the loss,
# AdamW, the xla path's causal blocks and TPU's one-hot embedding lookups come on top
# (3% for t5_tiny to 10.4% for bert_tiny, docs/performance-notes.md "Planning for TPUs").
FLOPS_OVER_MODEL = (1.0, 1.12)

# --batch auto against a small HBM (the chip's 16 GiB would take hundreds of rows and many
# large compiles): gpt_tiny's step needs 21.5 MiB a chip at 4 rows and about 0.2 MiB more
# a row, so 26 MiB is found in five small compiles (48 MiB took ten, some of 200 rows).
AUTO = {"config": "gpt_tiny", "set": [], "auto": True, "hbm": 26 * 2**20}
# The engine's programs: 8 slots of 128 tokens, split over the 4 data-parallel chips.
SERVE = {"max_batch": 8, "max_len": 128, "chunk": 64}
SCANNED = ["model.num_layers=4", "data.batch_size=16"]

# One process plans every case: libtpu and JAX start once. Prints one JSON report a line.
_PLAN_ALL = """
import json, sys
from flaxformer_lite.config import load_config
from flaxformer_lite.plan import planner, serving, topology
topo = topology.parse(sys.argv[1])
topology.libtpu_environment(topo)
devices = topology.compile_devices(topo)
for case in json.loads(sys.argv[2]):
    cfg = load_config(case["config"], overrides=case["set"])
    if "serve" in case:
        print(json.dumps(serving.plan_serve(cfg, topo, devices, **case["serve"])), flush=True)
        continue
    print(json.dumps(planner.plan_train(cfg, topo, devices, auto_batch=case.get("auto", False),
                                        hbm_bytes=case.get("hbm"))), flush=True)
"""


def _plan(cases: list[dict]) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", _PLAN_ALL, TOPOLOGY, json.dumps(cases)], capture_output=True,
                         text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def plans() -> dict:
    """Every report the tests read, from one subprocess."""
    cases = {p: {"config": p, "set": UNWINDOWED.get(p, [])} for p in PRESETS}
    cases.update({
        "sharded": {"config": "llama_tiny", "set": list(SHARDED)},
        "splash": {"config": "llama3_tiny", "set": ["model.attention_impl=splash"]},
        "serve": {"config": "llama3_tiny", "set": [], "serve": SERVE},
        "auto": AUTO,
        "unrolled": {"config": "llama_tiny", "set": SCANNED},
        "scanned": {"config": "llama_tiny", "set": SCANNED + ["model.scan_layers=true", "train.grad_accum_steps=2"]},
    })
    return dict(zip(cases, _plan(list(cases.values()))))


def _sharded_param_bytes(overrides) -> int:
    """Bytes of one device's shard of every parameter: eval_shape sizes on a CPU mesh of the plan's shape."""
    cfg = load_config(overrides[0], overrides=overrides[1:])
    mesh = parallel.make_mesh(cfg.parallel, devices=jax.devices()[:4])
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
    shardings = parallel.param_shardings(mesh, cfg)
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_presets_fit_with_eval_shape_sizes_and_flops_py_counts(plans, preset):
    r = plans[preset]
    m = r["memory_per_chip"]
    assert r["fits"] and m["total"] < m["hbm"] == 16 * 2**30
    assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert m["parameters"] == _sharded_param_bytes([preset, *UNWINDOWED.get(preset, [])])
    # AdamW keeps two moments shaped and sharded like the parameters, plus a step count.
    assert 0 <= m["optimizer"] - 2 * m["parameters"] <= 64
    # The compiled program's argument buffers are the state and the batch (and the step and key),
    # in TPU tiles: gpt_tiny's d_model of 96 is padded to 128 lanes.
    state = m["parameters"] + m["optimizer"] + m["batch"]
    assert state <= m["arguments"] <= 1.12 * state
    low, high = FLOPS_OVER_MODEL
    assert low <= r["flops"]["counted_over_model"] <= high, r["flops"]
    est = r["estimate"]
    assert est["step_seconds"] > 0 and 0 < est["mfu"] < 1


def test_fsdp_splits_parameters_and_moments_four_ways(plans):
    sharded, replicated = plans["sharded"]["memory_per_chip"], plans["llama_tiny"]["memory_per_chip"]
    assert plans["sharded"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert sharded["parameters"] == _sharded_param_bytes(["llama_tiny", *SHARDED])
    assert sharded["parameters"] < replicated["parameters"] / 3
    assert 0 <= sharded["optimizer"] - 2 * sharded["parameters"] <= 64
    # FSDP gathers weights and reduce-scatters (or all-reduces) gradients; pure data parallelism does not gather.
    assert plans["sharded"]["collectives"]["all-gather"]["count"] > 0
    assert "all-gather" not in plans["llama_tiny"]["collectives"]


def test_scanned_layers_and_accumulation_are_counted_in_full(plans):
    """XLA counts a loop body once; the counting twins count every layer and microbatch."""
    unrolled, scanned = plans["unrolled"], plans["scanned"]
    assert "own compile" in unrolled["flops"]["counted_by"] and "twins" in scanned["flops"]["counted_by"]
    assert scanned["flops"]["counted"] == pytest.approx(unrolled["flops"]["counted"], rel=0.02)
    assert scanned["flops"]["model"] == unrolled["flops"]["model"]


def test_batch_auto_is_the_largest_batch_that_fits(plans):
    auto = plans["auto"]
    found = auto["batch"]["global"]
    assert auto["fits"] and auto["batch"]["auto"] and found % 4 == 0 and found >= 16
    assert auto["memory_per_chip"]["total"] <= AUTO["hbm"] == auto["memory_per_chip"]["hbm"]
    # The search ends when the next batch up (one row more a chip) was compiled and did not fit.
    over = auto["batch"]["smallest_over"]
    assert over["global"] == found + 4 and over["total"] > AUTO["hbm"]


def test_splash_is_planned_beside_xla_attention(plans):
    r, xla = plans["splash"], plans["llama3_tiny"]
    assert r["fits"] and r["model"]["attention_impl"] == "splash"
    # XLA counts nothing of a Pallas kernel; the plan adds the kernels' tiles, whose backward
    # recomputes the logits, so splash counts more than xla attention's step.
    assert "splash kernels" in r["flops"]["counted_by"]
    assert xla["flops"]["counted"] < r["flops"]["counted"] < 1.3 * r["flops"]["model"]
    attention = r["attention"]
    assert attention["xla_fits"] and attention["splash_roofline_seconds"] == r["estimate"]["step_seconds"]
    assert attention["xla_roofline_seconds"] == pytest.approx(xla["estimate"]["roofline_seconds"], rel=1e-6)


def test_serve_plans_the_engine_programs_per_chip(plans):
    r = plans["serve"]
    m, cfg = r["memory_per_chip"], load_config("llama3_tiny").model
    assert r["fits"] and r["serve"]["slots_split"] and m["parameters"] == _sharded_param_bytes(["llama3_tiny"])
    # Each chip holds 2 of the 8 slots: keys and values of every layer, K heads, 128 positions.
    slots = SERVE["max_batch"] // 4
    kv = slots * cfg.num_layers * 2 * cfg.kv_heads * SERVE["max_len"] * cfg.dim_per_head * 4
    assert kv <= m["kv_cache_pool"] <= 1.05 * kv
    for name, tokens in (("prefill", SERVE["chunk"]), ("step", SERVE["max_batch"])):
        p = r["programs"][name]
        assert p["total"] >= m["parameters"] + m["kv_cache_pool"]
        assert p["temporaries"] > 0 or name == "prefill"  # a chunk can fit in the donated pool's buffers
        assert p["tokens_per_call"] == tokens
        assert p["roofline_tokens_per_s"] * p["roofline_seconds"] == pytest.approx(tokens)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flaxformer_lite", "plan", *args], capture_output=True, text=True,
                          timeout=1800)


def test_cli_prints_estimates_labelled_as_estimates():
    """The README's plan command, as written there."""
    out = _cli("--config", "llama3_tiny", "--topology", "v5e-4", "--set", "data.batch_size=8")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "llama3_tiny on v5e-4 (4 chips of TPU v5e, v5e:2x2)" in text and "fits" in text
    time_line = next(line for line in text.splitlines() if "step time" in line)
    assert time_line.startswith("estimated step time") and "estimated MFU" in time_line
    assert "compiler estimate" in time_line and "roofline estimate" in time_line


@pytest.mark.parametrize("args, says", [
    (["--topology", "v5e-16"], "--topology v5e-16 has 16 chips"),  # the mesh asks for 4 data shards only
    (["--topology", "v9x-8"], "unknown TPU version"),
    (["--topology", "v5p-6"], "not a power of two"),
    (["--topology", "v5p-3"], "two a chip"),
])
def test_bad_topologies_are_one_line_errors(args, says):
    out = _cli("--config", "llama_tiny", "--set", "parallel.data=4", *args)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], out.stderr[-2000:]


def test_cloud_tpu_names_map_to_libtpu_slices():
    cases = {"v5p-8": ("v5p:2x2x1", 4), "v5p-16": ("v5p:2x2x2", 8), "v5p-64": ("v5p:2x4x4", 32),
             "v5p-128": ("v5p:4x4x4", 64), "v4-8": ("v4:2x2x1", 4), "v5e-8": ("v5e:2x4", 8),
             "v5litepod-16": ("v5e:4x4", 16), "v6e-8": ("v6e:2x4", 8), "v6e-256": ("v6e:16x16", 256),
             "v5e:2x2": ("v5e:2x2", 4)}
    for name, (libtpu, chips) in cases.items():
        topo = topology.parse(name)
        assert (topo.libtpu_name, topo.chips) == (libtpu, chips), name
    assert topology.parse("v5e-4").accelerator_type == "v5litepod-4"


def test_missing_libtpu_names_the_tpu_extra(monkeypatch):
    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(topology.UserError, match=r"flaxformer_lite\[tpu\]"):
        topology.require_libtpu()


def test_the_test_session_keeps_jax_on_the_cpu():
    assert os.environ["JAX_PLATFORMS"] == "cpu" and jax.default_backend() == "cpu"
