"""docs/tour.md cannot rot: its Python blocks run in order, and the files it names exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour.md"


def _python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)
    ]


def test_every_python_block_runs_in_order(tmp_path, monkeypatch):
    blocks = _python_blocks(TOUR.read_text(encoding="utf-8"))
    assert len(blocks) >= 15  # one or more per stop: a parsing slip would silently skip them
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    namespace = {"__name__": "tour"}
    for line, code in blocks:
        # Compiled with the page's line numbers, so a failure points into docs/tour.md.
        exec(compile("\n" * (line - 1) + code, str(TOUR), "exec"), namespace)


def test_every_file_and_function_the_tour_names_exists():
    text = TOUR.read_text(encoding="utf-8")
    files = set(re.findall(r"`(flaxformer_lite/[\w/]+\.py)", text))
    assert len(files) >= 8
    for f in sorted(files):
        assert (ROOT / f).is_file(), f"docs/tour.md names {f}, which does not exist"
    # "`file.py`: `name`" stops: the name is defined in that file.
    for f, name in re.findall(r"`(flaxformer_lite/[\w/]+\.py)`: `(\w+)", text):
        source = (ROOT / f).read_text(encoding="utf-8")
        assert re.search(rf"^\s*(def|class) {name}\b", source, flags=re.M), f"{name} is not defined in {f}"
