"""The engine in-process: greedy tokens equal ffl.generate's across prefill chunks, a
request whose logits are not finite or whose handling raises fails alone, any sampling
settings run or are refused by name (a hypothesis fuzz), stop-string bookkeeping."""

import dataclasses
import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxformer_lite.inference.decode import generate
from flaxformer_lite.inference.engine import Engine, EngineError, SamplingParams
from flaxformer_lite.inference.text import Detokenizer, StopMatcher, held_back
from flaxformer_lite.interop import hf
from flaxformer_lite.models import build_model

NEW = 12


@pytest.fixture(scope="module")
def engine(hf_dir):
    cfg, params = hf.load(hf_dir)
    engine = Engine(build_model(cfg), params, hf.load_tokenizer(hf_dir), max_batch=2, max_len=64, chunk=16)
    engine.start()
    yield engine
    engine.stop()


def _run(engine, prompts, settings=None, adapters=None):
    """Each prompt's (new token ids, done event), all submitted at once; `settings`, one
    dict of SamplingParams fields per prompt, adds to greedy decoding; `adapters` names
    each prompt's adapter (None: the base)."""
    events = queue.SimpleQueue()
    for i, p in enumerate(prompts):
        extra = settings[i] if settings else {}
        engine.submit(p, SamplingParams(**{"max_tokens": NEW, "temperature": 0, "ignore_eos": True, "logprobs": 0,
                                           **extra}),
                      lambda e, i=i: events.put((i, e)), adapter=adapters[i] if adapters else None)
    tokens, done = [[] for _ in prompts], [None] * len(prompts)
    while any(d is None for d in done):
        i, e = events.get(timeout=120)
        if e["type"] == "token":
            tokens[i] += [t.id for t in e["tokens"]]
        else:
            done[i] = e
    return tokens, done


def test_greedy_tokens_equal_generate_across_prefill_chunks(engine):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 320, n).tolist() for n in (5, 37)]  # one chunk; three chunks of 16
    tokens, done = _run(engine, prompts)
    out = generate(engine.model, engine.params, prompts, max_new_tokens=NEW, ignore_eos=True)
    assert tokens == np.asarray(out.tokens).tolist()
    assert [d["completion_tokens"] for d in done] == [NEW, NEW]


def _greedy_reference(engine, prompt, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                      logit_bias=()):
    """Greedy tokens with the logit bias and penalties, in NumPy over the model's uncached logits."""
    V, width = engine.vocab_size, len(prompt) + NEW
    ids, out = list(prompt), []
    forward = jax.jit(lambda ids: engine.model.apply(engine.params, ids).logits)
    for _ in range(NEW):
        # Right-padded to one width (one compilation): causal, so the padding changes nothing before it.
        logits = np.asarray(forward(jnp.asarray([ids + [0] * (width - len(ids))]))[0, len(ids) - 1], np.float64)
        for token, bias in logit_bias:
            logits[token] += bias
        counts = np.bincount(out, minlength=V)
        seen = (np.bincount(prompt, minlength=V) > 0) | (counts > 0)
        logits = np.where(seen, np.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty), logits)
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0)
        out.append(int(np.argmax(logits)))
        ids.append(out[-1])
    return out


