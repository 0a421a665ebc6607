"""Chat templates: an HF folder's jinja template, rendered as transformers renders it.

    template = ChatTemplate.from_folder("path/to/hf_dir")     # None if the folder has none
    text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tokenizer.encode(text, special=True)                 # special-token text -> their ids

`render` equals transformers' `tokenizer.apply_chat_template(messages, tokenize=False)`:
the same sandbox (jinja2's ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks), the same extras (`tojson`, `raise_exception`, `strftime_now`, loop
controls) and the tokenizer's special-token strings (`bos_token`, `eos_token`, ...) in the
context. Templates come from other people's folders: the sandbox lets them format data,
not reach Python. Fine-tuning (SFT) and serving render through this one function.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

from flaxformer_lite.data.errors import DataError
from flaxformer_lite.data.tokenizers import folder_special_tokens, read_folder_json

PathLike = Union[str, "os.PathLike[str]"]

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"  # older processors' form: {"chat_template": "..."}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


# Names a message's reasoning goes by; transformers copies it to `thinking` and `reasoning_content`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(DataError):
    """A template that cannot be read or rendered, or one that rejects the messages."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template and the special-token strings its context holds.

    `special_tokens` maps transformers' names (bos_token, eos_token, unk_token, sep_token,
    pad_token, cls_token, mask_token) to token text, as the folder's tokenizer_config.json
    and special_tokens_map.json give them.
    """

    source: str
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """Content hash of the template text (what a prepared chat corpus records)."""
        return hashlib.sha256(self.source.encode()).hexdigest()

    @classmethod
    def from_folder(cls, folder: PathLike) -> Optional["ChatTemplate"]:
        """The folder's template, or None if it has none.

        Looked for as transformers does: chat_template.jinja first (then chat_template.json),
        else tokenizer_config.json's `chat_template`, a string or a list of {name, template}
        from which the one named "default" is taken.
        """
        folder = pathlib.Path(folder)
        source = _template_source(folder)
        if source is None:
            return None
        return cls(source=source, special_tokens=folder_special_tokens(folder))

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False, **extra) -> str:
        """The conversation as text, as `apply_chat_template(..., tokenize=False)` gives it.

        Args:
          messages: dicts with at least `role` and `content`; keys whose value is None are
            dropped first, as transformers does.
          add_generation_prompt: end with the header that opens the assistant's turn.
          extra: more template variables (tools, documents, date_string, ...); they override
            special tokens of the same name.
        """
        if not messages:
            raise ChatTemplateError("cannot render an empty conversation: give at least one message")
        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
            message = {k: v for k, v in message.items() if v is not None}
            reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
            if reasoning is not None:  # templates read one name or another; transformers fills both
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        context = {"tools": None, "documents": None, **self.special_tokens, **extra}
        import jinja2

        try:
            return _compiled(self.source).render(messages=chat, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.sha256[:12]}: {_one_line(e)}") from None

    def __hash__(self) -> int:
        return hash((self.source, tuple(sorted(self.special_tokens.items()))))


def tokenizer_template(tokenizer_spec: PathLike) -> Optional[ChatTemplate]:
    """The chat template of the folder a tokenizer spec (`data.tokenizer`) names, or holds
    its tokenizer.json; None for the byte tokenizer or a folder without one."""
    if str(tokenizer_spec) == "byte":
        return None
    path = pathlib.Path(tokenizer_spec)
    return ChatTemplate.from_folder(path if path.is_dir() else path.parent)


def _template_source(folder: pathlib.Path) -> Optional[str]:
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in (TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE):
        config = read_folder_json(folder, name)
        template = (config or {}).get("chat_template")
        if template is None:
            continue
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ChatTemplateError(
                    f"{folder / name}: chat_template lists templates {sorted(map(str, named))} but none "
                    "named 'default'; name the one to chat with 'default'"
                )
            template = named["default"]
        if not isinstance(template, str):
            raise ChatTemplateError(f"{folder / name}: chat_template must be a string or a list of {{name, template}}")
        return template
    return None


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    line = getattr(error, "lineno", None)
    return f"line {line}: {text}" if line else text


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    """The template compiled in transformers' sandbox (same settings, filters and globals)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat text must keep.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    class _Namespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore names, which could reach Python internals."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set namespace attribute {name!r}")

    class _Dict:
        """`dict(...)` and `dict.fromkeys(...)` without the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; it renders as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template {hashlib.sha256(source.encode()).hexdigest()[:12]} does not parse: {_one_line(e)}"
        ) from None
