"""Text bookkeeping shared by the engine (stop strings) and the reply parsers (reasoning
and tool-call tags): how much of a growing text is safe to send, and where it stops."""

from __future__ import annotations

import bisect
from typing import Callable, Iterable, Sequence


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


class StopMatcher:
    """Stop strings found in a growing text at a cost per new character that does not
    grow with the number of strings (a request may send thousands).

    The matcher keeps `held`: the longest end of the text read so far that begins some
    stop string (what `held_back` computes, here kept up to date). A new character
    extends it; then characters are dropped from its front until it begins a stop string
    again, each test one binary search in the sorted strings. A character adds one to its
    length and every drop takes one away, so there are at most two tests per character
    on average: the failure links of Aho-Corasick's automaton, found by search when
    needed instead of built for every string in advance (building them would cost the
    whole list's size in Python objects). Which stop string ends at a `held` is computed
    once per distinct `held` and remembered.
    """

    def __init__(self, stops: Iterable[str]):
        self._sorted = sorted(set(stops))
        if not self._sorted or not all(self._sorted):
            raise ValueError("stop strings must be non-empty, and at least one is needed")
        self._set = frozenset(self._sorted)
        self._lengths = sorted({len(s) for s in self._sorted})
        self._ends: dict[str, int] = {}  # held -> length of the longest stop string it ends with (0: none)
        self._read, self._held = "", ""  # the final text read so far; its held end

    def _begins_one(self, s: str) -> bool:
        i = bisect.bisect_left(self._sorted, s)
        return i < len(self._sorted) and self._sorted[i].startswith(s)

    def _ending(self, held: str) -> int:
        n = self._ends.get(held)
        if n is None:
            fits = self._lengths[: bisect.bisect_right(self._lengths, len(held))]
            n = next((k for k in reversed(fits) if held[-k:] in self._set), 0)
            self._ends[held] = n
        return n

    def find(self, text: str, final: int) -> tuple[int, int]:
        """(cut, held) for `text`, the whole text so far, of which the first `final`
        characters will not change (a character split between tokens may still).

        cut: the start of the earliest stop string that ends in what is new since the
        last call, -1 if none; held: how many trailing characters may begin one.
        """
        if not text.startswith(self._read):  # earlier text changed: read it all again
            self._read, self._held = "", ""
        held, cut = self._held, -1
        for i in range(len(self._read), len(text)):
            held += text[i]
            while held and not self._begins_one(held):
                held = held[1:]
            n = self._ending(held) if held else 0
            if n and (cut < 0 or i + 1 - n < cut):
                cut = i + 1 - n
            if i + 1 == final:
                self._read, self._held = text[:final], held
        return cut, len(held)


class Detokenizer:
    """The text of a growing list of tokens, decoding a few recent tokens per new one (the
    whole list each time would cost O(n^2) over a reply).

    Text is decoded from `prefix`, the start of the tokens read last time: the text of
    tokens[prefix:] minus that of tokens[prefix:read] is what is new, so a tokenizer that
    drops the leading space of the first token it decodes (SentencePiece) still gives
    the space between two tokens. New text that ends in U+FFFD (a character split
    between tokens) is pending: the next tokens may complete it, so it is re-read with
    them; the text before it is final.
    """

    def __init__(self):
        self.text = ""  # the final text of tokens[:read]
        self._prefix = self._read = 0

    def add(self, tokens: Sequence[int], decode: Callable[[Sequence[int]], str]) -> tuple[str, int]:
        """(the text of all `tokens`, how many of its characters are final), after tokens
        were appended to the list given last time."""
        before = decode(tokens[self._prefix:self._read]) if self._read > self._prefix else ""
        new = decode(tokens[self._prefix:])[len(before):]
        if new.endswith("\ufffd"):
            return self.text + new, len(self.text) + len(new.rstrip("\ufffd"))
        self.text += new
        self._prefix, self._read = self._read, len(tokens)
        return self.text, len(self.text)
