"""README.md and docs/*.md cannot rot: their code blocks run as written, or say why not.

Which blocks run:
- fenced ```python blocks: a page's blocks run in order in one namespace, in a fresh
  folder (anything they write lands there), so a later block may use an earlier one's
  names, as a reader would;
- fenced ```bash / ```sh / ```shell / ```console blocks, and indented blocks whose lines
  are commands (`flaxformer-lite ...`, `python ...`, `pip ...`, `$ ...`): each command runs
  in that page's folder, where `configs/`, `scripts/` and `tests/` are the repository's.
  `flaxformer-lite` commands run in this process (`cli.main`) and must exit 0; others run
  in bash. In a `$ ` block only the `$ ` lines are commands (the rest is output).
Placeholder folders the pages name (`path/to/hf_dir`, ...) hold tiny random HF models
(HF_PLACEHOLDERS below). A page whose blocks run in a test of their own is in OWN_TESTS.

A block that cannot run here is marked by an HTML comment on the line just before it
(invisible on GitHub), one of:
  <!-- docs-test: skip: REASON -->   not run; the reason says what CI lacks (a GPU, a real
                                      checkpoint, a multi-hour run) or that it is a synopsis
  <!-- docs-test: run: COMMAND -->   run COMMAND instead (repeat the comment for several):
                                      the same command with tiny settings, for a block that
                                      would train for minutes
The test fails on a block that errors, on a marker without a reason or command, and on a
marker that is not followed by a block.
"""

import pathlib
import re
import shlex
import subprocess

import pytest

from flaxformer_lite import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OWN_TESTS = {"docs/tour.md": "tests/test_tour.py", "docs/nnx.md": "tests/test_nnx.py"}
LINKED = ("configs", "scripts", "tests")  # the repository's folders, as a page's commands see them
SHELL_TAGS = ("bash", "sh", "shell", "console")
COMMAND = re.compile(r"^(\$ |flaxformer-lite |python |pip )")
MARKER = re.compile(r"^<!-- docs-test: (skip|run): (.*?) -->$")
# Placeholder folder -> a tiny random HF model of that kind, with a tokenizer.json.
HF_PLACEHOLDERS = {
    "path/to/hf_dir": "gpt2",
    "path/to/gpt2_dir": "gpt2",
    "path/to/all-MiniLM-L6-v2": "bert",
}


def _blocks(page: pathlib.Path) -> list[dict]:
    """Code blocks of a page: kind ('python' or 'shell'), first line, code, marker."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks, markers, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line.strip())
        if m:
            markers.append((i + 1, m.group(1), m.group(2).strip()))
            i += 1
            continue
        if line.startswith("```"):
            tag = line[3:].strip()
            end = lines.index("```", i + 1)
            kind = "python" if tag == "python" else "shell" if tag in SHELL_TAGS else None
            if kind:
                blocks.append({"kind": kind, "line": i + 2, "code": "\n".join(lines[i + 1:end]), "markers": markers})
            elif markers:
                raise AssertionError(f"{page.name}:{markers[0][0]}: a docs-test marker before a ```{tag} block")
            markers, i = [], end + 1
            continue
        previous = lines[i - 1] if i else ""
        after_text = previous.strip() and not MARKER.match(previous.strip())
        if line.startswith("    ") and not after_text and COMMAND.match(line[4:]):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            code = "\n".join(text[4:] for text in lines[i:end]).strip("\n")
            blocks.append({"kind": "shell", "line": i + 1, "code": code, "markers": markers})
            markers, i = [], end
            continue
        if line.strip() and markers:
            raise AssertionError(f"{page.name}:{markers[0][0]}: a docs-test marker not followed by a code block")
        i += 1
    return blocks


def _commands(code: str) -> list[str]:
    """The commands of a shell block: `\\` continuations joined, `$ ` output skipped."""
    joined = code.replace("\\\n", " ")
    prompted = any(line.startswith("$ ") for line in joined.splitlines())
    commands = []
    for line in joined.splitlines():
        if prompted:
            if line.startswith("$ "):
                commands.append(line[2:])
        elif line.strip() and not line.lstrip().startswith("#"):
            commands.append(line)
    return commands


def _run_command(command: str, where: str) -> None:
    words = shlex.split(command, comments=True)
    if words and words[0] == "flaxformer-lite" and not set(words) & {"&&", "|", ";", ">"}:
        status = cli.main(words[1:])
        assert status == 0, f"{where}: `{command}` exited {status}"
        return
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{where}: `{command}` exited {out.returncode}: {out.stderr[-2000:]}"


def _make_placeholders(folder: pathlib.Path) -> None:
    import transformers

    from flaxformer_lite import data

    transformers.logging.set_verbosity_error()
    words = "the cat sat on the mat and the dog ate a red hat".split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    for name, kind in HF_PLACEHOLDERS.items():
        if kind == "gpt2":  # GPT-2's own vocabulary size, so the pages' token ids are valid
            config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=128)
            model = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
            model = transformers.BertModel(config)
        model.save_pretrained(folder / name)
        data.train_tokenizer(texts, kind="wordpiece", vocab_size=60, out_path=folder / name, num_sentinels=0)


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("placeholders")
    _make_placeholders(folder)
    return folder


def _page_folder(tmp_path: pathlib.Path, placeholders: pathlib.Path) -> pathlib.Path:
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "path").symlink_to(placeholders / "path")
    return tmp_path


def _tested_pages() -> list[pathlib.Path]:
    return [p for p in PAGES if str(p.relative_to(ROOT)) not in OWN_TESTS]


@pytest.mark.parametrize("page", _tested_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_runs_or_says_why_not(page, placeholders, tmp_path, monkeypatch):
    monkeypatch.chdir(_page_folder(tmp_path, placeholders))
    namespace = {"__name__": page.stem}
    for block in _blocks(page):
        where = f"{page.relative_to(ROOT)}:{block['line']}"
        kinds = {kind for _, kind, _ in block["markers"]}
        assert len(kinds) <= 1, f"{where}: both skip and run markers"
        assert all(text for _, _, text in block["markers"]), f"{where}: a marker without its reason or command"
        if kinds == {"skip"}:
            continue
        if kinds == {"run"}:
            for _, _, command in block["markers"]:
                _run_command(command, where)
        elif block["kind"] == "python":
            # Compiled with the page's line numbers, so a failure points into the page.
            exec(compile("\n" * (block["line"] - 1) + block["code"], str(page), "exec"), namespace)
        else:
            for command in _commands(block["code"]):
                _run_command(command, where)


def test_pages_with_their_own_test_have_it():
    for page, test in OWN_TESTS.items():
        assert (ROOT / page).is_file() and (ROOT / test).is_file(), (page, test)


def test_markers_are_read():
    """A page with a skip, a run and a plain block: the parser sees all three."""
    page = pathlib.Path(__file__).parent / "testdata" / "docs_markers.md"
    blocks = _blocks(page)
    assert [b["kind"] for b in blocks] == ["shell", "python", "shell"]
    assert [[kind for _, kind, _ in b["markers"]] for b in blocks] == [["skip"], [], ["run", "run"]]
    assert _commands(blocks[2]["code"]) == ["flaxformer-lite summary --config gpt_tiny"]
