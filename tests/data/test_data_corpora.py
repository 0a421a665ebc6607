"""Corpora: every format, the built-in corpus and task, splitting, and each bad input."""

import builtins
import json
import pathlib
from collections import Counter

import pytest
from pydoc_data.topics import topics

from flaxformer_lite.data import (
    DataError,
    builtin_classification,
    builtin_documents,
    load_labeled,
    load_pairs,
    load_texts,
    split,
)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- built-in


def test_builtin_documents_are_pydoc_topics_in_name_order():
    docs = builtin_documents()
    assert docs == [topics[k] for k in sorted(topics)]
    assert load_texts(unit="file") == [d.strip("\n") for d in docs]


def test_builtin_paragraphs_are_deterministic_and_nonblank():
    paragraphs = load_texts()
    assert paragraphs == load_texts("builtin")
    assert len(paragraphs) > len(topics) and all(p.strip() for p in paragraphs)


def test_builtin_classification_is_a_balanced_deterministic_word_order_task():
    task = builtin_classification()
    assert task == builtin_classification()
    assert task.label_names == ("original", "shuffled") and task.num_classes == 2
    counts = Counter(label for _, label in task.examples)
    assert abs(counts[0] - counts[1]) <= 1
    assert builtin_classification(seed=1).examples != task.examples
    # The examples follow the qualifying paragraphs in order (first 20 words each).
    openings = [p.split()[:20] for p in load_texts()]
    openings = [w for w in openings if len(w) >= 8 and len(set(w[1:-1])) > 1]
    assert len(openings) == len(task.examples)
    for (text, label), original in zip(task.examples, openings):
        words = text.split()
        if label == 0:
            assert words == original
        else:  # same words, same ends, another order
            assert words != original and sorted(words) == sorted(original)
            assert (words[0], words[-1]) == (original[0], original[-1])


# ----------------------------------------------------------------------------------- texts


def test_text_units(tmp_path):
    f = _write(tmp_path / "a.txt", "first para\nline two\n\n  \nsecond para\n\n\nthird\n")
    assert load_texts(f) == ["first para\nline two", "second para", "third"]
    assert load_texts(f, unit="line") == ["first para", "line two", "second para", "third"]
    assert load_texts(f, unit="file") == ["first para\nline two\n\n  \nsecond para\n\n\nthird"]
    with pytest.raises(DataError, match="unit 'sentence' is not one of"):
        load_texts(f, unit="sentence")


def test_folder_is_recursive_txt_in_sorted_order_and_globs_and_lists(tmp_path):
    _write(tmp_path / "b.txt", "bee")
    _write(tmp_path / "sub" / "deeper" / "a.txt", "ant")
    _write(tmp_path / "sub" / "c.txt", "cat")
    _write(tmp_path / "ignored.md", "not a txt")
    assert load_texts(tmp_path) == ["bee", "cat", "ant"]  # b.txt, sub/c.txt, sub/deeper/a.txt
    assert load_texts(str(tmp_path / "**" / "*.txt")) == ["bee", "cat", "ant"]
    assert load_texts(str(tmp_path / "*.md")) == ["not a txt"]
    assert load_texts([tmp_path / "sub" / "c.txt", tmp_path / "b.txt"]) == ["cat", "bee"]


def test_jsonl_texts(tmp_path):
    rows = [{"body": "one", "id": 1}, {"body": "two"}, {"body": "   "}]
    f = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_texts(f, text_field="body") == ["one", "two"]


def test_tsv_pairs_and_jsonl_pairs(tmp_path):
    tsv = _write(tmp_path / "p.tsv", "hello\tbonjour\n\ncat\tchat\n")
    assert load_pairs(tsv) == [("hello", "bonjour"), ("cat", "chat")]
    jsonl = _write(tmp_path / "p.jsonl", json.dumps({"en": "dog", "fr": "chien"}) + "\n")
    assert load_pairs(jsonl, source_field="en", target_field="fr") == [("dog", "chien")]
    both = load_pairs(tmp_path, source_field="en", target_field="fr")  # p.jsonl, then p.tsv
    assert both == [("dog", "chien"), ("hello", "bonjour"), ("cat", "chat")]


def test_labeled_tsv_and_jsonl(tmp_path):
    tsv = _write(tmp_path / "c.tsv", "good film\tpos\nbad film\tneg\nok film\tpos\n")
    corpus = load_labeled(tsv)
    assert corpus.label_names == ("neg", "pos")
    assert corpus.examples == [("good film", 1), ("bad film", 0), ("ok film", 1)]
    jsonl = _write(tmp_path / "c.jsonl", "\n".join(json.dumps({"t": f"x{i}", "y": i}) for i in (10, 2, 9)))
    numeric = load_labeled(jsonl, text_field="t", label_field="y")
    assert numeric.label_names == ("2", "9", "10")  # numeric order, not string order
    assert [label for _, label in numeric.examples] == [2, 0, 1]
    assert load_labeled("builtin") == builtin_classification()


