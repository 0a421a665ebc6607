"""SFT and DPO data: records from JSON lines, trained-token masks, packing, cuts, bad lines."""

import json
import re

import numpy as np
import pytest

from flaxformer_lite.data import ByteTokenizer, DataError, load_corpus, make_dataset
from flaxformer_lite.data.finetune import Record, dpo_tokens, sft_tokens

TOK = ByteTokenizer()


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_prompt_completion_trains_on_the_completion_and_eos_only():
    ids, trained = sft_tokens(Record("m:1", {"prompt": "2+2=", "completion": "4!"}), TOK)
    assert ids.tolist() == [TOK.bos_id] + TOK.encode("2+2=") + TOK.encode("4!") + [TOK.eos_id]
    assert trained.tolist() == [False] * 5 + [True] * 3


def test_sft_batches_weigh_only_predictions_of_trained_tokens():
    records = [Record(f"m:{i}", {"prompt": "q" * (i % 5 + 1), "completion": "a" * (i % 3 + 1)}) for i in range(20)]
    batch = next(iter(make_dataset("sft", records, tokenizer=TOK, batch_size=4, seq_len=32, train=False)))
    a, q = TOK.encode("a")[0], TOK.encode("q")[0]
    weighted = batch["labels"][batch["weights"] > 0]
    assert set(weighted.tolist()) == {a, TOK.eos_id}  # never a prompt token, never bos
    # Every completion token and eos of every packed example is predicted exactly once.
    seg = batch["segment_ids"]
    for b in range(4):
        for k in set(seg[b][seg[b] > 0].tolist()):
            row = batch["input_ids"][b][seg[b] == k]
            expected = int((row == a).sum()) + 1
            assert batch["weights"][b][seg[b] == k].sum() == expected
            assert q in row.tolist()


def test_dpo_pairs_share_their_segment_on_both_sides():
    records = [Record(f"m:{i}", {"prompt": f"p{i}", "chosen": "yes" * (i % 3 + 1), "rejected": "n"}) for i in range(12)]
    batch = next(iter(make_dataset("dpo", records, tokenizer=TOK, batch_size=2, seq_len=40, train=False)))
    for b in range(2):
        for k in set(batch["chosen_segment_ids"][b].tolist()) - {0}:
            chosen = batch["chosen_input_ids"][b][batch["chosen_segment_ids"][b] == k]
            rejected = batch["rejected_input_ids"][b][batch["rejected_segment_ids"][b] == k]
            prompt_len = 1 + len(TOK.encode("p0"))  # bos + the prompt, same width for i < 10
            np.testing.assert_array_equal(chosen[:prompt_len], rejected[:prompt_len])
    c_ids, c_mask, r_ids, r_mask = dpo_tokens(records[0], TOK)
    assert TOK.decode(c_ids[c_mask]) == "yes" and TOK.decode(r_ids[r_mask]) == "n"


def test_long_examples_are_cut_and_counted(capsys):
    records = [Record(f"m:{i}", {"prompt": "x" * 30, "completion": "y" * (5 if i % 2 else 40)}) for i in range(6)]
    batch = next(iter(make_dataset("sft", records, tokenizer=TOK, batch_size=6, seq_len=48, train=False, pack=False)))
    err = capsys.readouterr().err  # one line, no Python warning naming a source file
    assert err == "note: sft examples: cut 3 of 6 examples longer than data.seq_len=48 tokens to their first seq_len tokens\n"
    assert (batch["segment_ids"] > 0).sum(axis=1).max() == 48


