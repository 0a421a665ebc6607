"""Constrained decoding: grammars (JSON schemas, tool calls) and each step's token masks.

    grammars = Grammars(tokenizer, vocab_size=V, eos_ids=(2,))
    grammar = grammars.json_schema(schema, field="response_format.json_schema.schema")  # GrammarError if bad
    matcher = grammar.start()                        # one per sequence
    grammars.fill([(matcher, row)], allowed_BW)      # bit t of row `row`: token t may come next
    matcher.consume_token(token)                     # after the token is chosen; is_stopped(): complete

The work is llguidance's (a Rust Earley parser over a trie of the vocabulary, about 50 us
of one core per mask for a 128k vocabulary): it computes, on the host, which tokens keep
the text inside the grammar, into a packed bitmask of `ceil(V / 32)` int32 words per row,
which the engine's step applies to the logits. End-of-text ids are allowed exactly where
the grammar may end. llguidance is imported on first use: it is the `serve` extra's, and
nothing else needs it.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any, Sequence

import numpy as np

from flaxformer_lite.errors import UserError

WORD_BITS = 32
# Compact JSON: no whitespace between tokens, so a model cannot pad a reply with blanks.
_JSON_OPTIONS = {"whitespace_flexible": False}
CACHED = 64  # grammars kept, the most recently used: a client repeats its schema, and building one takes ms
TOOL_PARSERS = ("hermes", "llama3_json")  # serve.tools.PARSERS, the formats a call grammar writes


class GrammarError(UserError):
    """A schema or tool list that cannot become a grammar; `field` names the request's field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"'{field}' {message}")
        self.field = field


def mask_words(vocab_size: int) -> int:
    """int32 words of one packed mask row over `vocab_size` tokens."""
    return -(-vocab_size // WORD_BITS)


def unpack(allowed_BW: np.ndarray, vocab_size: int) -> np.ndarray:
    """The packed rows [B, W] as booleans [B, V] (host side; the step unpacks its own)."""
    bits = np.unpackbits(np.ascontiguousarray(allowed_BW).view(np.uint8), axis=-1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)


class Grammar:
    """A checked grammar; `start()` gives a fresh matcher for one sequence (a copy: cheap)."""

    def __init__(self, matcher):
        self._matcher = matcher

    def start(self):
        """A new llguidance LLMatcher at the grammar's start."""
        return self._matcher.deep_copy()


class _ByteVocabulary:
    """data.ByteTokenizer as llguidance's TokenizerWrapper reads a tokenizer: each id's bytes."""

    def __init__(self, tokenizer):
        names = {tokenizer.pad_id: b"<pad>", tokenizer.bos_id: b"<s>", tokenizer.eos_id: b"</s>",
                 tokenizer.mask_id: b"<mask>"}
        offset = tokenizer.BYTE_OFFSET
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.tokens = [names.get(i) or (bytes([i - offset]) if offset <= i < offset + 256 else b"<extra_id_%d>" % i)
                       for i in range(tokenizer.vocab_size)]
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"))


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError as e:
        raise GrammarError("response_format", "needs constrained decoding, which needs llguidance: "
                           "pip install 'flaxformer_lite[serve]'") from e
    return llguidance


class Grammars:
    """Grammars over one model's vocabulary: built from its tokenizer (a tokenizer.json, or
    the byte tokenizer) on first use, with `eos_ids` ending a complete reply."""

    def __init__(self, tokenizer, *, vocab_size: int, eos_ids: Sequence[int]):
        self.vocab_size, self.eos_ids = vocab_size, tuple(eos_ids)
        self._source = tokenizer
        self._tokenizer = None
        self._executor = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()  # grammar text -> Grammar

    def _vocabulary(self):
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                source = self._source
                spec = source.to_str() if hasattr(source, "to_str") else llg.TokenizerWrapper(_ByteVocabulary(source))
                self._tokenizer = llg.LLTokenizer(spec, n_vocab=self.vocab_size, eos_token=list(self.eos_ids) or None)
                self._executor = llg.LLExecutor(1)
            return self._tokenizer

    def compile(self, grammar: str, field: str) -> Grammar:
        """A Grammar from llguidance's grammar text (the last CACHED kept); GrammarError
        naming `field` and the reason."""
        with self._lock:
            known = self._cache.get(grammar)
            if known is not None:
                self._cache.move_to_end(grammar)
                return known
        matcher = _llguidance().LLMatcher(self._vocabulary(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(field, f"cannot be followed: {matcher.get_error()}")
        with self._lock:
            self._cache[grammar] = built = Grammar(matcher)
            if len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        return built

    def json_schema(self, schema: Any, field: str) -> Grammar:
        """The grammar of compact JSON text valid under `schema` (a JSON Schema object)."""
        if not isinstance(schema, dict):
            raise GrammarError(field, f"must be a JSON Schema object, got {type(schema).__name__}")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(field, f"is not a usable JSON Schema: {e}") from None
        return self.compile(grammar, field)

    def tool_calls(self, parser: str, tools: list[dict], *, parallel: bool, field: str = "tools") -> Grammar:
        """The grammar of a reply that is only calls to `tools` (OpenAI's function tools),
        written as `parser` (TOOL_PARSERS) writes them, each call's arguments valid under
        its function's `parameters`; one call, or one or more when `parallel`."""
        key = {"hermes": "arguments", "llama3_json": "parameters"}.get(parser)
        if key is None:
            raise GrammarError(field, f"cannot be forced for tool-call parser {parser!r}: use one of "
                               f"{', '.join(TOOL_PARSERS)}")
        calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                    key: t["function"].get("parameters") or {"type": "object"}},
                  "required": ["name", key], "additionalProperties": False} for t in tools]
        schema = json.dumps({**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": _JSON_OPTIONS})
        if parser == "hermes":  # <tool_call>\n{...}\n</tool_call>, the blocks a line apart
            rules = f'call: "<tool_call>\\n" %json {schema} "\\n</tool_call>"'
            separator = '"\\n"'
        else:  # llama3_json: the objects joined by ";"
            rules = f"call: %json {schema}"
            separator = '";"'
        start = f"start: call ({separator} call)*" if parallel else "start: call"
        return self.compile(f"{start}\n{rules}\n", field)

    def fill(self, rows: list, allowed_BW: np.ndarray) -> None:
        """Write each (matcher, row)'s next-token mask into row `row` of `allowed_BW` (int32 [B, W])."""
        if rows:
            self._vocabulary()
            _llguidance().numpy.fill_next_token_bitmask_par(self._executor, rows, allowed_BW)