def test_label_names_shared_with_validation_set(tmp_path):
    val = _write(tmp_path / "val.tsv", "fine\tpos\nodd\tmaybe\n")
    with pytest.raises(DataError, match=r"val\.tsv:2: label 'maybe' is not one of \['neg', 'pos'\]"):
        load_labeled(val, label_names=("neg", "pos"))


def test_split_is_deterministic_disjoint_and_order_free():
    items = [f"doc {i}" for i in range(1000)]
    train, val = split(items, 0.1, seed=7)
    assert (train, val) == split(items, 0.1, seed=7)
    assert not set(train) & set(val) and sorted(train + val) == sorted(items)
    assert len(val) == 100
    assert train == [x for x in items if x in set(train)]  # input order kept
    r_train, r_val = split(items[::-1], 0.1, seed=7)
    assert set(r_val) == set(val)
    assert set(split(items, 0.1, seed=8)[1]) != set(val)


def test_split_pairs_and_duplicates_and_edge_cases():
    pairs = [("a", "b"), ("c", "d"), ("a", "b"), ("e", "f")] * 5
    train, val = split(pairs, 0.25)
    assert not set(train) & set(val)  # identical items land on the same side
    assert split(["x", "y"], 0.0) == (["x", "y"], [])
    with pytest.raises(DataError, match="cannot split 1 item"):
        split(["x"], 0.5)
    with pytest.raises(DataError, match=r"val_fraction=1.0 must be in \[0, 1\)"):
        split(["x", "y"], 1.0)
    with pytest.raises(DataError, match="all 3 items are identical"):
        split(["x"] * 3, 0.5)

    with pytest.raises(DataError, match="split method 'random' is not one of hash, tail"):
        split(["x", "y"], 0.5, method="random")


def test_tail_split_holds_out_the_last_items_in_order():
    items = [f"doc {i}" for i in range(40)]
    assert split(items, 0.1, method="tail") == (items[:36], items[36:])
    assert split(items[:2], 0.01, method="tail") == (["doc 0"], ["doc 1"])  # at least one each side



# ------------------------------------------------------------------------------ bad input


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope.txt: no such file or folder"):
        load_texts(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"\*\.zzz: pattern matches no files"):
        load_texts(str(tmp_path / "*.zzz"))
    with pytest.raises(DataError, match=r"folder holds no \*\.txt, \*\.jsonl, "):
        load_texts(tmp_path)


def test_empty_corpus(tmp_path):
    f = _write(tmp_path / "empty.txt", "\n  \n\n")
    with pytest.raises(DataError, match=r"empty\.txt: no text found; the corpus is empty"):
        load_texts(f)
    with pytest.raises(DataError, match="no pairs found"):
        load_pairs(_write(tmp_path / "empty.tsv", ""))


def test_not_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("ok\nalso ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:3: not valid UTF-8 \(byte 0xe9\)"):
        load_texts(f)


def test_unreadable_file(tmp_path, monkeypatch):
    f = _write(tmp_path / "secret.txt", "text")

    real_open = builtins.open

    def denied(path, *args, **kwargs):
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(DataError, match=r"secret\.txt: cannot read \(Permission denied\)"):
        load_texts(f)
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: denied(self))
    with pytest.raises(DataError, match=r"secret\.txt: cannot read \(Permission denied\)"):
        load_pairs(f)


def test_tsv_row_without_tab_names_line(tmp_path):
    rows = [f"src {i}\ttgt {i}" for i in range(16)] + ["no tab here"]
    f = _write(tmp_path / "corpus.tsv", "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"corpus\.tsv:17: row has no tab; expected source<TAB>target"):
        load_pairs(f)
    g = _write(tmp_path / "three.tsv", "a\tb\tc\n")
    with pytest.raises(DataError, match=r"three\.tsv:1: row has 2 tabs; expected source<TAB>target"):
        load_pairs(g)
    h = _write(tmp_path / "lab.tsv", "fine\tpos\n\tneg\n")
    with pytest.raises(DataError, match=r"lab\.tsv:2: empty text; expected text<TAB>label"):
        load_labeled(h)


def test_jsonl_bad_lines_name_file_and_line(tmp_path):
    bad_json = _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_texts(bad_json)
    no_field = _write(tmp_path / "field.jsonl", '{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"field\.jsonl:3: no field 'text' \(fields: body\)"):
        load_texts(no_field)
    not_object = _write(tmp_path / "list.jsonl", '["text"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: JSON line is a list, expected an object"):
        load_texts(not_object)
    not_string = _write(tmp_path / "num.jsonl", '{"text": 5}\n')
    with pytest.raises(DataError, match=r"num\.jsonl:1: field 'text' is a int, expected a string"):
        load_texts(not_string)
    bad_label = _write(tmp_path / "lab.jsonl", '{"text": "a", "label": [1]}\n')
    with pytest.raises(DataError, match=r"lab\.jsonl:1: field 'label' is a list"):
        load_labeled(bad_label)


def test_no_builtin_pairs():
    with pytest.raises(DataError, match="there is no built-in seq2seq corpus"):
        load_pairs("builtin")
