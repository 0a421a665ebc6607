"""Tokenizers: bytes with no files at all, or a HuggingFace `tokenizer.json`.

Both kinds satisfy `Tokenizer`: `encode(text) -> list[int]` adds no special tokens
unless asked, `decode(ids) -> str` drops special tokens, and the special ids the
objectives need (`pad_id`, `bos_id`, `eos_id`, `eos_ids`, `mask_id`, `sentinel_id(i)`)
are properties. A property whose token the tokenizer lacks raises `DataError` when it
is read, so a tokenizer without a mask token still serves causal LM; `pad_id` is None
instead, and objectives that only pad under zero weight pad with any id.

    tok = load_tokenizer("byte")                    # ByteTokenizer(num_sentinels=100)
    tok = load_tokenizer("runs/tok")                # a folder: tokenizer.json, and the roles its
                                                    # tokenizer_config.json / config.json give
    tok = train_tokenizer(texts, kind="bpe", vocab_size=4096, out_path="runs/tok")
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import pathlib
import threading
from typing import Iterable, Literal, Mapping, NamedTuple, Optional, Protocol, Sequence, Union

import numpy as np
import tokenizers as hf
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from flaxformer_lite.data.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]


class Tokenizer(Protocol):
    """What the corpora, objectives and pipelines need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> Optional[int]: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def eos_ids(self) -> tuple[int, ...]: ...
    @property
    def mask_id(self) -> int: ...
    @property
    def num_sentinels(self) -> int: ...
    @property
    def special_ids(self) -> frozenset[int]: ...
    @property
    def adds_bos(self) -> bool: ...
    def sentinel_id(self, i: int) -> int: ...
    def encode(self, text: str, *, bos: bool = False, eos: bool = False, special: bool = False) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    @property
    def identity(self) -> dict: ...
    def decode(self, ids: Iterable[int]) -> str: ...


def bos_or_none(tok: "Tokenizer") -> Optional[int]:
    """The bos id, or None for a tokenizer whose files name none (Qwen's): its documents start
    with their text, as transformers encodes them."""
    try:
        return tok.bos_id
    except DataError:
        return None


def leading_bos(tok: "Tokenizer") -> Optional[int]:
    """The id a training text or a text prompt starts with: bos where the tokenizer's files
    put one first (`adds_bos`, as generate and serve encode prompts), else None (SmolLM2's,
    Qwen's and GPT-2's texts start with their first token)."""
    return tok.bos_id if tok.adds_bos else None


def _with_specials(ids: list[int], tok: Tokenizer, bos: bool, eos: bool) -> list[int]:
    return ([tok.bos_id] if bos else []) + ids + ([tok.eos_id] if eos else [])


class ByteTokenizer:
    """UTF-8 bytes. Ids: pad 0, bos 1, eos 2, mask 3, byte b at 4 + b, then sentinels.

    As in T5, sentinel 0 is the last id: `sentinel_id(i) = vocab_size - 1 - i`. Every
    string is representable, so there is no unknown token.
    """

    BYTE_OFFSET = 4

    def __init__(self, num_sentinels: int = 100):
        if num_sentinels < 0:
            raise DataError(f"num_sentinels={num_sentinels} must be >= 0")
        self._num_sentinels = num_sentinels

    pad_id = 0
    bos_id = 1
    eos_id = 2
    eos_ids = (2,)
    mask_id = 3
    adds_bos = True  # a prompt starts with bos, as this library's documents do (bos + text + eos)

    @property
    def vocab_size(self) -> int:
        return self.BYTE_OFFSET + 256 + self._num_sentinels

    @property
    def num_sentinels(self) -> int:
        return self._num_sentinels

    @property
    def special_ids(self) -> frozenset[int]:
        sentinels = range(self.BYTE_OFFSET + 256, self.vocab_size)
        return frozenset(range(self.BYTE_OFFSET)) | frozenset(sentinels)

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self._num_sentinels:
            raise DataError(f"sentinel {i} out of range: this ByteTokenizer has {self._num_sentinels}")
        return self.vocab_size - 1 - i

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, special: bool = False) -> list[int]:
        """UTF-8 bytes of `text` as ids; `bos`/`eos` add those tokens at the ends.

        There is no special-token text to parse, so `special` changes nothing.
        """
        byte_ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        return _with_specials((byte_ids + self.BYTE_OFFSET).tolist(), self, bos, eos)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text as an int32 array, without specials (the fast path)."""
        encoded = [t.encode("utf-8") for t in texts]
        flat = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int32) + self.BYTE_OFFSET
        ends = list(itertools.accumulate(map(len, encoded)))
        return [flat[start:end] for start, end in zip([0] + ends, ends)]

    @property
    def identity(self) -> dict:
        """What makes two tokenizers give the same ids; a prepared corpus records it."""
        return {"kind": "byte", "num_sentinels": self._num_sentinels}

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids in `ids`; special and out-of-range ids are skipped."""
        lo, hi = self.BYTE_OFFSET, self.BYTE_OFFSET + 256
        data = bytes(int(i) - lo for i in ids if lo <= int(i) < hi)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(num_sentinels={self._num_sentinels})"


