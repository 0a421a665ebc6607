"""The inference commands: `generate` and `embed`, and the model loading `serve` shares.

    flaxformer-lite generate --workdir RUN --prompt "Once upon" [--stream]
    flaxformer-lite generate --hf DIR --system "Be brief." --chat "Hi" [--chat "Hello!" --chat "Why?"]
    flaxformer-lite embed --hf DIR --text "a cat" --text "a dog"      # JSON

The library functions they call (decode.generate, embeddings.embed) depend on models
alone; reading run directories and HF folders is this module's job (`load_model`). JAX and the library are
imported inside the `run_*` functions, so `--help` answers at once.
Bad input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np

from flaxformer_lite.errors import EXIT_BAD_INPUT
from flaxformer_lite.inference.text import StopMatcher, held_back
from flaxformer_lite.runtime.flags import (
    DefaultsHelp,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)

# decode.METHODS and embeddings.POOLINGS, spelled out so that `--help` does not import JAX
# (tests/test_cli.py keeps them equal).
DECODE_METHODS = ("greedy", "sample", "beam")
EMBED_POOLINGS = ("mean", "cls", "max")


# ------------------------------------------------------------------------ generate


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite generate`."""
    parser.formatter_class = DefaultsHelp
    source = parser.add_argument_group("model (one of --workdir, --hf, --config)")
    source.add_argument("--workdir", help="a training run's directory: its config, latest checkpoint, tokenizer")
    source.add_argument("--hf", metavar="DIR", help="a local HuggingFace folder: config.json, *.safetensors, tokenizer.json")
    add_peft_argument(source)
    source.add_argument(
        "--config",
        help="with --workdir: use this config instead of the run's (its model section must match); "
        "alone: a randomly initialised model, to try the command",
    )
    source.add_argument("--step", type=non_negative_int, help="checkpoint step to load from --workdir (default: the latest)")
    parser.add_argument("--prompt", action="append",
                        help="text to continue (decoder) or to encode (encoder-decoder), not empty; repeat for a batch")
    parser.add_argument("--chat", action="append", metavar="MESSAGE",
                        help="a user message, rendered with the folder's chat template; repeat for a conversation "
                        "(user, assistant, user, ...); prints the assistant's reply")
    parser.add_argument("--system", help="with --chat: the system message")
    parser.add_argument("--method", choices=DECODE_METHODS, default="greedy", help="(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: %(default)s)")
    parser.add_argument("--min-new-tokens", type=non_negative_int, default=0,
                        help="no end-of-sequence before this many new tokens (default: %(default)s)")
    sampling = "with --method sample (default: the folder's generation_config.json, else {})"
    parser.add_argument("--temperature", type=non_negative_float, help=sampling.format(1.0))
    parser.add_argument("--top-k", type=non_negative_int, help=sampling.format("0, off"))
    parser.add_argument("--top-p", type=probability, help=sampling.format("1.0, off"))
    parser.add_argument("--repetition-penalty", type=positive_float,
                        help="greedy and sample: seen tokens' logits divided by it, as transformers' (default: the "
                        "folder's generation_config.json, else 1.0, off)")
    parser.add_argument("--seed", type=int, default=0, help="with --method sample (default: %(default)s)")
    parser.add_argument("--num-beams", type=positive_int, default=4, help="with --method beam (default: %(default)s)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="with --method beam: scores divided by length ** this (default: %(default)s)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end a continuation at this text, which is cut off with all after it, as serve's "
                        "'stop' does; repeatable; a stop of one token also ends decoding at once, a longer one "
                        "when the row ends (EOS or --max-new-tokens) (default: none)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help="prepend BOS to decoder-only prompts (default: as the tokenizer files say, for "
                        "--hf and --workdir alike: tokenizer.json's post-processor in an HF folder (Llama: yes, "
                        "GPT-2, Qwen: no); yes for the byte tokenizer and a bare tokenizer.json, as runs train on "
                        "bos+text+eos)")
    parser.add_argument("--stream", action="store_true",
                        help="print tokens as they are generated (one prompt, greedy/sample); the output is the same")


def add_peft_argument(group, many: bool = False) -> None:
    """--peft ADAPTER, for commands that load a model from --hf (`many`: repeatable, as
    serve takes it, [NAME=]DIR)."""
    if many:
        group.add_argument("--peft", action="append", metavar="[NAME=]DIR", help="with --hf: a PEFT LoRA adapter "
                           "folder for that base (repeatable). One bare DIR alone: the base with that adapter is the "
                           "model served, named after the folder. NAME=DIR, several, or with --max-adapters: each "
                           "adapter is a model requests name (NAME, else its folder's name) beside the base, and "
                           "requests of different adapters share one batch (docs/serving.md, 'Many adapters')")
        return
    group.add_argument("--peft", metavar="ADAPTER", help="with --hf: a PEFT LoRA adapter folder (adapter_config.json, "
                       "adapter_model.safetensors) for that base, used unmerged")


def check_peft(args) -> None:
    from flaxformer_lite.config import ConfigError

    if args.peft and not args.hf:
        raise ConfigError("--peft ADAPTER goes with --hf BASE_DIR, the model the adapter was trained on")


def load_model(args):
    """(ModelConfig, params, tokenizer, tokenizer folder or None) for the chosen source."""
    from flaxformer_lite import data
    from flaxformer_lite.config import ConfigError, load_config
    from flaxformer_lite.models import init_params

    chosen = [name for name in ("workdir", "hf") if getattr(args, name)]
    if len(chosen) > 1 or (args.hf and args.config):
        raise ConfigError("generate: pass one model source: --workdir DIR, --hf DIR, or --config FILE")
    check_peft(args)
    if args.hf:
        from flaxformer_lite.interop import hf

        model_cfg, params = hf.load(args.hf)
        if args.peft:
            from flaxformer_lite.interop import peft

            model_type = hf.read_config(args.hf).get("model_type")
            model_cfg, params = peft.load_adapters(model_cfg, params, args.peft, model_type=model_type)
        return model_cfg, params, hf.load_tokenizer(args.hf), pathlib.Path(args.hf)
    if args.workdir:
        from flaxformer_lite.runtime import checkpoint

        cfg, params = checkpoint.load_params(args.workdir, step=args.step)
        if args.config:
            given = load_config(args.config)
            if given.model != cfg.model:
                diff = [f.name for f in dataclasses.fields(cfg.model) if getattr(cfg.model, f.name) != getattr(given.model, f.name)]
                raise ConfigError(
                    f"generate: --config {args.config} has a different model section than the run in "
                    f"{args.workdir} (model.{', model.'.join(diff)}); drop --config to use the run's own"
                )
            cfg = given
        return cfg.model, params, data.load_tokenizer(cfg.data.tokenizer), tokenizer_folder(cfg.data.tokenizer)
    if args.config:
        import jax

        cfg = load_config(args.config)
        print(f"note: no --workdir/--hf given: {args.config} with random weights", file=sys.stderr)
        params = init_params(cfg.model, jax.random.key(args.seed))
        return cfg.model, params, data.load_tokenizer(cfg.data.tokenizer), tokenizer_folder(cfg.data.tokenizer)
    raise ConfigError("generate: pass a model: --workdir DIR (a training run), --hf DIR, or --config FILE")


def tokenizer_folder(spec: str) -> Optional[pathlib.Path]:
    """The folder a run's tokenizer comes from (its chat template's home), if it is one."""
    return pathlib.Path(spec) if spec != "byte" and pathlib.Path(spec).is_dir() else None


def _sampling_flags(args, folder: Optional[pathlib.Path]) -> dict:
    """temperature, top_k, top_p, repetition_penalty: the flag where given, else the
    checkpoint's generation_config.json (data.sampling_defaults), else off (temperature 1).
    Beam search takes no repetition penalty from the folder (it has none)."""
    from flaxformer_lite.data import sampling_defaults

    chosen = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    if folder is not None:
        chosen.update(sampling_defaults(folder).applied)
        if args.method == "beam":
            chosen["repetition_penalty"] = 1.0
    return {key: chosen[key] if getattr(args, key) is None else getattr(args, key) for key in chosen}


def _chat_prompt(args, tokenizer, folder: Optional[pathlib.Path]) -> list[int]:
    """The --system/--chat conversation rendered with the folder's template, as ids."""
    from flaxformer_lite.data.chat import ChatTemplate

    if args.prompt:
        raise ValueError("generate: pass --prompt (text to continue) or --chat (a conversation), not both")
    if len(args.chat) % 2 == 0:
        raise ValueError(
            f"--chat given {len(args.chat)} times: messages alternate user, assistant, user, ..., so give an odd "
            "number, ending with the user's message to answer"
        )
    template = ChatTemplate.from_folder(folder) if folder is not None else None
    if template is None:
        where = folder or "this run's tokenizer (not a folder)"
        raise ValueError(
            f"--chat: {where} has no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json); use --prompt, or a folder with an instruct model's template"
        )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(args.chat)]
    return tokenizer.encode(template.render(messages, add_generation_prompt=True), special=True)


