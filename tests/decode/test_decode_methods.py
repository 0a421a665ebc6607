"""Greedy, sampling and beam search: equivalences, stopping, padding, beam scores."""

import jax
import numpy as np
import pytest
from decode_helpers import NEW_TOKENS, full_logits, prompts_for, uncached_greedy

from flaxformer_lite.inference.decode import filter_top_k_top_p, generate


def run(model, params, **kw):
    """generate on the shared prompts; greedy calls share test_decode_cache's program."""
    kw.setdefault("max_new_tokens", NEW_TOKENS)
    kw.setdefault("return_logits", kw.get("method", "greedy") == "greedy")
    return jax.tree.map(np.asarray, generate(model, params, prompts_for(model), **kw))


@pytest.fixture(scope="module", params=["decoder", "encoder_decoder"])
def family(request):
    """(model, params, stop): a stop token the model's greedy output meets at step 2 of row 0."""
    model, params = request.getfixturevalue(request.param)
    free = run(model, params, ignore_eos=True)
    return model, params, int(free.tokens[0, 2])


def _check_stopping(tokens, lengths, stop, pad):
    """Each row: no stop before its end, a stop at its end if it ended early, pads after."""
    for row, n in zip(tokens, lengths):
        assert 1 <= n <= NEW_TOKENS
        assert stop not in row[: n - 1].tolist()
        if n < NEW_TOKENS:
            assert row[n - 1] == stop
        assert (row[n:] == pad).all()


def test_padded_batch_equals_prompts_run_alone(family):
    model, params, stop = family
    out = run(model, params, eos_token_id=stop)
    alone = uncached_greedy(model, params, prompts_for(model), [stop])
    np.testing.assert_array_equal(out.tokens, alone)
    assert out.lengths[0] <= 3  # the stop token was taken from this row's step 2
    _check_stopping(out.tokens, out.lengths, stop, model.cfg.pad_token_id)


def test_greedy_scores_are_log_probs(family):
    model, params, stop = family
    out = run(model, params, eos_token_id=stop)
    log_probs = jax.nn.log_softmax(full_logits(model, params, prompts_for(model), out.tokens))
    chosen = np.take_along_axis(np.asarray(log_probs), out.tokens[..., None], -1)[..., 0]
    expected = [chosen[b, :n].sum() for b, n in enumerate(out.lengths)]
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5)


def test_min_new_tokens_blocks_stop_tokens(family):
    model, params, _ = family
    first = int(run(model, params, ignore_eos=True).tokens[0, 0])
    assert run(model, params, eos_token_id=first).lengths[0] == 1
    held = run(model, params, eos_token_id=first, min_new_tokens=4)
    assert (held.lengths >= 4).all()
    assert first not in held.tokens[:, :4]
    _check_stopping(held.tokens, held.lengths, first, model.cfg.pad_token_id)


def test_beam_size_one_equals_greedy(decoder):
    model, params = decoder
    stop = int(run(model, params, ignore_eos=True).tokens[0, 2])
    greedy = run(model, params, eos_token_id=stop)
    beam = run(model, params, eos_token_id=stop, method="beam", num_beams=1)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_array_equal(beam.lengths, greedy.lengths)


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_beam_scores_are_length_penalised_log_probs(family, alpha):
    model, params, stop = family
    out = run(model, params, eos_token_id=stop, method="beam", num_beams=4, length_penalty=alpha)
    assert out.beam_tokens.shape == (3, 4, NEW_TOKENS)
    assert (np.diff(out.beam_scores, axis=1) <= 0).all()  # best first
    np.testing.assert_array_equal(out.tokens, out.beam_tokens[:, 0])
    for w in range(4):
        tokens, lengths = out.beam_tokens[:, w], out.beam_lengths[:, w]
        _check_stopping(tokens, lengths, stop, model.cfg.pad_token_id)
        log_probs = np.asarray(jax.nn.log_softmax(full_logits(model, params, prompts_for(model), tokens)))
        chosen = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
        totals = np.array([chosen[b, :n].sum() for b, n in enumerate(lengths)])
        np.testing.assert_allclose(out.beam_scores[:, w], totals / lengths**alpha, rtol=1e-5)


def test_beam_without_early_stopping_scores_at_least_as_well(family):
    model, params, stop = family
    early = run(model, params, eos_token_id=stop, method="beam", num_beams=4)
    late = run(model, params, eos_token_id=stop, method="beam", num_beams=4, early_stopping=False)
    assert (late.scores >= early.scores - 1e-6).all()


def test_top_k_one_sampling_equals_greedy(decoder):
    model, params = decoder
    greedy = run(model, params, ignore_eos=True)
    for seed in (0, 1):
        sampled = run(model, params, ignore_eos=True, method="sample", top_k=1, seed=seed)
        np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


def test_sampling_is_seeded_and_stays_in_the_top_k(decoder):
    model, params = decoder
    kw = dict(ignore_eos=True, method="sample", top_k=5, temperature=2.0)
    first, again, other = (run(model, params, seed=s, **kw) for s in (3, 3, 4))
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert (first.tokens != other.tokens).any()
    logits = full_logits(model, params, prompts_for(model), first.tokens)
    top5 = np.argsort(-logits, axis=-1)[..., :5]
    assert (top5 == first.tokens[..., None]).any(-1).all()
    greedy = run(model, params, ignore_eos=True)
    nucleus = run(model, params, seed=3, **{**kw, "top_p": 1e-6})  # only the top token left
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)
    # The repetition penalty acts before the filters: the one token left is greedy's under it.
    penalised = run(model, params, ignore_eos=True, repetition_penalty=1.5)
    assert (penalised.tokens != greedy.tokens).any()
    nucleus = run(model, params, seed=3, repetition_penalty=1.5, **{**kw, "top_p": 1e-6})
    np.testing.assert_array_equal(nucleus.tokens, penalised.tokens)


@pytest.mark.parametrize("k", [0, 1, 7])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_k_top_p_filter_keeps_the_defined_set(k, p):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    kept = np.isfinite(np.asarray(filter_top_k_top_p(logits, np.int32(k), np.float32(p))))
    for b in range(4):
        order = np.argsort(-logits[b])[: k or 50]
        probs = np.exp(logits[b, order]) / np.exp(logits[b, order]).sum()
        # of the k best, the fewest whose probability mass (renormalised over them) reaches p
        n = min(int(np.searchsorted(np.cumsum(probs), p)) + 1, len(order))
        assert set(np.flatnonzero(kept[b])) == set(order[:n])
