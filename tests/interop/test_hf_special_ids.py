"""A HF config whose special ids lie outside the vocabulary (HF's GPT2Config defaults with a
small vocab) loads with one warning naming the fields, and generation ignores those ids."""

import json
import warnings

import jax
import numpy as np
import pytest

import flaxformer_lite as ffl


def tiny_gpt():
    return ffl.load_config("gpt_tiny", overrides=["model.num_layers=1", "model.d_model=32", "model.num_heads=2",
                                                  "model.d_ff=64", "model.max_len=32", "data.seq_len=32"]).model


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2 folder whose config.json has GPT2Config's default ids: bos = eos = 50256."""
    path = tmp_path_factory.mktemp("gpt2")
    cfg = tiny_gpt()
    ffl.hf.save(cfg, ffl.init_params(cfg, jax.random.key(0)), path, model_type="gpt2")
    config = json.loads((path / "config.json").read_text())
    config.update(bos_token_id=50256, eos_token_id=50256)
    config.pop("pad_token_id", None)  # GPT-2 has none: it falls back to eos
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_load_warns_once_naming_the_fields_and_generate_ignores_them(gpt2_folder):
    with pytest.warns(UserWarning) as caught:
        cfg, params = ffl.hf.load(gpt2_folder)
    messages = [str(w.message) for w in caught if "outside the vocabulary" in str(w.message)]
    assert len(messages) == 1
    assert str(gpt2_folder / "config.json") in messages[0]
    assert "pad_token_id=50256" in messages[0] and "bos_token_id=50256" in messages[0]
    assert "eos_token_id=50256" in messages[0] and f"[0, {cfg.vocab_size})" in messages[0]

    model = ffl.build_model(cfg)
    prompts = [[5, 6, 7], [8, 9]]
    out = ffl.generate(model, params, prompts, max_new_tokens=6)
    assert np.asarray(out.lengths).tolist() == [6, 6]  # no usable eos: every row runs to the end
    tokens = np.asarray(out.tokens)
    assert ((tokens >= 0) & (tokens < cfg.vocab_size)).all()
    # The same tokens as a model whose config holds no unusable ids and is told to ignore eos.
    plain = ffl.generate(model, params, prompts, max_new_tokens=6, ignore_eos=True, pad_token_id=0)
    np.testing.assert_array_equal(tokens, np.asarray(plain.tokens))


def test_an_explicit_out_of_range_eos_is_still_an_error(gpt2_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg, params = ffl.hf.load(gpt2_folder)
    with pytest.raises(ValueError, match="eos_token_id holds id 50256 outside"):
        ffl.generate(ffl.build_model(cfg), params, [[5, 6]], max_new_tokens=2, eos_token_id=50256)


def test_a_folder_with_usable_ids_loads_without_that_warning(tmp_path):
    cfg = tiny_gpt()
    ffl.hf.save(cfg, ffl.init_params(cfg, jax.random.key(0)), tmp_path, model_type="gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ffl.hf.load(tmp_path)