def _stop_ids(texts: Sequence[str], tokenizer) -> list[int]:
    """The ids of the --stop texts that are one token each: decoding ends at them. Every
    stop text cuts the continuation (`_cut_at_stop`), whatever its tokens."""
    if any(not text for text in texts):
        raise ValueError("--stop '' is empty: give the text to stop at, e.g. --stop $'\\n\\n'")
    return [ids[0] for ids in (tokenizer.encode(text) for text in texts) if len(ids) == 1]


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest --stop text in it, as serve cuts a reply."""
    if not stops:
        return text
    cut = StopMatcher(stops).find(text, len(text))[0]
    return text if cut < 0 else text[:cut]


def text_prompts(args, tokenizer, decoder_only: bool) -> list[list[int]]:
    """The ids of each --prompt: BOS first as the tokenizer files say (`adds_bos`) unless
    --bos/--no-bos; encoder inputs end with EOS, as in training (data/ objectives) and in
    T5's tokenizer."""
    bos = tokenizer.adds_bos if args.bos is None else args.bos
    return [tokenizer.encode(p, bos=bos and decoder_only, eos=not decoder_only) for p in args.prompt]


def _check_prompts(prompts: Sequence[str]) -> None:
    # An empty prompt would silently sample from BOS alone (decoder) or encode EOS alone
    # (encoder-decoder). Unconditional samples are a deliberate choice: the library call
    # generate(model, params, [[bos_id]], ...) makes them.
    for i, text in enumerate(prompts):
        if not text:
            raise ValueError(
                f"--prompt {i + 1} is empty: give text to continue or to encode (for unconditional samples call "
                "flaxformer_lite.generate with [[bos_id]] as the prompt)"
            )


