"""`flaxformer-lite {train,eval,generate,embed,summary,convert,viz,bench,serve,prepare,tokenizer}`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args)`;
only the chosen command's module is imported, so `--help` stays fast.

Bad input, a flag's value or a file's content, prints one `... error: ...` line naming
the argument, file or key, and exits with status 2 before anything is written: argparse's
errors through `Parser`, the library's (every `errors.UserError`: ConfigError, DataError,
HFError, ...; a missing file) through `main`, which imports no room of the package to
know them. Flags take the checked types of runtime/flags.py (`positive_int`, ...).

The commands that compile a model (train, eval, generate, embed, serve) keep XLA's compiled
programs in a persistent cache, so a resumed or repeated run skips the compile. Those and
`bench` first tune the host's malloc to keep XLA:CPU's step buffers mapped (runtime/host.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from flaxformer_lite.errors import BAD_INPUT, EXIT_BAD_INPUT

COMMANDS = {
    "train": ("flaxformer_lite.train.commands", "train", "train a model from a config"),
    "eval": ("flaxformer_lite.train.commands", "eval", "evaluate a run's checkpoint"),
    "generate": ("flaxformer_lite.inference.commands", "generate", "generate text from a run or an HF folder"),
    "embed": ("flaxformer_lite.inference.commands", "embed", "sentence embeddings from an HF encoder folder"),
    "summary": ("flaxformer_lite.models.commands", "summary", "parameters, FLOPs and memory of a config"),
    "convert": ("flaxformer_lite.interop.commands", "convert", "convert HF <-> flaxformer_lite"),
    "viz": ("flaxformer_lite.viz.commands", "viz", "plot attention weights or position encodings"),
    "bench": ("flaxformer_lite.bench", "bench", "run benchmarks"),
    "serve": ("flaxformer_lite.serve.commands", "serve", "an OpenAI-compatible HTTP server with continuous batching"),
    "prepare": ("flaxformer_lite.data.commands", "prepare", "tokenize a corpus once into shards of token ids"),
    "tokenizer": ("flaxformer_lite.data.commands", "tokenizer", "train a tokenizer.json on a corpus"),
    "plan": ("flaxformer_lite.plan.commands", "plan", "compile a run for a TPU slice without one: memory, FLOPs, estimates"),
}

# Commands whose compiled programs are worth keeping across runs; `bench` measures
# compile time, so it never reads the cache.
CACHED_COMMANDS = ("train", "eval", "generate", "embed", "serve")
# Commands that run compiled programs: the host's malloc is tuned before JAX starts.
TUNED_MALLOC_COMMANDS = CACHED_COMMANDS + ("bench",)
COMPILATION_CACHE_ENV = "FLAXFORMER_LITE_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 2 * 2**30
DESCRIPTION = ("flaxformer_lite: train, evaluate, decode, convert and inspect Transformers (BERT, GPT-2, "
               "LLaMA-style, T5) in JAX/Flax. Run flaxformer-lite COMMAND --help for a command's flags.")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (usage is in --help), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def use_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache; returns its folder (None: off).

    The folder is $JAX_COMPILATION_CACHE_DIR when set (yours is kept), else
    $FLAXFORMER_LITE_CACHE/xla (default ~/.cache/flaxformer_lite/xla), capped at 2 GiB
    (least recently used entries go first). FLAXFORMER_LITE_COMPILATION_CACHE=0 turns it
    off. Entries are keyed by the program, the compiler options and the JAX and XLA
    versions, so a changed model or JAX compiles afresh; programs that compile in under
    a second are not stored (JAX's default threshold).
    """
    import jax

    if os.environ.get(COMPILATION_CACHE_ENV, "1") == "0":
        return None
    if jax.config.jax_compilation_cache_dir is None:
        from flaxformer_lite.runtime.host import cache_root

        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
        if jax.config.jax_compilation_cache_max_size == -1:
            jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return jax.config.jax_compilation_cache_dir


def _load(command: str):
    module_name, prefix, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    return getattr(module, f"add_{prefix}_arguments"), getattr(module, f"run_{prefix}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="flaxformer-lite", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / errors for unknown commands
        parser.print_help()
        return 2
    if argv[0] in TUNED_MALLOC_COMMANDS:
        from flaxformer_lite.runtime import host

        host.tune_malloc()
    add_arguments, run = _load(argv[0])
    command_parser = Parser(prog=f"flaxformer-lite {argv[0]}", description=COMMANDS[argv[0]][2])
    add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    if argv[0] in CACHED_COMMANDS:
        use_compilation_cache()
    try:
        return run(args) or 0
    except BAD_INPUT as e:
        message = " ".join(str(e).split())  # one line, whatever the exception's text
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