def test_penalties_act_per_slot_on_prompt_and_output(engine):
    """Two requests in one batch, each with its own penalties, get the tokens a NumPy
    greedy loop with those penalties gives; the repetition penalty's equal
    ffl.generate's; a slot used again starts its counts afresh."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 320, 6).tolist(), rng.integers(4, 320, 21).tolist()]  # 21: two chunks
    settings = [{"repetition_penalty": 1.3, "frequency_penalty": 1.5}, {"presence_penalty": 2.0}]
    plain, _ = _run(engine, prompts)
    tokens, _ = _run(engine, prompts, settings)
    assert tokens == [_greedy_reference(engine, p, **kw) for p, kw in zip(prompts, settings)]
    assert tokens != plain
    again, _ = _run(engine, prompts[::-1], settings[::-1])  # each in the other's slot
    assert again == tokens[::-1]
    (repeated,), _ = _run(engine, prompts[:1], [{"repetition_penalty": 1.8}])
    out = generate(engine.model, engine.params, prompts[:1], max_new_tokens=NEW, ignore_eos=True,
                   repetition_penalty=1.8)
    assert repeated == np.asarray(out.tokens)[0].tolist()


def test_logit_bias_acts_per_slot_and_leaves_with_its_request(engine):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(4, 320, 9).tolist(), rng.integers(4, 320, 18).tolist()]
    plain, _ = _run(engine, prompts)
    forced = int(rng.integers(4, 320))
    settings = [{"logit_bias": ((forced, 100.0),)},  # this token, every time
                {"logit_bias": ((plain[1][0], -100.0), (plain[1][1], 5.0)), "repetition_penalty": 1.2}]
    (always, steered), _ = _run(engine, prompts, settings)
    assert always == [forced] * NEW
    assert steered == _greedy_reference(engine, prompts[1], **settings[1]) and steered[0] != plain[1][0]
    again, _ = _run(engine, prompts)  # the slots' biases went with their requests
    assert again == plain


def test_non_finite_logits_fail_only_their_request(engine):
    rng = np.random.default_rng(1)
    good = rng.integers(4, 320, 20).tolist()
    (solo,), _ = _run(engine, [good])
    poison = next(i for i in range(4, 320) if i not in good and i not in solo)
    clean = engine.params
    table = clean["params"]["token_embed"]["embedding"]
    engine.set_params({"params": {**clean["params"], "token_embed": {"embedding": table.at[poison].set(jnp.nan)}}})
    try:
        tokens, done = _run(engine, [[poison, *good[:5]], good])
    finally:
        engine.set_params(clean)
    assert done[0]["finish_reason"] == "error" and "not finite" in done[0]["error"]
    assert tokens[1] == solo and done[1]["finish_reason"] == "length"


class _FailingDecode:
    """The engine's tokenizer, whose decode raises on token ids holding `marker`."""

    def __init__(self, tokenizer, marker):
        self._tokenizer, self._marker = tokenizer, marker

    def decode(self, ids):
        if self._marker in ids:
            raise ValueError("cannot decode this token")
        return self._tokenizer.decode(ids)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_a_request_whose_handling_raises_fails_alone(engine):
    """One request's text cannot be decoded, another's sink raises: each ends alone
    (the first with an "error" event naming the exception), the third request in the
    batch gets its solo tokens, and the engine goes on."""
    rng = np.random.default_rng(5)
    good = rng.integers(4, 320, 11).tolist()
    (solo,), _ = _run(engine, [good])
    marker = next(i for i in range(4, 320) if i not in solo and i not in good)

    def broken_sink(event):
        raise RuntimeError("the client's code broke")

    engine.submit(good, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True), broken_sink)
    tokenizer, engine.tokenizer = engine.tokenizer, _FailingDecode(engine.tokenizer, marker)
    try:
        tokens, done = _run(engine, [good[:4], good], [{"logit_bias": ((marker, 100.0),)}, {}])
    finally:
        engine.tokenizer = tokenizer
    assert done[0]["finish_reason"] == "error" and "ValueError: cannot decode this token" in done[0]["error"]
    assert tokens[1] == solo and done[1]["finish_reason"] == "length"
    assert engine.failure is None and engine.busy() == 0


def test_top_k_past_the_vocabulary_is_off_and_bad_numbers_are_refused(engine):
    """top_k 2**32 (once an OverflowError in the engine thread) samples as top_k 0 does;
    NaN and infinite settings are refused by name."""
    prompt = [7, 8, 9, 10]
    runs = [_run(engine, [prompt], [{"temperature": 0.9, "seed": 11, "top_k": k}])[0] for k in (0, 2**32)]
    assert runs[0] == runs[1]
    for field, value in [("temperature", float("nan")), ("top_p", float("nan")), ("temperature", float("inf")),
                         ("repetition_penalty", 1e-60), ("seed", 1.5), ("choice", 2**40)]:
        with pytest.raises(EngineError, match=field):
            engine.submit(prompt, SamplingParams(**{field: value}), lambda e: None)


