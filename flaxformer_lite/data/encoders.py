"""Batch encoders for `prepare`: the fastest one that gives the tokenizer's own ids.

    encode, note = batch_encoder(tok)   # encode(texts) -> [int32 array per text]

A byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen and what `tokenizer train` makes)
is encoded with tiktoken, built here from the file's vocabulary and merges (nothing is
downloaded), on every core. tiktoken ranks a pair by the rank of the token the pair
spells, HF tokenizers by the merge's position, and tiktoken takes a whole piece that
is in the vocabulary without merging; the two agree token for token when

  - the model is plain BPE (no dropout, byte fallback, prefixes or suffixes), with no
    normalizer, a byte-level pre-tokenizer and no added tokens that are not special
    (special ones are read as text, as `HFTokenizer` does);
  - its merges make each token once, in the order of their ids or not (ids are mapped);
  - every token, merged from its bytes, gives itself (or the model ignores merges for
    a whole piece in the vocabulary, as tiktoken does); and
  - no pair that spells a token but is not its merge meets on the way: a vocabulary
    property too costly to prove, so `prepare` compares the two encoders on the text
    itself (see `preparation.prepare_source`) and redoes a source where they differ.

`tiktoken_reason` checks the first three. A tokenizer that fails one is encoded by HF
tokenizers, with the reason in `note`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from flaxformer_lite.data.tokenizers import HFTokenizer, Tokenizer

BatchEncoder = Callable[[Sequence[str]], list]
# HF ByteLevel's own pre-tokenizing pattern (use_regex=True), which is GPT-2's.
BYTE_LEVEL_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character byte-level BPE writes for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _pattern(spec: dict) -> Optional[str]:
    """The pre-tokenizing regex of a byte-level pre-tokenizer, or None if it is not one."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return BYTE_LEVEL_PATTERN
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        split, level = steps
        if ("Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert")
                and not level.get("use_regex", True) and not level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    return None


def _ranks(spec: dict) -> tuple[Optional[str], dict[bytes, int], np.ndarray]:
    """(reason tiktoken would differ or None, tiktoken's ranks, rank -> HF id)."""
    model = spec["model"]
    decode = _byte_decoder()
    added = {t["content"] for t in spec.get("added_tokens", [])}
    vocab = {t: i for t, i in model["vocab"].items() if t not in added}
    try:
        as_bytes = {t: bytes(decode[c] for c in t) for t in vocab}
    except KeyError:
        return "its vocabulary is not byte-level", {}, np.zeros(0)
    by_bytes = {b: t for t, b in as_bytes.items()}
    singles = [bytes([b]) for b in range(256)]
    if len(by_bytes) != len(vocab) or any(b not in by_bytes for b in singles):
        return "its vocabulary lacks some single bytes (or spells a token twice)", {}, np.zeros(0)
    ranks = {b: r for r, b in enumerate(singles)}
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left not in vocab or right not in vocab or left + right not in vocab:
            return f"merge {left!r} + {right!r} makes no token of its vocabulary", {}, np.zeros(0)
        token = as_bytes[left + right]
        if token in ranks:
            return f"two merges make {left + right!r}", {}, np.zeros(0)
        ranks[token] = len(ranks)
    if len(ranks) != len(vocab):
        return "some tokens of its vocabulary come from no merge", {}, np.zeros(0)
    ids = np.empty(len(ranks), np.int32)
    for token, rank in ranks.items():
        ids[rank] = vocab[by_bytes[token]]
    return None, ranks, ids


def tiktoken_reason(tok: Tokenizer) -> tuple[Optional[str], Optional[object], Optional[np.ndarray]]:
    """(None, tiktoken Encoding, rank -> id) when tiktoken gives `tok`'s ids, else (why not, None, None)."""
    if not isinstance(tok, HFTokenizer):
        return "it is not a tokenizer.json", None, None
    try:
        import tiktoken
    except ImportError:
        return "tiktoken is not installed (pip install 'flaxformer_lite[data]')", None, None
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE", None, None
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get(
            "end_of_word_suffix"):
        return "its BPE uses dropout, byte fallback or word affixes", None, None
    if spec.get("normalizer"):
        return f"it has a normalizer ({spec['normalizer'].get('type')})", None, None
    pattern = _pattern(spec)
    if pattern is None:
        return "its pre-tokenizer is not byte-level", None, None
    if any(not t.get("special") for t in spec.get("added_tokens", [])):
        return "it has added tokens that are not special", None, None
    reason, ranks, ids = _ranks(spec)
    if reason:
        return reason, None, None
    encoding = tiktoken.Encoding("flaxformer_lite", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    if not model.get("ignore_merges"):
        import tokenizers

        merging = tokenizers.Tokenizer.from_str(tok.to_str()).model
        added = {t["content"] for t in spec.get("added_tokens", [])}
        for token, i in model["vocab"].items():
            if token not in added and [t.id for t in merging.tokenize(token)] != [i]:
                return f"token {token!r}, merged from its bytes, is not itself", None, None
    return None, encoding, ids


class TiktokenEncoder:
    """tiktoken's encoding of a batch, split over threads (tiktoken releases the GIL)."""

    def __init__(self, encoding, ids: np.ndarray, threads: Optional[int] = None):
        self.encoding, self.ids = encoding, ids
        self.threads = threads or os.cpu_count() or 1
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_ordinary's lists, joined once: faster than encode_to_numpy per text here.
        ranks = [self.encoding.encode_ordinary(text) for text in texts]
        lengths = [len(r) for r in ranks]
        flat = self.ids[np.fromiter(itertools.chain.from_iterable(ranks), np.int64, sum(lengths))]
        return np.split(flat, np.cumsum(lengths)[:-1]) if texts else []

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self.pool is None or len(texts) < 2 * self.threads:
            return self._encode(texts)
        step = -(-len(texts) // self.threads)
        parts = self.pool.map(self._encode, [texts[i : i + step] for i in range(0, len(texts), step)])
        return [ids for part in parts for ids in part]


_CHECKED: dict[str, tuple] = {}  # tokenizer sha256 -> tiktoken_reason's answer, once per process


def batch_encoder(tok: Tokenizer) -> tuple[BatchEncoder, Optional[str]]:
    """(encode_batch, note): tiktoken where it gives `tok`'s ids, else `tok.encode_batch` and why."""
    if not isinstance(tok, HFTokenizer):
        return tok.encode_batch, None
    key = tok.identity["sha256"]
    if key not in _CHECKED:
        _CHECKED[key] = tiktoken_reason(tok)
    reason, encoding, ids = _CHECKED[key]
    if reason:
        return tok.encode_batch, f"{tok.name} is encoded by HF tokenizers: tiktoken would differ ({reason})"
    return TiktokenEncoder(encoding, ids), None
