"""`prepare` and `tokenizer train` on the command line, the cache, and runs reading a DATADIR."""

import json
import os
import pathlib

import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite import cli
from flaxformer_lite.data import ByteTokenizer, PrepareOptions, Store, cached, load_tokenizer, preparation
from flaxformer_lite.runtime import host
from flaxformer_lite.train import loop

TINY = ("model.num_layers=1", "model.d_model=32", "model.d_ff=64", "model.num_heads=2", "model.max_len=32",
        "data.seq_len=32", "data.batch_size=8", "train.eval_batches=2", "train.num_samples=2")


def _corpus(folder: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(5)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(2):
        paras = [" ".join(rng.choice(words, int(rng.integers(3, 40)))).capitalize() for _ in range(60)]
        (folder / f"{f}.txt").write_text("\n\n".join(paras) + "\n")
    return folder


def test_the_cache_is_keyed_by_content_and_options(tmp_path, monkeypatch):
    root = pathlib.Path(os.environ[host.CACHE_ENV])
    assert host.cache_root() == root and str(root).startswith(str(tmp_path.parent.parent))
    corpus = _corpus(tmp_path / "c")
    first = cached(corpus, PrepareOptions(), progress=False)
    assert first.parent == root / "data" and Store.open(first).manifest["documents"] == 120

    def no_prepare(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(preparation, "prepare", no_prepare)
    assert cached(corpus, PrepareOptions(), progress=False) == first  # a second run: opened at once
    monkeypatch.undo()
    assert cached(corpus, PrepareOptions(seed=1), progress=False) != first
    (corpus / "1.txt").write_text((corpus / "1.txt").read_text().replace("alpha", "omega"))
    edited = cached(corpus, PrepareOptions(), progress=False)
    assert edited != first and Store.open(edited).manifest["tokens"] == Store.open(first).manifest["tokens"]


def test_a_run_on_a_datadir_reads_what_a_run_on_the_plain_corpus_reads(tmp_path):
    corpus = _corpus(tmp_path / "c")
    datadir = tmp_path / "d"
    assert cli.main(["prepare", "--corpus", str(corpus), "--out", str(datadir), "--no-progress", "--split", "tail",
                     "--workers", "1"]) == 0
    plain = loop.prepare_data(ffl.load_config("gpt_tiny", overrides=TINY + (f"data.corpus={corpus}",)))
    stored = loop.prepare_data(ffl.load_config("gpt_tiny", overrides=TINY + (f"data.corpus={datadir}",)))
    for a, b in zip(plain.eval_batches, stored.eval_batches):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    its = [iter(s.train) for s in (plain, stored)]
    for _ in range(5):
        a, b = (next(it) for it in its)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert plain.sample_prompts == stored.sample_prompts and len(plain.sample_prompts) == 2
    for it in its:
        it.close()


def test_cli_prepare_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert cli.main(["prepare", "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "the corpus is empty" in err
    assert cli.main(["prepare", "--merge", "--out", str(tmp_path / "nothing")]) == 2
    assert "prepare.json: cannot read the prepare record" in capsys.readouterr().err


def test_tokenizer_train_then_prepare_then_train_as_the_readme_does(tmp_path, capsys):
    corpus = _corpus(tmp_path / "c")
    out = tmp_path / "tok" / "tokenizer.json"  # its folder does not exist yet
    assert cli.main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400", "--out", str(out),
                     "--num-sentinels", "4"]) == 0
    tok = load_tokenizer(out)
    # The corpus has only so many pairs to merge: the vocabulary may stop short of 400.
    assert json.loads(capsys.readouterr().out) == {"tokenizer": str(out), "vocab_size": tok.vocab_size}
    assert 300 < tok.vocab_size <= 400
    text = "Gamma delta epsilon"
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text) / 2
    datadir = tmp_path / "d"
    assert cli.main(["prepare", "--corpus", str(corpus), "--out", str(datadir), "--tokenizer", str(out),
                     "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab_size"] == tok.vocab_size and summary["dtype"] == "<u2"
    store = Store.open(datadir)
    assert load_tokenizer(datadir / "tokenizer.json").identity == tok.identity == store.manifest["tokenizer"]
    docs = store.documents("all")
    assert tok.decode(docs.tokens(0)) == (corpus / "0.txt").read_text().split("\n\n")[0]
    assert ByteTokenizer().identity != tok.identity
    # gpt_tiny asks for the tail split; the store was split by hash (prepare's default): the run adopts it.
    overrides = TINY + (f"data.corpus={datadir}", f"data.tokenizer={datadir}/tokenizer.json", "model.vocab_size=400")
    with pytest.warns(UserWarning, match=r"was prepared with split hash \(val_fraction 0\.05\); the run uses it, "
                                         r"not data\.split=tail"):
        setup = loop.prepare_data(ffl.load_config("gpt_tiny", overrides=overrides), train=False)
    assert setup.cfg.data.split == "hash" and setup.eval_batches


def test_tokenizer_train_into_a_folder_it_cannot_make_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    corpus = _corpus(tmp_path / "c")
    assert cli.main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400",
                     "--out", str(tmp_path / "file" / "tok.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {tmp_path / 'file'}: cannot create the tokenizer's folder" in err
