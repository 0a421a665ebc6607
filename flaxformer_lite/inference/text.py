"""Text bookkeeping shared by the engine (stop strings) and the reply parsers (reasoning
and tool-call tags): how much of a growing text is safe to send."""

from __future__ import annotations

from typing import Sequence


def held_back(text: str, marks: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of one of `marks` (a stop
    string, a tag): they wait until the next text decides."""
    held = 0
    for mark in marks:
        for n in range(min(len(mark) - 1, len(text)), held, -1):
            if mark.startswith(text[-n:]):
                held = n
                break
    return held