def run_generate(args: argparse.Namespace) -> int:
    """`flaxformer-lite generate`: print each prompt (decoder-only) and its continuation.

    --stream prints the same text, the continuation as it is generated. Bad input (model
    source, config, tokenizer, prompt, settings) prints one `error: ...` line and returns 2.
    """
    import jax

    from flaxformer_lite.inference.decode import generate
    from flaxformer_lite.models import build_model

    streamed, printed = [], [None]

    def stream(step, tokens_B):
        if printed[0] is None:  # the first token: the prompt goes first, as without --stream
            print(shown[0], end="", flush=True)
            printed[0] = ""
        # Tokens can split a character: decode the whole continuation each time and print
        # only up to a trailing incomplete character (U+FFFD), which later tokens may change.
        streamed.append(int(tokens_B[0]))
        text = tokenizer.decode(streamed)
        if args.stop:  # what a later token may make the start of a stop waits; a stop and all after it never print
            cut = _cut_at_stop(text, args.stop)
            text = cut if len(cut) < len(text) else text[: len(text) - held_back(text, args.stop)]
        if not text.endswith("\ufffd"):
            print(text[len(printed[0]):], end="", flush=True)
            printed[0] = text

    try:
        if not args.prompt and not args.chat:
            raise ValueError("generate: pass --prompt TEXT to continue, or --chat MESSAGE to answer")
        if args.system and not args.chat:
            raise ValueError("--system is the system message of a --chat conversation: add --chat MESSAGE")
        _check_prompts(args.prompt or [])
        model_cfg, params, tokenizer, folder = load_model(args)
        decoder_only = model_cfg.family == "decoder"
        if args.chat:
            if not decoder_only:
                raise ValueError(f"--chat needs a decoder-only model; this one is model.family={model_cfg.family!r}")
            prompts, shown = [_chat_prompt(args, tokenizer, folder)], [""]  # the reply alone is printed
        else:
            prompts = text_prompts(args, tokenizer, decoder_only)
            shown = args.prompt if decoder_only else [""] * len(prompts)
        if args.stream and (len(prompts) > 1 or args.method == "beam"):
            raise ValueError("--stream prints one prompt's tokens: give one --prompt and --method greedy or sample")
        # Every id the tokenizer files call an end of text stops a row (a chat model's
        # end-of-turn as well as its end-of-text), unless --ignore-eos.
        eos_ids = [] if args.ignore_eos else [i for i in tokenizer.eos_ids if i < model_cfg.vocab_size]
        out = generate(
            build_model(model_cfg), params, prompts,
            max_new_tokens=args.max_new_tokens, method=args.method, min_new_tokens=args.min_new_tokens,
            ignore_eos=args.ignore_eos, stop_tokens=_stop_ids(args.stop, tokenizer) + eos_ids,
            **_sampling_flags(args, folder), seed=args.seed,
            num_beams=args.num_beams, length_penalty=args.length_penalty,
            stream=stream if args.stream else None,
        )
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError, HFError included
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    jax.effects_barrier()
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    continuations = [_cut_at_stop(tokenizer.decode(row[:n].tolist()), args.stop) for row, n in zip(tokens, lengths)]
    if args.stream:
        if printed[0] is None:  # no token came through the stream: print as without --stream
            print(shown[0] + continuations[0])
        else:
            print(continuations[0][len(printed[0]):])
        return 0
    for text, continuation in zip(shown, continuations):
        print(text + continuation)
    return 0