# Token strings each role goes by in common tokenizer.json files, first match wins. Used
# only for a bare tokenizer.json: a folder's tokenizer_config.json and config files say.
_ROLE_TOKENS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<s>", "[CLS]", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "[SEP]", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
}
# transformers' named special tokens, as tokenizer_config.json and special_tokens_map.json hold them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Each role's tokenizer_config.json names, first present wins (BERT's roles go by cls/sep).
_ROLE_NAMES = {"pad": ("pad_token",), "bos": ("bos_token", "cls_token"), "eos": ("eos_token", "sep_token"),
               "mask": ("mask_token",)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_ID_FILES = (GENERATION_CONFIG_FILE, "config.json")  # where *_token_id live, first says


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# generation_config.json's sampling settings this library applies, each with its rule.
SAMPLING_RULES = {
    "temperature": (lambda v: _number(v) and v >= 0, ">= 0"),
    "top_k": (lambda v: _number(v) and isinstance(v, int) and v >= 0, "an integer >= 0 (0: off)"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "> 0 (1: off)"),
}
# Settings it does not apply, with their neutral values: a caller names the others rather
# than drop them unseen.
UNAPPLIED_SAMPLING = {"min_p": 0.0, "typical_p": 1.0, "no_repeat_ngram_size": 0,
                      "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


class SamplingDefaults(NamedTuple):
    """A checkpoint's sampling settings (`sampling_defaults`): `applied` are the
    settings of SAMPLING_RULES it sets, `unapplied` the ones it sets that this library lacks."""

    applied: dict
    unapplied: dict


def sampling_defaults(folder: PathLike) -> SamplingDefaults:
    """The sampling settings a checkpoint's generation_config.json sets (temperature, top_k,
    top_p, repetition_penalty), for a request that leaves them out; empty without the file.

    As vLLM does by default (its `--generation-config auto`), only the keys the file holds
    are taken, and `do_sample` is not read: OpenAI-style requests sample unless their
    temperature is 0. A value out of range is a DataError naming the file and key.
    """
    config = read_folder_json(folder, GENERATION_CONFIG_FILE) or {}
    applied = {}
    for key, (valid, rule) in SAMPLING_RULES.items():
        value = config.get(key)
        if value is None:
            continue
        if not valid(value):
            raise DataError(
                f"{pathlib.Path(folder) / GENERATION_CONFIG_FILE}: {key}={value!r} must be {rule}; fix it there, "
                "or remove the key to sample with the usual default"
            )
        applied[key] = float(value) if key != "top_k" else value
    unapplied = {key: config[key] for key, neutral in UNAPPLIED_SAMPLING.items()
                 if config.get(key) not in (None, neutral)}
    return SamplingDefaults(applied, unapplied)


def _sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


def read_folder_json(folder: PathLike, name: str) -> Optional[dict]:
    """folder/name as a JSON object, None if the file is absent; DataError if it is not one."""
    path = pathlib.Path(folder) / name
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); restore the file from its source") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: top level must be a JSON object; restore the file from its source")
    return value


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _declared_tokens(folder: PathLike) -> Optional[dict]:
    """Named special tokens the folder's tokenizer files declare ({name: text or None}), or None
    if it has neither tokenizer_config.json nor special_tokens_map.json."""
    config = read_folder_json(folder, "tokenizer_config.json")
    mapping = read_folder_json(folder, "special_tokens_map.json")
    if config is None and mapping is None:
        return None
    declared = {}
    for source in (mapping or {}, config or {}):  # tokenizer_config.json wins where both say
        declared.update({k: _token_text(source[k]) for k in SPECIAL_TOKEN_NAMES if k in source})
    return declared


def folder_special_tokens(folder: PathLike) -> dict[str, str]:
    """{bos_token: text, ...} as transformers' `special_tokens_map` gives them for this folder."""
    return {k: v for k, v in (_declared_tokens(folder) or {}).items() if v is not None}


