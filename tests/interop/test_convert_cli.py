"""`flaxformer-lite convert`: HF folder -> run directory -> HF folder, tokenizer included."""

import json

import jax
import numpy as np
import pytest
import transformers

from flaxformer_lite import cli, data
from flaxformer_lite.interop import hf, parity
from flaxformer_lite.runtime import checkpoint

transformers.logging.set_verbosity_error()
CASE = "roberta"  # not the default export family: --to-hf must remember it


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An HF RoBERTa folder with a tokenizer.json, converted to a run directory."""
    root = tmp_path_factory.mktemp("convert")
    original = parity.build_hf(CASE, root / "hf")
    words = "the cat sat on the mat and the dog ate the hat".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 8)) for _ in range(50)]
    data.train_tokenizer(texts, kind="wordpiece", vocab_size=60, out_path=root / "hf", num_sentinels=0)
    assert cli.main(["convert", "--from-hf", str(root / "hf"), "--to", str(root / "run")]) == 0
    return original, root


def test_run_directory_holds_the_converted_model_and_tokenizer(converted):
    _, root = converted
    cfg, params = checkpoint.load_params(root / "run")
    model_cfg, hf_params = hf.load(root / "hf")
    assert cfg.model == model_cfg
    jax.tree.map(np.testing.assert_array_equal, params, hf_params)
    assert cfg.data.tokenizer == str(root / "run" / hf.HF_SOURCE_DIR)
    for name in ("config.json", "tokenizer.json"):  # the source's, kept for --to-hf
        assert (root / "run" / hf.HF_SOURCE_DIR / name).read_bytes() == (root / "hf" / name).read_bytes()
    tok = data.load_tokenizer(cfg.data.tokenizer)
    ids = tok.encode("the dog sat on the hat", eos=True)
    assert max(ids) < cfg.model.vocab_size
    assert tok.decode(ids) == "the dog sat on the hat"


def test_export_back_to_hf_keeps_family_weights_and_tokenizer(converted, capsys):
    original, root = converted
    capsys.readouterr()
    assert cli.main(["convert", "--from", str(root / "run"), "--to-hf", str(root / "back")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_type"] == CASE and summary["architecture"] == "RobertaForMaskedLM"
    reloaded = parity.hf_class(CASE).from_pretrained(root / "back")
    # Only the position rows RoBERTa never reads (below padding_idx) are rebuilt.
    never_read = "roberta.embeddings.position_embeddings.weight rows [0]"
    assert parity.round_trip_changes(original, reloaded) == [never_read]
    assert (root / "back" / "tokenizer.json").read_bytes() == (root / "hf" / "tokenizer.json").read_bytes()


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["convert", "--from-hf", str(tmp_path / "missing"), "--to", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err
    assert not run.exists()
    assert cli.main(["convert", "--from-hf", str(tmp_path), "--to-hf", str(run)]) == 2
    assert "--from-hf DIR --to WORKDIR" in capsys.readouterr().err
