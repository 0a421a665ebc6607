"""`flaxformer-lite serve`: load a model, warm its engine up, serve HTTP until SIGTERM.

    flaxformer-lite serve --hf DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-len T]
    flaxformer-lite serve --workdir RUN

The address is bound before the model loads: a bad or busy --host/--port is one
`error: ...` line and exit 2 at once, and "serving ... on" is printed once the socket
listens. A connection whose request headers are not complete HEADER_TIMEOUT_S seconds
after it opened (or after its last response) is closed.

SIGTERM (or Ctrl-C) drains: new requests get 503, those in flight finish (up to
--drain-timeout seconds, then they are cut off), and the process exits 0. A second
signal stops at once. Bad input prints one `error: ...` line and exits 2. If the
engine dies, /health answers 503 and the process exits 1, for a supervisor to restart it.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import signal
import socket
import sys
import time
from typing import Callable

from flaxformer_lite.errors import EXIT_BAD_INPUT, UserError
from flaxformer_lite.inference import commands as inference_commands
from flaxformer_lite.runtime.flags import DefaultsHelp, non_negative_float, non_negative_int, positive_int

MAX_BODY_BYTES = 4 * 2**20  # the app's default (serve/app.py imports Starlette, which --help does not need)
from flaxformer_lite.serve.access import API_KEY_ENV
from flaxformer_lite.serve.reasoning import PARSERS as REASONING_PARSERS
from flaxformer_lite.serve.tools import PARSERS as TOOL_CALL_PARSERS

EXIT_ENGINE_FAILED = 1  # the engine died while serving: a supervisor should restart the process
HEADER_TIMEOUT_S = 10.0  # seconds a connection may take to send a request's headers


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite serve`."""
    parser.formatter_class = DefaultsHelp
    source = parser.add_argument_group("model (one of --workdir, --hf, --config)")
    source.add_argument("--workdir", help="a training run's directory: its config, latest checkpoint, tokenizer")
    source.add_argument("--hf", metavar="DIR", help="a local HuggingFace folder: config.json, *.safetensors, "
                        "tokenizer files, chat template (encoders serve /v1/embeddings)")
    inference_commands.add_peft_argument(source, many=True)
    source.add_argument("--config", help="alone: a randomly initialised model of this config, to try the server")
    source.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="with --config: override config keys, e.g. --set model.num_layers=4 (default: none)")
    source.add_argument("--step", type=non_negative_int, help="checkpoint step to load from --workdir (default: the latest)")
    parser.add_argument("--name", help="the model id clients pass as 'model' (default: the folder or config name)")
    parser.add_argument("--max-adapters", type=non_negative_int, default=None, metavar="N",
                        help="LoRA adapters held at once, from --peft NAME=DIR and POST /v1/load_lora_adapter; 0 "
                        "serves the base alone and compiles no adapter path (default: the number of --peft NAME=DIR)")
    parser.add_argument("--max-lora-rank", type=positive_int, default=None, metavar="R",
                        help="the largest adapter rank held; every adapter is zero-padded to it, so a step's "
                        "adapter work grows with it (default: the largest rank among --peft, else 16)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; one other than loopback "
                        "(0.0.0.0) reaches other machines: set --api-key too (docs/serving.md)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together (KV-cache slots)")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="tokens per slot, prompt + completion (default: model.max_len, at most 2048)")
    parser.add_argument("--chunk", type=positive_int, default=64, help="prompt tokens prefilled per engine step")
    parser.add_argument("--prefill-budget", type=positive_int, default=None, metavar="TOKENS",
                        help="prompt tokens (whole --chunk's) prefilled between two decode steps: more shortens the "
                        "first token's wait when many requests arrive together, and lengthens the gap between two "
                        "tokens of the running streams (default: 4 chunks)")
    parser.add_argument("--prefix-cache-blocks", type=non_negative_int, default=None, metavar="N",
                        help="blocks of --chunk positions the prefix cache keeps, least recently used dropped first; "
                        "a prompt starting with a cached prefix prefills only the rest (default: as many as the "
                        "slots hold, which doubles the KV-cache memory; 0 turns it off)")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache_blocks", action="store_const", const=0,
                        help="turn the prefix cache off, as --prefix-cache-blocks 0 does (default: on)")
    parser.add_argument("--max-queue", type=non_negative_int, default=64,
                        help="requests that may wait for a slot; more get 429 with Retry-After")
    parser.add_argument("--drain-timeout", type=non_negative_float, default=30.0,
                        help="seconds SIGTERM waits for requests in flight before exiting")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help="prepend BOS to text prompts (default: as the tokenizer files say, for --hf and "
                        "--workdir alike: tokenizer.json's post-processor in an HF folder; yes for the byte tokenizer "
                        "and a bare tokenizer.json, as runs train on bos+text+eos; a chat template writes its own)")
    parser.add_argument("--seed", type=int, default=0, help="--config: the random initialisation's seed")
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                        help="how the model writes tool calls, to return a chat request's calls as tool_calls: "
                        "hermes (Qwen 2.5 and 3, Hermes), llama3_json (Llama 3.1 to 3.3); docs/serving.md (default: none, "
                        "tool calls stay text)")
    parser.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                        help="how a thinking model marks its reasoning, to return it as reasoning_content apart from "
                        "the answer: qwen3 (<think> ... </think> when it thinks), deepseek_r1 (the reply opens "
                        "inside <think>); docs/serving.md (default: none, thinking stays in content)")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level (info logs every request)")
    network = parser.add_argument_group("access and limits (docs/serving.md, 'Running it on a network')")
    network.add_argument("--api-key", action="append", default=[], metavar="KEY",
                         help=f"a key clients must send as 'Authorization: Bearer KEY' (repeatable; also "
                         f"${API_KEY_ENV}); /health stays open (default: none, no key asked)")
    network.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                         help="web origins (https://app.example.com) whose pages may call the server (CORS) "
                         "(default: none)")
    network.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY_BYTES,
                         help="larger request bodies get 413, counted while they arrive")
    network.add_argument("--allow-special-tokens", action="store_true",
                         help="read special-token text (<|im_end|>) in user and tool messages as control tokens; "
                         "otherwise it is plain text, so a message cannot forge a turn")