# ------------------------------------------------------------------------ embed

# sentence-transformers folder files: which modules run after the transformer, and how.
ST_MODULES = "modules.json"
ST_SETTINGS = "sentence_bert_config.json"
# Its Pooling config: pooling_mode (6.x) or one pooling_mode_* flag (older releases).
_ST_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_max_tokens": "max"}


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite embed`."""
    parser.add_argument("--hf", metavar="DIR", required=True,
                        help="a local HF encoder folder (config.json, *.safetensors, tokenizer.json), "
                        "e.g. a sentence-transformers checkpoint")
    parser.add_argument("--text", action="append", required=True, help="a text to embed; repeat for a batch")
    parser.add_argument("--pooling", choices=EMBED_POOLINGS,
                        help="default: the folder's sentence-transformers Pooling module, else mean")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="unit-length vectors (default: yes, or as the folder's modules.json says)")


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def sentence_transformers_settings(folder) -> dict:
    """{'pooling', 'normalize', 'max_seq_length'} from a sentence-transformers folder's
    modules.json, its Pooling config and sentence_bert_config.json; {} for a plain HF folder.

    Only Transformer -> Pooling (mean, cls or max) -> optional Normalize pipelines are
    read; anything else (Dense layers, other poolings) is an error naming the file.
    """
    folder = pathlib.Path(folder)
    if not (folder / ST_MODULES).is_file():
        return {}
    settings = {"pooling": "mean", "normalize": False}
    for module in _read_json(folder / ST_MODULES):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer" and module.get("path", "") in ("", "."):
            continue
        if kind == "Normalize":
            settings["normalize"] = True
            continue
        if kind != "Pooling":
            raise ValueError(
                f"{folder / ST_MODULES}: module {module.get('type')!r} at {module.get('path')!r} is not "
                "supported here (only a Transformer in the folder itself, Pooling and Normalize)"
            )
        pooling_file = folder / module["path"] / "config.json"
        config = _read_json(pooling_file)
        modes = config.get("pooling_mode") or [m for k, m in _ST_POOLING_FLAGS.items() if config.get(k)]
        modes = [modes] if isinstance(modes, str) else list(modes)
        if len(modes) != 1 or modes[0] not in _ST_POOLING_FLAGS.values():
            raise ValueError(
                f"{pooling_file}: pooling {modes or 'none'} is not supported; one of mean, cls, max is"
            )
        settings["pooling"] = modes[0]
    if (folder / ST_SETTINGS).is_file():
        settings["max_seq_length"] = _read_json(folder / ST_SETTINGS).get("max_seq_length")
    return settings


def _tokenize(folder: pathlib.Path, texts: Sequence[str], max_len: int):
    """(ids [B,T], mask [B,T]) with the folder's tokenizer.json and its own special tokens
    ([CLS] ... [SEP] for BERT), truncated to max_len and right-padded."""
    import tokenizers

    from flaxformer_lite.interop.hf import TOKENIZER_FILE, load_tokenizer

    load_tokenizer(folder)  # the one-line error for a folder without tokenizer.json
    tok = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    tok.no_padding()
    tok.enable_truncation(max_len)
    rows = [e.ids for e in tok.encode_batch(list(texts))]
    width = max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, True
    return ids, mask


def run_embed(args: argparse.Namespace) -> int:
    """`flaxformer-lite embed`: print {'pooling', 'normalize', 'dim', 'embeddings'} as JSON.

    Bad input prints one `error: ...` line and returns 2.
    """
    from flaxformer_lite.inference.embeddings import embed
    from flaxformer_lite.interop import hf
    from flaxformer_lite.models import build_model

    folder = pathlib.Path(args.hf)
    try:
        settings = sentence_transformers_settings(folder)
        pooling = args.pooling or settings.get("pooling", "mean")
        normalize = args.normalize if args.normalize is not None else settings.get("normalize", True)
        model_cfg, params = hf.load(folder)
        max_len = min(settings.get("max_seq_length") or model_cfg.max_len, model_cfg.max_len)
        ids, mask = _tokenize(folder, args.text, max_len)
        vectors = embed(build_model(model_cfg), params, ids, mask, pooling=pooling, normalize=normalize)
    except (ValueError, FileNotFoundError) as e:  # HFError, DataError included
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    vectors = np.asarray(vectors)
    print(json.dumps({
        "pooling": pooling, "normalize": normalize, "dim": int(vectors.shape[1]),
        "embeddings": [{"text": t, "embedding": [round(float(x), 7) for x in v]} for t, v in zip(args.text, vectors)],
    }))
    return 0
