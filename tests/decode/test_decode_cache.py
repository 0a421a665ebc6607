"""Cached generation equals the uncached forward pass, per family and position scheme."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import NEW_TOKENS, full_logits, prompts_for, tiny

import flaxformer_lite as ffl
from flaxformer_lite.inference.decode import generate
from flaxformer_lite.runtime import parallel

# (preset, overrides): every position scheme each family allows, with GQA on some. The
# plain gpt_tiny and the scanned t5_tiny are test_decode_methods' models and share its
# compiled programs; scanned layers halve compile time and still run a 2-layer cache.
# Unrolled encoder-decoder generation is checked against transformers (test_decode_hf).
SCAN = "model.scan_layers=true"
CONFIGS = [
    ("gpt_tiny", ()),  # learned
    ("gpt_tiny", ("model.position=sinusoidal", SCAN)),
    ("llama_tiny", (SCAN,)),  # RoPE, GQA 4/2
    ("gpt_tiny", ("model.position=relative", SCAN)),
    ("gpt_tiny", ("model.position=alibi", SCAN)),
    ("t5_tiny", (SCAN,)),  # relative
    ("transformer_base", (SCAN,)),  # sinusoidal, post-LN, scaled embeddings
    ("transformer_base", ("model.position=learned", SCAN)),
    ("t5_tiny", ("model.position=rope", "model.num_kv_heads=2", SCAN)),
    # Gemma 3's block, scanned: per-layer windows (4, shorter than the rows) and RoPE bases traced
    ("gemma3_tiny", ("model.sliding_window=4", "model.attention_types=[local, global]", SCAN)),
]


@pytest.mark.parametrize("preset, overrides", CONFIGS, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_cached_logits_equal_uncached_forward(preset, overrides):
    model, params = tiny(preset, *overrides)
    prompts = prompts_for(model)
    out = generate(model, params, prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True)
    tokens, logits = np.asarray(out.tokens), np.asarray(out.logits)
    reference = full_logits(model, params, prompts, tokens)
    assert logits.shape == reference.shape == (len(prompts), NEW_TOKENS, model.cfg.vocab_size)
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(tokens, reference.argmax(-1))
    np.testing.assert_array_equal(np.asarray(out.lengths), NEW_TOKENS)


def test_generation_under_a_mesh_equals_one_device(decoder):
    """Sharded params and a logically named cache, on 8 simulated devices, change nothing."""
    model, params = decoder
    # return_logits: the program test_cached_logits_equal_uncached_forward compiled
    single = generate(model, params, prompts_for(model), max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True)
    pcfg = ffl.ParallelConfig(data=2, fsdp=2, tensor=2)
    mesh = parallel.make_mesh(pcfg, jax.devices()[:8])
    with parallel.use_mesh(mesh, pcfg):
        sharded = jax.device_put(params, parallel.param_shardings(mesh, ffl.Config(model=model.cfg)))
        out = generate(model, sharded, prompts_for(model), max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert len(out.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(single.tokens))


@pytest.mark.parametrize("scan", [False, True])
def test_cache_rows_are_split_over_batch_and_kv_heads(scan):
    """On a data x fsdp x tensor mesh each device holds the K/V rows of its batch slice and
    its kv heads: the cache is split 8 ways, not only over the batch."""
    model, _ = tiny("llama_tiny", f"model.scan_layers={str(scan).lower()}")  # K = 2 kv heads
    K, B, S = model.cfg.num_kv_heads, 4, 8
    pcfg = ffl.ParallelConfig(data=2, fsdp=2, tensor=2)
    mesh = parallel.make_mesh(pcfg, jax.devices()[:8])
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((B, S), jnp.int32), decode=True))["cache"]
    specs = nn.get_partition_spec(boxed)
    shardings = parallel.logical_to_sharding(mesh, pcfg, specs)
    leaves = [
        (path, leaf, sharding)
        for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)), jax.tree.leaves(shardings))
        if jax.tree_util.keystr(path).endswith(("['key']", "['value']"))
    ]
    assert len(leaves) == (2 if scan else 2 * model.cfg.num_layers)
    for path, leaf, sharding in leaves:
        rows_axis = leaf.ndim - 3  # [(L,) B*K, S, H]
        assert leaf.shape[rows_axis] == B * K
        for device, index in sharding.devices_indices_map(leaf.shape).items():
            d, f, t = (int(c[0]) for c in np.nonzero(mesh.devices == device))
            rows = range(B * K)[index[rows_axis]]
            b = 2 * d + f  # the batch row of this (data, fsdp) slice: B = data * fsdp here
            assert list(rows) == [b * K + t], (jax.tree_util.keystr(path), device, list(rows))