def test_records_from_jsonl_and_bad_lines_name_file_and_line(tmp_path):
    good = _write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "",
        {"prompt": "a", "completion": "b", "extra": 1},
    ])
    records = load_corpus("sft", str(good))
    assert [r.where for r in records] == [f"{good}:1", f"{good}:3"]
    assert records[1].fields == {"prompt": "a", "completion": "b"}
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "no fields"}])
    with pytest.raises(DataError, match=rf"{bad}:2: no sft fields \(has: text\); expected"):
        load_corpus("sft", str(bad))
    bad = _write(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant"}]}])
    with pytest.raises(DataError, match=rf"{bad}:1: field 'rejected' must be a string or a non-empty list"):
        load_corpus("dpo", str(bad))
    bad = _write(tmp_path / "hello.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "hello"}])
    with pytest.raises(DataError, match=rf"{bad}:2: field 'messages' must be a non-empty list of .* got str 'hello'"):
        load_corpus("sft", str(bad))


def test_messages_without_a_chat_template_are_refused_by_line():
    record = Record("chat.jsonl:7", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    with pytest.raises(DataError, match=r"chat.jsonl:7: messages need a chat template, and the tokenizer's folder has none"):
        sft_tokens(record, TOK, None)


SPECIALS = ["<|begin|>", "<|end|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'tool' %}"
    "{{ raise_exception('no tool turns') }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_folder(tmp_path, template=CHATML):
    """A tiny BPE tokenizer folder saved by transformers, with `template` (None: none)."""
    import tokenizers as hf
    import transformers

    tok = hf.Tokenizer(hf.models.BPE(unk_token=None))
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system hello, what is the answer"] * 4, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok", fast


def test_messages_train_on_each_assistant_reply_and_its_end_of_turn(tmp_path):
    from flaxformer_lite.data import load_tokenizer
    from flaxformer_lite.data.chat import ChatTemplate

    folder, fast = chat_folder(tmp_path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "the answer"}, {"role": "user", "content": "what is"},
                {"role": "assistant", "content": "hello, user"}]
    ids, trained = sft_tokens(Record("c:1", {"messages": messages}), load_tokenizer(str(folder)),
                              ChatTemplate.from_folder(folder))
    # The whole conversation is transformers' tokenization of its rendering...
    assert ids.tolist() == fast.apply_chat_template(messages, tokenize=True, return_dict=False)
    # ...and the trained tokens are exactly the replies with their end-of-turn markers.
    im_end = fast.convert_tokens_to_ids("<|im_end|>")
    runs = np.split(ids[trained], np.flatnonzero(ids[trained] == im_end)[:-1] + 2)
    assert [fast.decode(r) for r in runs] == ["the answer<|im_end|>\n", "hello, user<|im_end|>\n"]


def test_a_role_the_template_rejects_names_the_line(tmp_path):
    from flaxformer_lite.data import load_tokenizer
    from flaxformer_lite.data.chat import ChatTemplate

    folder, _ = chat_folder(tmp_path)
    record = Record("chat.jsonl:4", {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]})
    with pytest.raises(DataError, match=r"chat.jsonl:4: the chat template refuses this conversation: .*no tool turns"):
        sft_tokens(record, load_tokenizer(str(folder)), ChatTemplate.from_folder(folder))


@pytest.mark.parametrize("template", [None, CHATML], ids=["no template", "template rejects a role"])
def test_train_on_bad_chat_data_is_one_line_and_exit_2(tmp_path, capsys, template):
    from flaxformer_lite import cli

    folder, _ = chat_folder(tmp_path, template)
    chat = _write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the answer"}]},
        {"messages": [{"role": "tool", "content": "hello"}, {"role": "assistant", "content": "the answer"}]},
    ] * 3)
    argv = ["train", "--config", "gpt_tiny", "--workdir", str(tmp_path / "run"), "--set", "data.objective=sft",
            f"data.corpus={chat}", f"data.tokenizer={folder}", "data.val_fraction=0.3"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(rf"{chat}:[0-9]: " + ("messages need a chat template" if template is None else "the chat template refuses"), err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("adds_bos", [False, True])
def test_training_examples_start_as_generate_encodes_the_prompt(tmp_path, adds_bos):
    """Training follows the tokenizer files' bos rule (`adds_bos`), as generate does: a
    SmolLM2-like folder whose post-processor adds no bos trains text without it, one that
    adds bos trains bos + text; a chat template's own bos text is never doubled."""
    import argparse

    import tokenizers as hf

    from flaxformer_lite.data import load_tokenizer
    from flaxformer_lite.inference.commands import _chat_prompt, text_prompts

    words = ["a", "b", "c", "d", "user", "assistant", "system"]
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    spec = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    spec.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    spec.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if adds_bos:
        spec.post_processor = hf.processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    spec.save(str(tmp_path / "tokenizer.json"))
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|> ' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": chatml}))
    tok = load_tokenizer(tmp_path)
    assert tok.adds_bos == adds_bos
    rng = np.random.default_rng(int(adds_bos))
    text, reply = (" ".join(rng.choice(["a", "b", "c", "d"], n)) for n in (5, 3))
    prompt = text_prompts(argparse.Namespace(bos=None, prompt=[text]), tok, decoder_only=True)[0]
    assert prompt[:1] == ([1] if adds_bos else [vocab[text[0]]])
    batch = next(iter(make_dataset("causal_lm", [f"{text} {reply}"], tokenizer=tok, batch_size=1, seq_len=16, train=False)))
    assert batch["input_ids"][0][: len(prompt)].tolist() == prompt
    ids, trained = sft_tokens(Record("m:1", {"prompt": text, "completion": reply}), tok)
    assert ids[: len(prompt)].tolist() == prompt and not trained[: len(prompt)].any() and trained[len(prompt):].all()
    from flaxformer_lite.data.chat import ChatTemplate

    chat = _chat_prompt(argparse.Namespace(prompt=None, chat=[text], system=None), tok, tmp_path)
    ids, trained = sft_tokens(Record("m:2", {"messages": [{"role": "user", "content": text},
                                                         {"role": "assistant", "content": reply}]}),
                              tok, ChatTemplate.from_folder(tmp_path))
    assert ids[: len(chat)].tolist() == chat and ids[:2].tolist() == [1, vocab["user"]]  # one bos: the template's