def _id_list(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


class HFTokenizer:
    """A `tokenizers.Tokenizer` and its special-token roles.

    Roles (bos, eos, pad, mask, and every stop id) come from the folder's files when it
    has them (`from_folder`): tokenizer_config.json / special_tokens_map.json name the
    tokens, generation_config.json and config.json give `*_token_id`s; a role none of them
    names is absent (`pad_id` None, others raise DataError when read). Only a bare
    tokenizer.json falls back to the usual token strings ("</s>", "[SEP]", ...).

    Text that spells a special token ("</s>", "<extra_id_0>") is encoded as ordinary
    text unless `encode(..., special=True)` asks otherwise (a rendered chat template), so a
    corpus that quotes one cannot inject an eos or a sentinel. (This sets the wrapped
    tokenizer's `encode_special_tokens`.)
    """

    def __init__(
        self,
        tokenizer: hf.Tokenizer,
        name: str = "<in-memory tokenizer>",
        *,
        roles: Optional[Mapping[str, Optional[int]]] = None,
        stop_ids: Sequence[int] = (),
    ):
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self._special_lock = threading.Lock()
        self.name = name
        self._roles = None if roles is None else dict(roles)
        self._stop_ids = tuple(stop_ids)

    @classmethod
    def from_file(cls, path: PathLike) -> "HFTokenizer":
        """Load a local tokenizer.json (nothing is downloaded); roles from token strings."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise DataError(
                f"{path}: no such tokenizer file; pass 'byte', a tokenizer.json or a folder "
                "holding one (make one with flaxformer_lite.data.train_tokenizer)"
            )
        try:
            tok = hf.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for parse and I/O errors
            raise DataError(f"{path}: cannot load as a HuggingFace tokenizer.json ({e})") from e
        return cls(tok, name=str(path))

    @classmethod
    def from_folder(cls, folder: PathLike) -> "HFTokenizer":
        """A folder's tokenizer.json with its roles from the folder's other files (see class)."""
        folder = pathlib.Path(folder)
        bare = cls.from_file(folder / "tokenizer.json")
        declared = _declared_tokens(folder)
        id_files = [c for c in (read_folder_json(folder, n) for n in MODEL_ID_FILES) if c is not None]
        if declared is None and not id_files:
            return bare
        tok = bare._tok

        def token_id(text: Optional[str], what: str) -> Optional[int]:
            if text is None:
                return None
            i = tok.token_to_id(text)
            if i is None:
                raise DataError(f"{folder}: {what} {text!r} is not in tokenizer.json; fix that file")
            return i

        def file_id(key: str) -> list[int]:
            # An id outside the vocabulary (GPT2Config's default 50256 on a small model) says nothing.
            usable = ([i for i in _id_list(c.get(key)) if 0 <= i < bare.vocab_size] for c in id_files)
            return next((ids for ids in usable if ids), [])

        roles = {}
        for role, names in _ROLE_NAMES.items():
            named = [n for n in names if declared is not None and n in declared]
            if named:  # the tokenizer files say (a null says "none")
                roles[role] = token_id(declared[named[0]], f"tokenizer_config.json {named[0]}")
            elif role != "mask" and file_id(f"{role}_token_id"):
                roles[role] = file_id(f"{role}_token_id")[0]
            elif declared is not None:
                roles[role] = None
        stops = [roles.get("eos")] + [i for c in id_files for i in _id_list(c.get("eos_token_id"))]
        stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None and 0 <= i < bare.vocab_size))
        return cls(tok, name=str(folder), roles=roles, stop_ids=stop_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _role_id(self, role: str) -> Optional[int]:
        if self._roles is not None and role in self._roles:
            return self._roles[role]
        for token in _ROLE_TOKENS[role]:
            i = self._tok.token_to_id(token)
            if i is not None:
                return i
        return None

    def _required(self, role: str) -> int:
        i = self._role_id(role)
        if i is None:
            where = (" (its tokenizer_config.json and config files name none)" if self._roles is not None
                     else f" (looked for {', '.join(_ROLE_TOKENS[role])})")
            raise DataError(
                f"{self.name} has no {role} token{where}; add one with tokenizer.add_special_tokens([...]) "
                "and save it, or use another tokenizer"
            )
        return i

    @functools.cached_property
    def pad_id(self) -> Optional[int]:
        """The pad token's id, None if the tokenizer has none (causal LM pads under zero weight)."""
        return self._role_id("pad")

    @functools.cached_property
    def bos_id(self) -> int:
        return self._required("bos")

    @functools.cached_property
    def eos_id(self) -> int:
        return self._required("eos")

    @functools.cached_property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a reply: eos_id first, then config.json/generation_config.json's."""
        return tuple(dict.fromkeys((self.eos_id, *self._stop_ids)))

    @functools.cached_property
    def mask_id(self) -> int:
        return self._required("mask")

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether a text prompt starts with bos. A folder's tokenizer files decide (tokenizer.json's
        post-processor: what transformers' `tokenizer(text)` puts first; Llama's and Gemma's add
        bos, GPT-2's, Qwen's and SmolLM2's do not); a bare tokenizer.json (this library's
        train_tokenizer) follows this library's documents, bos + text + eos, where it has a bos."""
        bos = bos_or_none(self)
        if bos is None or self._roles is None:
            return bos is not None
        return self._tok.encode("a", add_special_tokens=True).ids[:1] == [bos]

    @functools.cached_property
    def num_sentinels(self) -> int:
        n = 0
        while self._tok.token_to_id(_sentinel_token(n)) is not None:
            n += 1
        return n

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        added = self._tok.get_added_tokens_decoder()
        return frozenset(i for i, token in added.items() if token.special)

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise DataError(
                f"{self.name} has {self.num_sentinels} sentinel tokens <extra_id_N>, "
                f"sentinel {i} was asked for; train one with num_sentinels > {i}"
            )
        return self._tok.token_to_id(_sentinel_token(i))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, special: bool = False) -> list[int]:
        """Ids of `text` without the tokenizer's own post-processing specials.

        special: read special-token text ("<|im_end|>") as that token, as transformers does
        for a rendered chat template; otherwise it is ordinary text.
        """
        if special:
            with self._special_lock:
                self._tok.encode_special_tokens = False
                try:
                    ids = self._tok.encode(text, add_special_tokens=False).ids
                finally:
                    self._tok.encode_special_tokens = True
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        return _with_specials(ids, self, bos, eos)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text as an int32 array, without specials; runs in parallel in Rust."""
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def to_str(self) -> str:
        """The tokenizer.json text (what `tokenizers.Tokenizer.from_str` reads)."""
        return self._tok.to_str()

    @property
    def identity(self) -> dict:
        """What makes two tokenizers give the same ids: the content hash of its JSON."""
        return {"kind": "tokenizer.json", "sha256": hashlib.sha256(self.to_str().encode()).hexdigest()}

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special and out-of-range ids are skipped."""
        n = self.vocab_size
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def train_tokenizer(
    texts: Iterable[str],
    *,
    kind: Literal["bpe", "wordpiece"] = "bpe",
    vocab_size: int,
    out_path: PathLike,
    num_sentinels: int = 100,
) -> HFTokenizer:
    """Train a tokenizer with HF `tokenizers` and save it as tokenizer.json.

    bpe: byte-level BPE (GPT-2 style), so any text round-trips exactly; specials
    <pad> <s> </s> <mask> get ids 0-3. wordpiece: cased BERT WordPiece with [PAD] [CLS]
    [SEP] [MASK] [UNK] at 0-4. `vocab_size` counts everything, including the
    `num_sentinels` <extra_id_N> tokens, which take the last ids (<extra_id_0> last, as
    in T5). `out_path` is a .json file or a folder that will hold tokenizer.json.
    """
    out = pathlib.Path(out_path)
    if out.suffix != ".json":
        out = out / "tokenizer.json"
    try:  # before training, which takes long: a path that cannot be written fails now
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out.parent}: cannot create the tokenizer's folder ({e.strerror}); pass another --out") from e
    trainer_vocab = vocab_size - num_sentinels
    if kind == "bpe":
        specials = ["<pad>", "<s>", "</s>", "<mask>"]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        _check_room(kind, vocab_size, len(specials) + len(alphabet), num_sentinels)
        tok = hf.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=trainer_vocab,
            special_tokens=specials,
            initial_alphabet=alphabet,
            show_progress=False,
        )
    elif kind == "wordpiece":
        specials = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
        _check_room(kind, vocab_size, len(specials), num_sentinels)
        tok = hf.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=trainer_vocab, special_tokens=specials, show_progress=False
        )
    else:
        raise DataError(f"tokenizer kind {kind!r} is not one of 'bpe', 'wordpiece'")
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([_sentinel_token(i) for i in reversed(range(num_sentinels))])

    tok.save(str(out))
    return HFTokenizer(tok, name=str(out))


def _check_room(kind: str, vocab_size: int, base: int, num_sentinels: int) -> None:
    if vocab_size <= base + num_sentinels:
        raise DataError(
            f"vocab_size={vocab_size} leaves no room for learned tokens: {kind} needs more than "
            f"{base} base tokens + {num_sentinels} sentinels"
        )


def load_tokenizer(spec: Union[PathLike, Tokenizer]) -> Tokenizer:
    """'byte' -> ByteTokenizer(); a tokenizer.json or a folder holding one -> HFTokenizer.

    A folder's tokenizer_config.json, special_tokens_map.json, generation_config.json and
    config.json give the special-token roles (HFTokenizer.from_folder).

    A Tokenizer object is returned as it is, so callers may pass either.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if str(spec) == "byte":
        return ByteTokenizer()
    path = pathlib.Path(spec)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(
                f"{path}: folder has no tokenizer.json; pass 'byte', a tokenizer.json, or a folder "
                "holding one (make one with flaxformer_lite.data.train_tokenizer)"
            )
        return HFTokenizer.from_folder(path)
    return HFTokenizer.from_file(path)
