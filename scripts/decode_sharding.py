#!/usr/bin/env python
"""How a sharded decode splits its KV cache, and what its token loop communicates.

    python scripts/decode_sharding.py                      # meshes below, 8 simulated CPU devices
    python scripts/decode_sharding.py --mesh 1,1,8 --batch 2

For each mesh (data,fsdp,tensor) it compiles `ffl.generate` of a small LLaMA-style model
(2 layers, 8 heads and 8 kv heads of 16, d_model 128) under `parallel.use_mesh`, checks
the tokens equal a single device's, and prints the per-device shape of a layer's K cache
(from the program's cache updates) and the collectives in the compiled token loop's
body, one pass of which makes one token. Figures in docs/performance-notes.md ("Sharded decoding").
On a CPU this counts; it does not time: simulated devices share the same cores.
"""

import argparse
import collections
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import flaxformer_lite as ffl  # noqa: E402
from flaxformer_lite.inference import decode
from flaxformer_lite.runtime import parallel  # noqa: E402

MESHES = ((1, 1, 8, 1), (1, 1, 8, 2), (2, 1, 4, 4), (2, 2, 2, 4))
COLLECTIVES = r"= \S+ (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?\("


def _computation(hlo: str, name: str) -> str:
    m = re.search(r"^%?" + re.escape(name) + r" .*?\{\n(.*?)^\}", hlo, flags=re.S | re.M)
    return m.group(1) if m else ""


def _loop_collectives(hlo: str) -> dict:
    """Collectives in the largest while body (the token loop) and the computations it calls."""
    bodies = {m.group(1) for m in re.finditer(r"while\(.*?body=%?([\w.\-]+)", hlo)}
    body = max((_computation(hlo, b) for b in bodies), key=len)
    found = collections.Counter(re.findall(COLLECTIVES, body))
    for called in set(re.findall(r"calls=%?([\w.\-]+)", body)):
        found.update(re.findall(COLLECTIVES, _computation(hlo, called)))
    return dict(sorted(found.items()))


def report(data: int, fsdp: int, tensor: int, batch: int, new_tokens: int = 16) -> dict:
    """{'mesh', 'batch', 'same_tokens', 'cache_shard', 'collectives'} for one mesh."""
    cfg = ffl.load_config("llama_tiny", overrides=[
        "model.num_layers=2", "model.d_model=128", "model.num_heads=8", "model.num_kv_heads=8",
        "model.head_dim=16", "model.d_ff=256", "model.max_len=128",
    ])
    model, params = ffl.build_model(cfg.model), ffl.init_params(cfg.model, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(4, cfg.model.vocab_size, (batch, 8)).tolist()
    pcfg = ffl.ParallelConfig(data=data, fsdp=fsdp, tensor=tensor)
    mesh = parallel.make_mesh(pcfg, jax.devices()[: data * fsdp * tensor])
    seen = {}
    compiled = decode._generate

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return compiled(*args, **kwargs)

    with parallel.use_mesh(mesh, pcfg):
        sharded = jax.device_put(params, parallel.param_shardings(mesh, ffl.Config(model=cfg.model, parallel=pcfg)))
        decode._generate = capture
        try:
            out = ffl.generate(model, sharded, prompts, max_new_tokens=new_tokens, ignore_eos=True)
        finally:
            decode._generate = compiled
        hlo = compiled.lower(*seen["args"], **seen["kwargs"]).compile().as_text()
    single = ffl.generate(model, params, prompts, max_new_tokens=new_tokens, ignore_eos=True)
    H = cfg.model.head_dim
    shards = sorted(set(re.findall(rf"f32\[(\d+,\d+,{H})\]\{{[\d,]*\}} dynamic-update-slice", hlo)))
    return {
        "mesh": (data, fsdp, tensor), "batch": batch,
        "same_tokens": bool(np.array_equal(np.asarray(out.tokens), np.asarray(single.tokens))),
        "cache_rows": batch * cfg.model.num_kv_heads, "cache_shard": shards, "collectives": _loop_collectives(hlo),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", help="data,fsdp,tensor (default: a few meshes of 8 devices)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    meshes = [(*map(int, args.mesh.split(",")), args.batch)] if args.mesh else MESHES
    print("| mesh (data, fsdp, tensor) | batch | cache rows | per-device K cache | collectives per token | same tokens |")
    print("|---|---|---|---|---|---|")
    for d, f, t, b in meshes:
        r = report(d, f, t, b)
        total = sum(r["collectives"].values())
        detail = ", ".join(f"{n} {k}" for k, n in r["collectives"].items())
        print(f"| {d}, {f}, {t} | {b} | {r['cache_rows']} | {' '.join(f'[{s}]' for s in r['cache_shard'])} "
              f"| {total} ({detail}) | {'yes' if r['same_tokens'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
