"""Fine-tuning data: SFT and DPO examples from JSON lines, tokenized with a loss mask.

    records = load_records("chat.jsonl", "sft")          # [Record(where="chat.jsonl:3", fields={...})]
    ids, mask = sft_tokens(records[0], tok, template)     # int32 ids, bool "train on this token"

An SFT line is {"messages": [{"role": ..., "content": ...}, ...]} (the loss covers the
assistant turns) or {"prompt": ..., "completion": ...} (the loss covers the completion).
A DPO line is {"prompt": ..., "chosen": ..., "rejected": ...}. Each value is a string or
a list of messages. A GRPO line is {"prompt": ..., any other fields}: the model writes the
completion, and the whole line reaches the reward function.

Plain strings are joined as bos + prompt + completion + eos (bos where the tokenizer puts
one first, `adds_bos`, as generate and serve encode a prompt), the loss on completion + eos. Message lists are rendered with the checkpoint's chat
template (`data.chat.ChatTemplate`): the trained tokens of an assistant turn are what
rendering the conversation through that turn adds to rendering the conversation before it
with the generation prompt, i.e. the reply and its end-of-turn marker. Each rendering must
be a prefix of the next, which is checked; a template that rewrites earlier turns (some
drop the reasoning of past replies) is refused by name and line. A string beside a message
list becomes one message: a user turn for a prompt, an assistant turn for a reply.

Rendered text is encoded with special-token text parsed as special tokens (it is the
template's own markup); plain strings are encoded as ordinary text.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from flaxformer_lite.data.errors import DataError
from flaxformer_lite.data.sources import JSONL_SUFFIXES, Source, files, jsonl_objects
from flaxformer_lite.data.tokenizers import Tokenizer, leading_bos

FIELDS = {"sft": (("messages",), ("prompt", "completion")), "dpo": (("prompt", "chosen", "rejected"),),
          "grpo": (("prompt",),)}
EXAMPLE_LINES = {
    "sft": '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} '
           'or {"prompt": ..., "completion": ...}',
    "dpo": '{"prompt": ..., "chosen": ..., "rejected": ...}',
    "grpo": '{"prompt": ..., "answer": ... (any fields the reward reads)}',
}


@dataclasses.dataclass(frozen=True)
class Record:
    """One JSON line's fields, and where it came from ("file:line") for error messages.

    `str(record)` is its fields as JSON: what a hash split ranks it by (`corpora.split`
    here, `prepare`'s store alike), so identical examples land on the same side wherever
    they are.
    """

    where: str
    fields: dict

    def __str__(self) -> str:
        return json.dumps(self.fields, sort_keys=True, ensure_ascii=False)


def _check_value(value: Any, where: str, field: str) -> None:
    if field == "messages" and not isinstance(value, list):  # a conversation: never a bare string
        raise DataError(f'{where}: field \'messages\' must be a non-empty list of {{"role": str, "content": str}} '
                        f"messages, got {type(value).__name__} {str(value)[:40]!r}; plain text goes in "
                        '{"prompt": ..., "completion": ...}')
    if isinstance(value, str):
        return
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise DataError(
            f"{where}: field {field!r} must be a string or a non-empty list of "
            '{"role": str, "content": str} messages'
        )


def load_records(source: Source, objective: str) -> list[Record]:
    """The SFT, DPO or GRPO records of JSON-lines files (in sorted file order, then line order)."""
    records = [r for path in record_files(source, objective) for r in file_records(path, objective)]
    if not records:
        raise DataError(f"{source}: no {objective} examples found; the corpus is empty")
    return records


def record_files(source: Source, objective: str) -> list[pathlib.Path]:
    """The JSON-lines files of an SFT, DPO or GRPO corpus, in sorted order; DataError for others."""
    if objective not in FIELDS:
        raise DataError(f"objective {objective!r} has no fine-tuning records (sft, dpo, grpo)")
    if source is None or source == "builtin":
        raise DataError(f"{objective} has no built-in corpus: set data.corpus to a .jsonl file of {EXAMPLE_LINES[objective]}")
    found = files(source, tuple(f"*{s}" for s in JSONL_SUFFIXES))
    for path in found:
        if path.suffix not in JSONL_SUFFIXES:
            raise DataError(f"{path}: {objective} reads JSON lines (.jsonl); one object a line: {EXAMPLE_LINES[objective]}")
    return found


def file_records(path: pathlib.Path, objective: str) -> Iterator[Record]:
    """The records of one JSON-lines file, streamed in line order."""
    for number, record in jsonl_objects(path):
        where = f"{path}:{number}"
        for names in FIELDS[objective]:
            if all(n in record for n in names):
                for n in names:
                    _check_value(record[n], where, n)
                # GRPO keeps the whole line: its other fields (answers, tests) reach the reward.
                yield Record(where, dict(record) if objective == "grpo" else {n: record[n] for n in names})
                break
        else:
            raise DataError(
                f"{where}: no {objective} fields (has: {', '.join(sorted(record)) or 'none'}); "
                f"expected {EXAMPLE_LINES[objective]}"
            )


# ------------------------------------------------------------------------------- tokenizing


def optional_id(tok: Tokenizer, role: str) -> Optional[int]:
    """The tokenizer's `role` id ("bos", "eos"), or None where it has none (Qwen has no bos)."""
    try:
        return getattr(tok, f"{role}_id")
    except DataError:
        return None


def _plain(tok: Tokenizer, prompt: str, reply: str) -> tuple[np.ndarray, np.ndarray]:
    bos = leading_bos(tok)
    head = ([bos] if bos is not None else []) + tok.encode(prompt)
    eos = optional_id(tok, "eos")
    if eos is None:
        raise DataError(f"{tok!r} has no eos token to end a completion with; use a tokenizer with one")
    tail = tok.encode(reply) + [eos]
    ids = np.asarray(head + tail, np.int32)
    return ids, np.arange(len(ids)) >= len(head)


def _messages(value: Any, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _rendered_pieces(messages: list[dict], trained: Sequence[bool], template, where: str) -> list[tuple[str, bool]]:
    """The rendering of `messages` cut into (text, trained) pieces; the trained messages'
    pieces are what rendering through them adds to the generation prompt before them."""
    from flaxformer_lite.data.chat import ChatTemplateError

    def render(msgs, prompt=False):
        try:
            return template.render(msgs, add_generation_prompt=prompt)
        except ChatTemplateError as e:
            raise DataError(f"{where}: the chat template refuses this conversation: {e}") from None

    pieces, done = [], ""
    for i, train in enumerate(trained):
        if not train:
            continue
        before, through = render(messages[:i], prompt=True) if i else "", render(messages[: i + 1])
        for shorter, longer in ((done, before), (before, through)):
            if not longer.startswith(shorter):
                raise DataError(
                    f"{where}: the chat template renders message {i} so that an earlier rendering is not "
                    "a prefix of the later one, so the assistant's tokens cannot be told apart; "
                    "use prompt/completion strings for this data"
                )
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    full = render(messages)
    if not full.startswith(done):
        raise DataError(f"{where}: the full rendering does not start with the rendering of its assistant turns")
    return [p for p in pieces + [(full[len(done):], False)] if p[0]]


def _templated(tok: Tokenizer, template, messages: list[dict], trained: list[bool], where: str):
    if template is None:
        raise DataError(
            f"{where}: messages need a chat template, and the tokenizer's folder has none "
            "(tokenizer_config.json chat_template or chat_template.jinja); use prompt/completion strings"
        )
    if not any(trained):
        raise DataError(f"{where}: no assistant message to train on")
    ids, mask = [], []
    for text, train in _rendered_pieces(messages, trained, template, where):
        piece = tok.encode(text, special=True)
        ids += piece
        mask += [train] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def _prompt_reply(record: Record, reply_field: str, tok: Tokenizer, template) -> tuple[np.ndarray, np.ndarray]:
    prompt, reply = record.fields["prompt"], record.fields[reply_field]
    if isinstance(prompt, str) and isinstance(reply, str):
        return _plain(tok, prompt, reply)
    head, tail = _messages(prompt, "user"), _messages(reply, "assistant")
    trained = [False] * len(head) + [m["role"] == "assistant" for m in tail]
    return _templated(tok, template, head + tail, trained, record.where)


def sft_tokens(record: Record, tok: Tokenizer, template=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], trained bool [n]) of one SFT record; `template`: a ChatTemplate or None."""
    if "messages" in record.fields:
        messages = record.fields["messages"]
        trained = [m["role"] == "assistant" for m in messages]
        return _templated(tok, template, messages, trained, record.where)
    return _prompt_reply(record, "completion", tok, template)


def dpo_tokens(record: Record, tok: Tokenizer, template=None) -> tuple[np.ndarray, ...]:
    """(chosen ids, chosen trained, rejected ids, rejected trained) of one DPO record."""
    return (*_prompt_reply(record, "chosen", tok, template), *_prompt_reply(record, "rejected", tok, template))


def grpo_prompt_tokens(record: Record, tok: Tokenizer, template=None) -> np.ndarray:
    """The int32 ids a GRPO record's completion continues: bos + prompt for a string, the
    chat template's rendering with the generation prompt for a message list."""
    prompt = record.fields["prompt"]
    if isinstance(prompt, str):
        bos = leading_bos(tok)
        return np.asarray(([bos] if bos is not None else []) + tok.encode(prompt), np.int32)
    if template is None:
        raise DataError(
            f"{record.where}: messages need a chat template, and the tokenizer's folder has none "
            "(tokenizer_config.json chat_template or chat_template.jinja); use a prompt string"
        )
    from flaxformer_lite.data.chat import ChatTemplateError

    try:
        text = template.render(prompt, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise DataError(f"{record.where}: the chat template refuses this conversation: {e}") from None
    return np.asarray(tok.encode(text, special=True), np.int32)