def _adapter_folders(entries: list) -> dict:
    """{name: folder} of --peft NAME=DIR entries (a bare DIR is named after its folder)."""
    from flaxformer_lite.config import ConfigError

    out = {}
    for entry in entries:
        name, sep, folder = entry.partition("=")
        if not sep:
            name, folder = pathlib.Path(entry).resolve().name, entry
        if not name or not folder:
            raise ConfigError(f"--peft {entry!r}: give NAME=DIR (or a bare DIR, named after its folder)")
        if name in out:
            raise ConfigError(f"--peft: two adapters are named {name!r}: name them apart with --peft NAME=DIR")
        out[name] = folder
    return out


def _load(args):
    """(Served, engine-or-embedder) for the chosen model source."""
    import jax

    from flaxformer_lite.config import ConfigError, load_config
    from flaxformer_lite.data.chat import ChatTemplate
    from flaxformer_lite.data.tokenizers import GENERATION_CONFIG_FILE, sampling_defaults
    from flaxformer_lite.models import build_model, init_params
    from flaxformer_lite.serve.app import Served

    inference_commands.check_peft(args)
    entries = args.peft or []
    # One bare --peft DIR alone: that adapter inside the model, as generate loads it.
    single = entries[0] if len(entries) == 1 and "=" not in entries[0] and args.max_adapters is None else None
    folders = {} if single else _adapter_folders(entries)
    max_adapters = len(folders) if args.max_adapters is None else args.max_adapters
    if len(folders) > max_adapters:
        raise ConfigError(f"--peft names {len(folders)} adapters, more than --max-adapters {max_adapters}: raise "
                          "--max-adapters or drop some")
    if args.set and not args.config:
        raise ConfigError("--set overrides --config keys: add --config, or drop --set")
    if args.config and not (args.workdir or args.hf):
        from flaxformer_lite import data

        cfg = load_config(args.config, overrides=args.set)
        print(f"note: {args.config} with random weights", file=sys.stderr)
        model_cfg, params = cfg.model, init_params(cfg.model, jax.random.key(args.seed))
        tokenizer, name = data.load_tokenizer(cfg.data.tokenizer), cfg.name
        folder = inference_commands.tokenizer_folder(cfg.data.tokenizer)
    else:
        model_cfg, params, tokenizer, folder = inference_commands.load_model(argparse.Namespace(**{
            **vars(args), "peft": single}))
        name = pathlib.Path(single or args.hf or args.workdir).resolve().name
    template = ChatTemplate.from_folder(folder) if folder is not None else None
    sampling = sampling_defaults(folder) if folder is not None else None
    if sampling is not None and (sampling.applied or sampling.unapplied):
        applied = ", ".join(f"{k} {v}" for k, v in sampling.applied.items()) or "none"
        unapplied = "".join(f"; not applied: {k} {v}" for k, v in sampling.unapplied.items())
        print(f"sampling defaults from {folder / GENERATION_CONFIG_FILE}: {applied} (a request's own values win)"
              f"{unapplied}", file=sys.stderr)
    params = jax.tree.map(jax.numpy.asarray, params)
    model = build_model(model_cfg)
    max_len = args.max_len or min(model_cfg.max_len, 2048)
    served = Served(name=args.name or name, tokenizer=tokenizer, max_len=max_len, chat_template=template,
                    add_bos=tokenizer.adds_bos if args.bos is None else args.bos,
                    sampling=sampling.applied if sampling is not None else {}, tool_parser=args.tool_call_parser,
                    reasoning_parser=args.reasoning_parser, max_body_bytes=args.max_body_bytes,
                    allow_special_tokens=args.allow_special_tokens)
    if model_cfg.family == "encoder":
        from flaxformer_lite.inference.embedder import Embedder

        if max_adapters:
            raise ConfigError("--peft NAME=DIR and --max-adapters serve adapters of a decoder-only model; an encoder "
                              "serves /v1/embeddings of its own weights: drop them")
        if not args.hf:
            raise ConfigError("an encoder serves /v1/embeddings from an HF folder: pass --hf DIR")
        settings = inference_commands.sentence_transformers_settings(args.hf)
        max_len = min(args.max_len or settings.get("max_seq_length") or model_cfg.max_len, model_cfg.max_len)
        served.max_len = max_len
        served.embedder = Embedder(model, params, args.hf, pooling=settings.get("pooling", "mean"),
                                   normalize=settings.get("normalize", True), max_len=max_len,
                                   max_batch=args.max_batch)
        return served, served.embedder
    from flaxformer_lite.inference.engine import Engine

    adapters = {}
    if max_adapters:
        from flaxformer_lite.interop import hf, peft

        model_type = hf.read_config(args.hf).get("model_type") if args.hf else None
        served.read_adapter = functools.partial(peft.adapter_params, model_cfg, model_type=model_type)
        adapters = {name: served.read_adapter(folder) for name, folder in folders.items()}
        if served.name in adapters:
            raise ConfigError(f"--peft {served.name}=...: {served.name!r} is the base model's name (--name): "
                              "name the adapter otherwise")
    served.adapter_folders = folders
    ranks = [lora_cfg.rank for lora_cfg, _ in adapters.values()]
    targets = {t for lora_cfg, _ in adapters.values() for t in lora_cfg.targets} or None
    served.engine = Engine(model, params, tokenizer, max_batch=args.max_batch, max_len=max_len,
                           chunk=args.chunk, max_queue=args.max_queue, prefix_blocks=args.prefix_cache_blocks,
                           prefill_budget=args.prefill_budget, max_adapters=max_adapters,
                           max_lora_rank=args.max_lora_rank or max(ranks, default=16), lora_targets=targets)
    for name, adapter in adapters.items():
        served.engine.load_adapter(name, *adapter)  # written into the table as the engine warms up
    return served, served.engine