# Settings the engine should take, and wild values for any one field (huge integers,
# NaN, infinities, wrong types): most examples run, the rest must be refused by name.
_VALID = st.builds(
    SamplingParams,
    max_tokens=st.integers(0, 4), temperature=st.floats(0, 3), top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.one_of(st.integers(0, 400), st.integers(0, 2**70)), repetition_penalty=st.floats(0.05, 3),
    presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
    logit_bias=st.lists(st.tuples(st.integers(0, 319), st.floats(-100, 100)), max_size=3).map(tuple),
    seed=st.integers(-2**70, 2**70), choice=st.integers(0, 2**31 - 1),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=4).map(tuple),
    stop_token_ids=st.lists(st.integers(-2**70, 2**70), max_size=3).map(tuple),
    ignore_eos=st.booleans(), logprobs=st.one_of(st.none(), st.integers(0, 5)), echo_logprobs=st.booleans(),
)
_WILD_NUMBER = st.one_of(st.floats(), st.integers(-2**70, 2**70), st.none(), st.text(max_size=2), st.booleans())
_WILD = {field.name: _WILD_NUMBER for field in dataclasses.fields(SamplingParams)}
_WILD.update(
    logit_bias=st.lists(st.tuples(st.integers(-2**40, 2**40), _WILD_NUMBER), max_size=3).map(tuple),
    stop=st.one_of(st.text(max_size=2), st.lists(st.one_of(st.text(max_size=2), _WILD_NUMBER), max_size=3)),
    stop_token_ids=st.lists(_WILD_NUMBER, max_size=3).map(tuple),
)
_SAMPLING = st.one_of(_VALID, st.tuples(_VALID, st.sampled_from(sorted(_WILD))).flatmap(
    lambda pf: _WILD[pf[1]].map(lambda value: dataclasses.replace(pf[0], **{pf[1]: value}))))
_PROMPTS = st.one_of(st.lists(st.integers(0, 319), min_size=1, max_size=40),
                     st.lists(st.one_of(st.integers(-2, 330), _WILD_NUMBER), max_size=40))


def test_fuzzed_sampling_settings_run_or_are_refused_and_the_engine_survives(engine):
    """Every SamplingParams the engine accepts runs to a stop or length end within its
    max_tokens, with token ids in the vocabulary; everything else is refused with
    EngineError by check and by submit; afterwards the engine gives the same greedy
    tokens as before."""
    reference = [3, 4, 5, 6, 7]
    before, _ = _run(engine, [reference])

    @settings(max_examples=60, deadline=None, database=None)
    @given(params=_SAMPLING, prompt=_PROMPTS)
    def one(params, prompt):
        try:
            engine.check(prompt, params)
        except EngineError:
            with pytest.raises(EngineError):
                engine.submit(prompt, params, lambda e: None)
            return
        events = queue.SimpleQueue()
        engine.submit(prompt, params, events.put)
        tokens = []
        while (event := events.get(timeout=120))["type"] != "done":
            tokens += [t.id for t in event["tokens"]]
        assert event["finish_reason"] in ("stop", "length"), event
        assert event["completion_tokens"] <= params.max_tokens and all(0 <= t < engine.vocab_size for t in tokens)

    one()
    after, _ = _run(engine, [reference])
    assert after == before and engine.failure is None and engine.busy() == 0


def test_a_long_prompt_is_prefilled_between_the_running_streams_steps(engine):
    """With a prefill budget of one chunk, a 50-token prompt takes 4 chunks of 16, one per
    engine iteration, each followed by a decode step: the running stream gets a token
    after each, not one wait for all."""
    engine.prefill_budget = 16
    try:
        _long_prompt_between_steps(engine)
    finally:
        engine.prefill_budget = 64


def _long_prompt_between_steps(engine):
    events = queue.SimpleQueue()
    engine.submit([5, 6, 7], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, logprobs=0),
                  lambda e: events.put(("running", e)))
    assert events.get(timeout=120)[1]["type"] == "token"
    engine.submit(list(range(10, 60)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=0),
                  lambda e: events.put(("long", e)))
    tokens_before = 0
    while True:
        who, e = events.get(timeout=120)
        if who == "long":
            break
        tokens_before += len(e.get("tokens", []))
    assert tokens_before >= 3
    done = 0
    while done < 2:
        done += events.get(timeout=120)[1]["type"] == "done"


