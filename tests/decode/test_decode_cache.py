"""Cached generation equals the uncached forward pass, per family and position scheme."""

import jax
import numpy as np
import pytest
from decode_helpers import NEW_TOKENS, full_logits, prompts_for, tiny

import flaxformer_lite as ffl
from flaxformer_lite import parallel
from flaxformer_lite.decode import generate

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
