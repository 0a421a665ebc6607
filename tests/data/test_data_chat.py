"""Chat templates: rendering equals transformers' apply_chat_template; files and errors."""

import json

import pytest
import tokenizers as hf
import transformers

from flaxformer_lite.data import HFTokenizer, load_tokenizer
from flaxformer_lite.data.chat import ChatTemplate, ChatTemplateError

SPECIALS = ["<|begin|>", "<|end|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-2 style: system folded into the first user turn, roles must alternate.
INST = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}
{% else %}
    {% set system = none %}{% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% if loop.first and system %}[INST] <<SYS>>{{ system }}<</SYS>> {{ message['content'] | trim }} [/INST]
        {% else %}[INST] {{ message['content'] | trim }} [/INST]
        {% endif %}
    {% else %}
 {{ message['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}"""
# Llama-3 style: namespace, loop controls, tojson of a message, extra variables.
HEADERS = """{%- set ns = namespace(turns=0) -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'tool' %}{% continue %}{% endif -%}
    {%- set ns.turns = ns.turns + 1 -%}
    {{- '<|im_start|>' + message['role'] + '\\n\\n' + message['content'] | trim + '<|end|>' -}}
    {%- if message.get('meta') %}{{ message['meta'] | tojson }}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant (' ~ ns.turns ~ ' turns)\\n\\n' }}{%- endif -%}"""

CONVERSATION = [
    {"role": "system", "content": "You are terse. <b>&</b>"},
    {"role": "user", "content": "  What is 2+2? "},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And héllo in French?"},
]


def _tokenizer_folder(tmp_path, template, name="tok"):
    """A tiny BPE tokenizer with special tokens, saved by transformers with `template`."""
    tok = hf.Tokenizer(hf.models.BPE(unk_token=None))
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, the quick brown fox"] * 4, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.chat_template = template
    folder = tmp_path / name
    fast.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("template", [CHATML, INST, HEADERS], ids=["chatml", "inst", "headers"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_equals_apply_chat_template(tmp_path, template, generation_prompt):
    folder = _tokenizer_folder(tmp_path, template)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = ChatTemplate.from_folder(folder)
    assert ours.source == template
    for messages in (CONVERSATION, CONVERSATION[1:3], [{**CONVERSATION[1], "meta": {"id": 3, "q": "<&>"}}]):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.render(messages, add_generation_prompt=generation_prompt) == expected
    # Rendered special-token text encodes to the special ids, as transformers tokenizes a chat.
    text = ours.render(CONVERSATION, add_generation_prompt=generation_prompt)
    tok = load_tokenizer(folder)
    encoded = tok.encode(text, special=True)
    assert encoded == theirs(text, add_special_tokens=False)["input_ids"]
    assert set(encoded) & tok.special_ids


def test_template_sources(tmp_path):
    folder = _tokenizer_folder(tmp_path, CHATML)
    assert (folder / "chat_template.jinja").is_file()  # transformers 5 writes the template there
    assert ChatTemplate.from_folder(folder).special_tokens == {
        "bos_token": "<|begin|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"
    }
    # The older form: a list of named templates in tokenizer_config.json; "default" is the one.
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": INST}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.from_folder(folder)
    assert template.source == INST
    assert template.sha256 != ChatTemplate(CHATML).sha256
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_folder(folder) is None


def test_errors_are_one_line(tmp_path):
    template = ChatTemplate(INST, {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ChatTemplateError, match=r"^chat template \w+: Conversation roles must alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}").render([{"role": "user", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        template.render([])
    # The sandbox: a template cannot reach Python internals.
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(escape).render([{"role": "user", "content": "a"}])
    assert isinstance(ChatTemplateError("x"), ValueError)


def test_special_text_is_plain_unless_asked(tmp_path):
    tok = load_tokenizer(_tokenizer_folder(tmp_path, CHATML))
    assert isinstance(tok, HFTokenizer)
    end = tok.eos_id
    assert end not in tok.encode("say <|end|>")
    assert tok.encode("say <|end|>", special=True)[-1] == end
    assert end not in tok.encode("say <|end|> again")  # the flag is restored after a special encode