def _first_stop(text, stops, start):
    """The plain reference: the earliest stop string ending at or after `start`; -1: none."""
    found = [i for s in stops for i in [text.find(s, max(0, start - len(s) + 1))] if i >= 0]
    return min(found, default=-1)


def test_stop_strings_and_held_back_text():
    assert StopMatcher(["lo w", "xyz"]).find("hello world", 11) == (3, 0)
    assert held_back("the end", ["ending", "d."]) == 3  # "end" may start "ending"
    assert held_back("the end", ["xyz"]) == 0
    matcher = StopMatcher(["hello"])
    assert matcher.find("hello", 5)[0] == 0 and matcher.find("hello world", 11) == (-1, 0)  # ended before the new text
    split = StopMatcher(["\u00e9t\u00e9"])  # a character split between tokens is read again once whole
    assert split.find("\u00e9t\ufffd", 2) == (-1, 0) and split.find("\u00e9t\u00e9", 3) == (0, 3)


def test_stop_matcher_equals_find_over_random_texts_and_pieces():
    """Fed a text in random pieces, the matcher cuts where str.find over every stop string
    does, and holds back what held_back does: over small alphabets, where stop strings
    overlap, nest and repeat."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        stops = ["".join(rng.choice(list("abc"), rng.integers(1, 5))) for _ in range(rng.integers(1, 6))]
        text = "".join(rng.choice(list("abcd"), rng.integers(1, 30)))
        matcher, read, expected = StopMatcher(stops), 0, (-1, held_back(text, stops))
        while read < len(text):
            end = min(len(text), read + int(rng.integers(1, 4)))
            cut = _first_stop(text[:end], stops, read)
            got = matcher.find(text[:end], end)
            if cut >= 0:
                assert got[0] == cut, (stops, text, end)
                break
            assert got == (-1, held_back(text[:end], stops)), (stops, text, end)
            read = end
        else:
            assert got == expected


def test_detokenizer_equals_decoding_every_token_so_far(hf_dir):
    """Token by token, the incremental text is the whole list's decoding, and only a
    trailing U+FFFD (a character split between tokens) is not final: over random ids and
    over accented and emoji text, whose characters the byte-level BPE splits."""
    tokenizer = hf.load_tokenizer(hf_dir)
    rng = np.random.default_rng(3)
    texts = ["caf\u00e9 na\u00efve \u00e9t\u00e9 \U0001f600\U0001f680 \u4e2d\u6587 fin", "d\u00e9j\u00e0 vu \u2192 \u00bd"]
    lists = [tokenizer.encode(t) for t in texts] + [rng.integers(0, tokenizer.vocab_size, 60).tolist() for _ in range(4)]
    split = 0
    for tokens in lists:
        detokenizer = Detokenizer()
        for i in range(1, len(tokens) + 1):
            whole = tokenizer.decode(tokens[:i])
            assert detokenizer.add(tokens[:i], tokenizer.decode) == (whole, len(whole.rstrip("\ufffd")))
            split += whole.endswith("\ufffd")
    assert split  # some character was split between tokens


def test_sources_set_name_bos_and_chat_template(tmp_path, hf_dir):
    """--workdir runs train on bos + text: their text prompts get BOS; --hf folders do not,
    and bring their chat template."""
    import argparse
    import dataclasses

    from serve_helpers import tiny_model

    from flaxformer_lite.config import load_config
    from flaxformer_lite.runtime import checkpoint
    from flaxformer_lite.serve.commands import _load, add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    model_cfg, params = tiny_model()
    run = tmp_path / "run"
    checkpoint.save_params(run, dataclasses.replace(load_config("llama_tiny"), model=model_cfg), params)
    served, engine = _load(parser.parse_args(["--workdir", str(run), "--max-len", "64"]))
    assert (served.name, served.add_bos, served.chat_template, engine.max_len) == ("run", True, None, 64)
    served, engine = _load(parser.parse_args(["--hf", str(hf_dir), "--max-len", "64"]))
    assert not served.add_bos and served.chat_template is not None and served.engine is engine


def test_hf_and_a_run_made_from_it_give_the_same_prompt_ids(tmp_path, hf_dir):
    """The tokenizer files decide BOS, not the loader: `--hf DIR` and `--workdir` of a run
    converted from DIR give serve and generate the same prompt ids, starting with BOS where
    DIR's tokenizer.json post-processor adds it (as Llama's does) and not where it does not."""
    import argparse
    import json
    import shutil

    from flaxformer_lite.cli import main
    from flaxformer_lite.inference.commands import add_generate_arguments, load_model, text_prompts
    from flaxformer_lite.serve.app import _prompts
    from flaxformer_lite.serve.commands import _load, add_serve_arguments

    serve_parser, generate_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_serve_arguments(serve_parser)
    add_generate_arguments(generate_parser)
    rng = np.random.default_rng(3)
    text = " ".join(rng.choice("the cat sat on a warm mat while it rained".split(), 6))
    for adds_bos in (False, True):
        folder, run = tmp_path / f"hf{adds_bos}", tmp_path / f"run{adds_bos}"
        shutil.copytree(hf_dir, folder)
        if adds_bos:
            spec = json.loads((folder / "tokenizer.json").read_text())
            bos = spec["model"]["vocab"]["<s>"]
            spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}}}
            (folder / "tokenizer.json").write_text(json.dumps(spec))
        assert main(["convert", "--from-hf", str(folder), "--to", str(run)]) == 0
        got = []
        for source in (["--hf", str(folder)], ["--workdir", str(run)]):
            served, _ = _load(serve_parser.parse_args([*source, "--max-len", "64"]))
            args = generate_parser.parse_args([*source, "--prompt", text])
            tokenizer = load_model(args)[2]
            got.append((_prompts(served, text)[0], text_prompts(args, tokenizer, decoder_only=True)[0]))
        assert got[0] == got[1] and got[0][0] == got[0][1], (adds_bos, got)
        plain = served.tokenizer.encode(text)
        assert got[0][0] == ([served.tokenizer.bos_id] if adds_bos else []) + plain


def test_a_request_that_leaves_sampling_out_gets_the_checkpoints(hf_dir, tmp_path, capsys):
    """serve reads the folder's generation_config.json (data.sampling_defaults) and a request
    without temperature/top_p/top_k gets those; its own values win; what the library does
    not apply is named at start-up."""
    import argparse
    import json
    import shutil

    from flaxformer_lite.serve import app, commands

    folder = tmp_path / "hf"
    shutil.copytree(hf_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1, "min_p": 0.05}))
    parser = argparse.ArgumentParser()
    commands.add_serve_arguments(parser)
    served, _ = commands._load(parser.parse_args(["--hf", str(folder), "--max-batch", "1", "--max-len", "32"]))
    assert served.sampling == {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}
    assert ("generation_config.json: temperature 0.6, top_p 0.9, repetition_penalty 1.1 (a request's own values "
            "win); not applied: min_p 0.05") in capsys.readouterr().err
    left_out, _ = app._sampling({}, served.sampling, logprobs=None, echo_logprobs=False)
    assert (left_out.temperature, left_out.top_p, left_out.top_k, left_out.repetition_penalty) == (0.6, 0.9, 0, 1.1)
    given, _ = app._sampling({"temperature": 0, "top_p": 1, "repetition_penalty": 1}, served.sampling,
                             logprobs=None, echo_logprobs=False)
    assert (given.temperature, given.top_p, given.repetition_penalty) == (0.0, 1.0, 1.0)
    openai_penalties, _ = app._sampling({"presence_penalty": 1, "frequency_penalty": 0.5}, served.sampling,
                                        logprobs=None, echo_logprobs=False)
    assert (openai_penalties.presence_penalty, openai_penalties.frequency_penalty) == (1.0, 0.5)
    served, _ = commands._load(parser.parse_args(["--hf", str(hf_dir), "--max-batch", "1", "--max-len", "32"]))
    assert served.sampling == {}  # no generation_config.json: OpenAI's defaults
    assert app._sampling({}, served.sampling, logprobs=None, echo_logprobs=False)[0].temperature == 1.0