class _CompileCounter:
    """Counts XLA compilations (or persistent-cache loads) after it is armed."""

    def __init__(self):
        import jax

        from flaxformer_lite.runtime.host import BACKEND_COMPILE_EVENT

        self.count, self.armed = 0, False

        def listener(event, duration, **kwargs):
            if event == BACKEND_COMPILE_EVENT and self.armed:
                self.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)


def run_serve(args: argparse.Namespace) -> int:
    """`flaxformer-lite serve`: returns 0 after a drained shutdown, 2 for bad input, 1 if the engine died."""
    try:
        import uvicorn  # noqa: F401

        from flaxformer_lite.serve.access import Policy
        from flaxformer_lite.serve.app import build_app
    except ImportError as e:
        print(f"error: serving needs the serve extra ({e.name} is missing): pip install 'flaxformer_lite[serve]'",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    from flaxformer_lite.runtime import host

    host.tune_malloc_for_serving()
    try:
        sock = bind(args.host, args.port)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    counter = _CompileCounter()
    try:
        started = time.perf_counter()
        served, worker = _load(args)
        worker.start()
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError, HFError included
        sock.close()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    counter.armed = True
    served.compilations = lambda: counter.count
    policy = Policy.from_flags(args.api_key, args.allowed_origins, args.host)
    app = build_app(served, on_shutdown=worker.stop, policy=policy)
    if policy.warning():
        print(policy.warning(), file=sys.stderr, flush=True)
    warm_up = time.perf_counter() - started
    return serve_app(app, sock, worker, drain_timeout=args.drain_timeout, log_level=args.log_level,
                     banner=lambda address: f"serving {served.name} on http://{address}/v1 (warm-up {warm_up:.1f} s)")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (connections are refused until
    the server is ready); UserError naming --host or --port if it cannot be had."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} must be in [0, 65535] (0: any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} is not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT sockets
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: {e.strerror}: choose another --port (or stop the process "
                        "using it)") from None
    return sock


def serve_app(app, sock: socket.socket, worker, *, drain_timeout: float, log_level: str = "warning",
              banner: Callable[[str], str] = "serving on http://{}".format,
              header_timeout: float = HEADER_TIMEOUT_S) -> int:
    """Serve `app` on the bound `sock` until a signal (see the module docstring);
    `banner(host:port)` is printed once it listens. Returns the exit status: 0, or
    EXIT_ENGINE_FAILED when `worker.failure` was set."""
    import uvicorn

    from flaxformer_lite.runtime.host import ServingHeap

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on",
                            http=_header_timeout_protocol(header_timeout))
    server = _draining_server(config, worker, drain_timeout, banner, sock, ServingHeap())
    server.run(sockets=[sock])
    failure = getattr(worker, "failure", None)
    if failure:
        print(f"error: the engine stopped ({failure}); exiting for a supervisor to restart the server",
              file=sys.stderr, flush=True)
        return EXIT_ENGINE_FAILED
    return 0


