"""A reasoning model's thinking, split from its answer: `reasoning_content` and `content`.

    splitter = Splitter("qwen3")
    for delta in text_deltas:
        reasoning, content = splitter.feed(delta)      # either may be ""
    reasoning, content = splitter.finish()

Thinking models write their reasoning between `<think>` and `</think>` before the answer;
the server is told how (`serve --reasoning-parser`, vLLM's option of that name):
  - `qwen3`: a reply that starts with `<think>` reasons until `</think>`; any other reply
    is all answer (Qwen3 with thinking on, or off through `enable_thinking: false`);
  - `deepseek_r1`: the reply starts inside the reasoning (the template opened `<think>`
    in the prompt; a leading `<think>` is dropped too) and reasons until `</think>`
    (DeepSeek-R1 and its distills, Qwen3's thinking-only 2507 models).
The same splitter serves streamed and whole replies, so both give the same two texts.
Text that might be the start of a tag is held back until the next delta decides it.
"""

from __future__ import annotations

from flaxformer_lite.inference.text import held_back

PARSERS = ("qwen3", "deepseek_r1")
OPEN, CLOSE = "<think>", "</think>"


class Splitter:
    """Feeds a reply's text in pieces; returns (reasoning, content) text as it is decided."""

    def __init__(self, parser: str):
        if parser not in PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}: use one of {', '.join(PARSERS)}")
        # start: undecided, a reply without <think> is all answer; open: inside the
        # reasoning, a leading <think> allowed; then reasoning, then content.
        self.state = "start" if parser == "qwen3" else "open"
        self.pending = ""
        self.strip = False  # drop the blank line between </think> and the answer

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        reasoning = ""
        if self.state in ("start", "open"):
            head = self.pending.lstrip()
            if OPEN.startswith(head):
                return "", ""  # "", "<thi": not decided yet
            if head.startswith(OPEN):
                self.pending, self.state = head[len(OPEN):], "reasoning"
            else:
                self.state = "reasoning" if self.state == "open" else "content"
        if self.state == "reasoning":
            end = self.pending.find(CLOSE)
            if end < 0:
                cut = len(self.pending) - held_back(self.pending, [CLOSE])
                reasoning, self.pending = self.pending[:cut], self.pending[cut:]
                return reasoning, ""
            reasoning, self.pending = self.pending[:end], self.pending[end + len(CLOSE):]
            self.state, self.strip = "content", True
        content, self.pending = self.pending, ""
        if self.strip:
            content = content.lstrip()
            self.strip = not content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held back, as the state it was in says."""
        held, self.pending = self.pending, ""
        if self.state in ("reasoning", "open"):
            return held, ""
        return "", held.lstrip() if self.strip else held


def split(parser: str, text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole reply."""
    splitter = Splitter(parser)
    first = splitter.feed(text)
    last = splitter.finish()
    return first[0] + last[0], first[1] + last[1]
