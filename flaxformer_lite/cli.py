"""`flaxformer-lite {train,eval,generate,embed,summary,convert,viz,bench,serve,prepare,tokenizer}`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args)`;
only the chosen command's module is imported, so `--help` stays fast.

The commands that compile a model (train, eval, generate, embed, serve) keep XLA's compiled
programs in a persistent cache, so a resumed or repeated run skips the compile. Those and
`bench` first tune the host's malloc to keep XLA:CPU's step buffers mapped (host.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "train": ("flaxformer_lite.train.commands", "train", "train a model from a config"),
    "eval": ("flaxformer_lite.train.commands", "eval", "evaluate a run's checkpoint"),
    "generate": ("flaxformer_lite.model_commands", "generate", "generate text from a run or an HF folder"),
    "embed": ("flaxformer_lite.model_commands", "embed", "sentence embeddings from an HF encoder folder"),
    "summary": ("flaxformer_lite.model_commands", "summary", "parameters, FLOPs and memory of a config"),
    "convert": ("flaxformer_lite.interop.commands", "convert", "convert HF <-> flaxformer_lite"),
    "viz": ("flaxformer_lite.model_commands", "viz", "plot attention weights or position encodings"),
    "bench": ("flaxformer_lite.bench", "bench", "run benchmarks"),
    "serve": ("flaxformer_lite.serve.commands", "serve", "an OpenAI-compatible HTTP server with continuous batching"),
    "prepare": ("flaxformer_lite.data.commands", "prepare", "tokenize a corpus once into shards of token ids"),
    "tokenizer": ("flaxformer_lite.data.commands", "tokenizer", "train a tokenizer.json on a corpus"),
}

# Commands whose compiled programs are worth keeping across runs; `bench` measures
# compile time, so it never reads the cache.
CACHED_COMMANDS = ("train", "eval", "generate", "embed", "serve")
# Commands that run compiled programs: the host's malloc is tuned before JAX starts.
TUNED_MALLOC_COMMANDS = CACHED_COMMANDS + ("bench",)
COMPILATION_CACHE_ENV = "FLAXFORMER_LITE_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 2 * 2**30


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
        from flaxformer_lite.data.preparation import cache_root

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
    parser = argparse.ArgumentParser(prog="flaxformer-lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / errors for unknown commands
        parser.print_help()
        return 2
    if argv[0] in TUNED_MALLOC_COMMANDS:
        from flaxformer_lite import host

        host.tune_malloc()
    add_arguments, run = _load(argv[0])
    command_parser = argparse.ArgumentParser(prog=f"flaxformer-lite {argv[0]}", description=COMMANDS[argv[0]][2])
    add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    if argv[0] in CACHED_COMMANDS:
        use_compilation_cache()
    return run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