def _header_timeout_protocol(seconds: float):
    """uvicorn's HTTP protocol class, closing a connection that has not sent a whole
    request's headers `seconds` after it opened or after its last response: uvicorn
    itself waits for them forever (slowloris clients hold sockets open)."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    base = import_from_string(HTTP_PROTOCOLS["auto"])

    class Protocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            # uvicorn makes a new cycle once a request's headers are in: the same cycle
            # when the timer fires means none came.
            self.loop.call_later(seconds, self._headers_due, self.cycle)

        def _headers_due(self, cycle) -> None:
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _draining_server(config, worker, drain_timeout: float, banner: Callable[[str], str], sock: socket.socket,
                     heap):
    """uvicorn's Server, whose first SIGTERM/SIGINT drains before it stops, and which stops
    when the engine dies (see module)."""
    import uvicorn

    class Server(uvicorn.Server):
        deadline = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                host, port = sock.getsockname()[:2]
                print(banner(f"[{host}]:{port}" if ":" in host else f"{host}:{port}"),
                      file=sys.stderr, flush=True)

        def handle_exit(self, sig, frame):
            # uvicorn's own handler would stop at once and re-raise the signal on exit.
            if self.deadline is None:
                self.deadline = time.monotonic() + drain_timeout
                worker.draining = True
                print(f"draining: {worker.busy()} requests in flight", file=sys.stderr, flush=True)
            else:  # a second signal: stop now
                self.should_exit = True
                self.force_exit = sig == signal.SIGINT

        async def on_tick(self, counter: int) -> bool:
            if counter % 10 == 0:  # uvicorn ticks every 0.1 s
                heap.poll()
            if getattr(worker, "failure", None):
                self.should_exit = True
            if self.deadline is not None and (worker.busy() == 0 or time.monotonic() > self.deadline):
                self.should_exit = True
            return await super().on_tick(counter)

    return Server(config)
