"""`bench serve`: `flaxformer-lite serve` under N concurrent streaming clients over HTTP.

A server subprocess serves a random LLaMA-shaped model (default 4 layers, d_model 256,
byte tokenizer). The same requests (token-id prompts of mixed lengths, greedy, a fixed
number of new tokens each) are sent first one at a time, then by --clients concurrent
clients; each request streams with `logprobs=0`, so every token arrives as its own
event. Reported per phase: total new tokens/s, time to first token (TTFT) and
inter-token latency (ITL) p50/p99. A soak phase then sends --soak requests of mixed
prompt and completion lengths and reports the server's XLA compilations after warm-up
(from /health) and its resident memory every tenth of the way.

`--abuse SECONDS` measures instead what bad requests cost the others: --clients clean
streaming clients send the same greedy requests for SECONDS, first alone, then while
one request a second is malformed (truncated JSON), oversized (a 20 MB prompt) or
pathological (10,000 stop strings, top_k 2**32), in turn. Reported: the clean clients'
ITL p99 in both phases and their ratio, whether every clean reply equals the first
reply to its prompt, the HTTP status of each abusive kind, the server's RSS every five
seconds (the last after 3 s of quiet), and whether it still answers /health.

`--json-schema ROUNDS` measures instead what structured output costs: the concurrent
phase's requests, in ROUNDS alternating rounds without and with a `response_format`
JSON schema (BENCH_SCHEMA: free text inside the JSON, so replies run to --new-tokens),
and reports the tokens/s of each and their ratio.

`--shared-prefix TOKENS` measures instead what the prefix cache saves: --rounds pairs of
requests, one at a time, whose prompts share a new random prefix of TOKENS tokens and
differ in their last 16; the first of a pair computes the prefix (a miss), the second
reads it from the cache (a hit). Reported: the median time to first token of each and
their ratio, and the prompt tokens the server's usage reports as cached.

`--adapters N` measures instead what serving many LoRA adapters costs: N random PEFT
adapters of mixed ranks (ADAPTER_RANKS in turn) on every projection of the model are
loaded through POST /v1/load_lora_adapter into a server started with --max-adapters N;
then --rounds alternating rounds of the concurrent phase, once on the base alone and once
with the requests naming the adapters round-robin (every batch mixes them). Reported:
the tokens/s of each, their ratio, and the compilations after warm-up.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import itertools
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

ABUSE_KINDS = ("malformed", "oversized", "pathological")
ADAPTER_RANKS = (8, 16, 4, 12)  # --adapters' ranks, in turn
BENCH_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "tags": {
    "type": "array", "items": {"type": "string"}}, "year": {"type": "integer"}}, "required": ["title", "tags", "year"]}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Model shape, server settings and workload of the serving benchmark."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--prefill-budget", type=int, metavar="TOKENS",
                        help="the server's --prefill-budget (default: the server's own)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per phase (one at a time, concurrent)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"),
                        help="prompt lengths are drawn uniformly from this range")
    parser.add_argument("--soak", type=int, default=1000,
                        help="requests of mixed lengths after the timed phases (0: skip): compilations and memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--abuse", type=float, default=0, metavar="SECONDS",
                        help="instead of the phases above: clean clients for SECONDS without, then with, one bad "
                        "request a second (malformed, 20 MB, 10,000 stop strings with top_k 2**32)")
    parser.add_argument("--against", choices=["transformers"],
                        help="instead: the same greedy chat requests, through the openai client, to this server and "
                        "to `transformers serve --continuous-batching` on one random SmolLM2-135M-Instruct-shaped "
                        "folder, in alternating rounds (needs fastapi: pip install fastapi)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="with --against: rounds, each server once per round; with --shared-prefix: pairs")
    parser.add_argument("--abuse-kinds", nargs="+", choices=ABUSE_KINDS, default=list(ABUSE_KINDS),
                        help="with --abuse: the kinds of bad request sent, in turn")
    parser.add_argument("--json-schema", type=int, default=0, metavar="ROUNDS",
                        help="instead of the phases above: the concurrent phase in ROUNDS alternating rounds without "
                        "and with a response_format JSON schema; tokens/s of each and their ratio")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                        help="instead of the phases above: --rounds pairs of prompts sharing a TOKENS-token prefix, "
                        "one at a time; time to first token of a miss and of a hit of the prefix cache")
    parser.add_argument("--adapters", type=int, default=0, metavar="N",
                        help="instead of the phases above: N random LoRA adapters of mixed ranks loaded while "
                        "serving, and --rounds alternating rounds of the concurrent phase on the base alone and on "
                        "the adapters round-robin; tokens/s of each and their ratio")


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else float("nan")


def _stream(port: int, prompt: list, max_tokens: int, extra: Optional[dict] = None) -> dict:
    """One streamed completion: {'start', 'arrivals' [one per token], 'tokens', 'text'};
    `extra` adds to the request's fields."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "logprobs": 0, "ignore_eos": True, **(extra or {})})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    arrivals, tokens, text, usage = [], 0, [], None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        if not chunk["choices"]:
            continue
        choice = chunk["choices"][0]
        n = len((choice.get("logprobs") or {}).get("tokens") or [])
        now = time.perf_counter()
        arrivals += [now] * n
        tokens += n
        text.append(choice.get("text") or "")
    conn.close()
    return {"start": start, "arrivals": arrivals, "tokens": tokens, "text": "".join(text), "usage": usage}


def _phase(port: int, prompts: list, max_tokens, clients: int, extra=None) -> dict:
    """Run the requests with `clients` concurrent clients; their latency figures.
    `max_tokens` and `extra` (fields added to the requests) are one for all or a list."""
    max_tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    extra = extra if isinstance(extra, list) else [extra] * len(prompts)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda a: _stream(port, *a), zip(prompts, max_tokens, extra)))
    return _figures(results, time.perf_counter() - start, clients)


def _figures(results: list, wall: float, clients: int) -> dict:
    """Throughput, TTFT and ITL of streamed results."""
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:]) if b > a]
    # Tokens that arrive in one event (held back for a split character) count as one gap.
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "requests": len(results), "new_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_ms": {"p50": round(1e3 * _percentile(ttft, 50), 2), "p99": round(1e3 * _percentile(ttft, 99), 2)},
        "itl_ms": {"p50": round(1e3 * _percentile(itl, 50), 2), "p99": round(1e3 * _percentile(itl, 99), 2)},
    }


def _get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _overrides(args) -> list:
    """The --set overrides of the served llama_tiny model."""
    return [f"model.d_model={args.d_model}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
            f"model.num_kv_heads={args.heads}", f"model.d_ff={args.d_model * 11 // 4}",
            f"model.max_len={args.max_len}", f"data.seq_len={args.max_len}"]


def _start_server(args, port: int) -> subprocess.Popen:
    adapters = ["--max-adapters", str(args.adapters), "--max-lora-rank",
                str(max(ADAPTER_RANKS[:args.adapters]))] if args.adapters else []
    command = [sys.executable, "-m", "flaxformer_lite", "serve", "--config", "llama_tiny", "--set", *_overrides(args),
               "--port", str(port), "--max-batch", str(args.max_batch), "--max-len", str(args.max_len),
               "--chunk", str(args.chunk), "--max-queue", str(max(64, args.clients)), *_budget(args), *adapters]
    return _launch(command, port, "/health", "the server", {"FLAXFORMER_LITE_COMPILATION_CACHE": "0"})


def _budget(args) -> list:
    """The server flag of --prefill-budget, if one was given."""
    return [] if args.prefill_budget is None else ["--prefill-budget", str(args.prefill_budget)]


def _last_error(proc: subprocess.Popen) -> str:
    """The last line of a server's log that names an error (else its last line)."""
    proc.log.seek(0)
    lines = proc.log.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
    return next((line for line in reversed(lines) if "Error" in line), lines[-1]).strip()


def _launch(command: list, port: int, ready: str, who: str, env: dict) -> subprocess.Popen:
    """Start a server subprocess; return it once GET `ready` answers 200 (SystemExit with
    the end of its log if it exits first or takes over 900 s)."""
    log = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    except OSError as e:
        raise SystemExit(f"bench serve: {who} cannot start ({command[0]}: {e.strerror})") from None
    proc.log = log
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench serve: {who} exited {proc.returncode} while starting: {_last_error(proc)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", ready)
            response = conn.getresponse()
            body, status = response.read(), response.status
            conn.close()
            if status == 200 and (ready != "/health" or json.loads(body).get("status") == "ok"):
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"bench serve: {who} did not start within 900 s")


def run_serve(args: argparse.Namespace) -> dict:
    """Start the server, run the phases, stop it (SIGTERM); print and return the figures."""
    if args.against:
        return run_against(args)
    rng = random.Random(args.seed)
    lo, hi = args.prompt_len
    if not 1 <= lo <= hi or hi + args.new_tokens > args.max_len:
        raise SystemExit(f"--prompt-len {lo} {hi} + --new-tokens {args.new_tokens} must fit --max-len {args.max_len}")
    # Byte tokenizer ids of printable ASCII, so the streamed text is plain.
    prompts = [[rng.randrange(35, 130) for _ in range(rng.randint(lo, hi))] for _ in range(args.requests)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    proc = _start_server(args, port)
    results = {"model": {"layers": args.layers, "d_model": args.d_model, "heads": args.heads},
               "server": {"max_batch": args.max_batch, "max_len": args.max_len, "chunk": args.chunk,
                          "prefill_budget": args.prefill_budget,
                          "start_s": round(time.perf_counter() - started, 1)}}
    try:
        _phase(port, prompts[: min(4, len(prompts))], args.new_tokens, 4)  # first-request effects
        if args.abuse:
            results["abuse"] = _abuse(port, proc, prompts, args, rng)
        elif args.json_schema:
            results["json_schema"] = _json_schema(port, prompts, args)
        elif args.shared_prefix:
            results["shared_prefix"] = _shared_prefix(port, args, rng)
        elif args.adapters:
            results["adapters"] = _adapters(port, prompts, args)
        else:
            results["one_at_a_time"] = single = _phase(port, prompts, args.new_tokens, 1)
            results["concurrent"] = many = _phase(port, prompts, args.new_tokens, args.clients)
            results["speedup"] = round(many["tokens_per_s"] / single["tokens_per_s"], 2)
            results["itl_p99_ratio"] = round(many["itl_ms"]["p99"] / single["itl_ms"]["p99"], 2)
            if args.soak:
                rss, done = [round(_rss_mib(proc.pid), 1)], 0
                step = max(1, args.soak // 10)
                while done < args.soak:
                    n = min(step, args.soak - done)
                    soak_prompts = [[rng.randrange(35, 130) for _ in range(rng.randint(1, args.max_len // 2))]
                                    for _ in range(n)]
                    soak_tokens = [rng.randint(1, 16) for _ in range(n)]
                    _phase(port, soak_prompts, soak_tokens, args.clients)
                    done += n
                    rss.append(round(_rss_mib(proc.pid), 1))
                health = _get(port, "/health")
                results["soak"] = {"requests": args.soak, "rss_mib": rss,
                                   "compilations_after_warmup": health["compilations_after_warmup"]}
    finally:
        proc.terminate()
        results["server"]["exit_code"] = proc.wait(timeout=120)
    _report(results)
    return results


def _json_schema(port: int, prompts: list, args) -> dict:
    """The concurrent phase in alternating rounds, free and under BENCH_SCHEMA: tokens/s of each."""
    constrained = {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": BENCH_SCHEMA}}}
    rounds = {"free": [], "json_schema": []}
    for _ in range(args.json_schema):
        for name, extra in (("free", {}), ("json_schema", constrained)):
            rounds[name].append(_phase(port, prompts, args.new_tokens, args.clients, extra))
    return {"rounds": args.json_schema, "clients": args.clients, **_round_totals(rounds, "json_schema", "free"),
            "compilations_after_warmup": _get(port, "/health")["compilations_after_warmup"]}


def _round_totals(rounds: dict, measured: str, reference: str) -> dict:
    """Tokens/s over all rounds of each kind ({kind: [phase figures]}), each round's, and
    the ratio of the measured kind's to the reference's."""
    totals = {name: (sum(p["new_tokens"] for p in phases), sum(p["wall_s"] for p in phases))
              for name, phases in rounds.items()}
    tokens_per_s = {name: round(tokens / wall, 1) for name, (tokens, wall) in totals.items()}
    return {"tokens_per_s": tokens_per_s, "new_tokens": {name: tokens for name, (tokens, _) in totals.items()},
            "per_round": {name: [p["tokens_per_s"] for p in phases] for name, phases in rounds.items()},
            "ratio": round(tokens_per_s[measured] / tokens_per_s[reference], 3)}


def _write_adapters(folder: pathlib.Path, args) -> list:
    """--adapters random PEFT folders for the served model (ADAPTER_RANKS in turn, alpha
    twice the rank, every projection): their paths."""
    import dataclasses

    import jax
    import numpy as np

    from flaxformer_lite.config import LoraConfig, load_config
    from flaxformer_lite.interop import peft
    from flaxformer_lite.layers import lora
    from flaxformer_lite.models import init_params

    cfg = load_config("llama_tiny", overrides=_overrides(args)).model
    rng = np.random.default_rng(args.seed)
    paths = []
    for i in range(args.adapters):
        rank = ADAPTER_RANKS[i % len(ADAPTER_RANKS)]
        adapted = dataclasses.replace(cfg, lora=LoraConfig(rank=rank, alpha=2.0 * rank, targets=tuple(lora.AXES)))
        shapes = lora.split(jax.eval_shape(lambda: init_params(adapted, jax.random.key(0))))[0]
        adapters = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes)
        paths.append(str(peft.save_adapters(adapted, adapters, folder / f"adapter{i}", model_type="llama")))
    return paths


def _post(port: int, path: str, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = response.read()
    conn.close()
    return response.status, reply


def _adapters(port: int, prompts: list, args) -> dict:
    """--adapters random adapters loaded while serving, then alternating rounds of the
    concurrent phase on the base and on the adapters round-robin: tokens/s of each."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(_write_adapters(pathlib.Path(tmp), args)):
            status, reply = _post(port, "/v1/load_lora_adapter", {"lora_name": f"adapter{i}", "lora_path": path})
            if status != 200:
                raise SystemExit(f"bench serve: loading adapter{i} failed: HTTP {status} {reply[:300]!r}")
    names = [f"adapter{i}" for i in range(args.adapters)]
    mixed = [{"model": names[i % len(names)]} for i in range(len(prompts))]
    _phase(port, prompts[:len(names)], args.new_tokens, len(names), mixed[:len(names)])  # first-request effects
    rounds = {"base": [], "adapters": []}
    for _ in range(args.rounds):
        rounds["base"].append(_phase(port, prompts, args.new_tokens, args.clients))
        rounds["adapters"].append(_phase(port, prompts, args.new_tokens, args.clients, mixed))
    return {"adapters": args.adapters, "ranks": [ADAPTER_RANKS[i % len(ADAPTER_RANKS)] for i in range(args.adapters)],
            "rounds": args.rounds, "clients": args.clients, **_round_totals(rounds, "adapters", "base"),
            "load_1m": round(os.getloadavg()[0], 2),
            "compilations_after_warmup": _get(port, "/health")["compilations_after_warmup"]}


def _shared_prefix(port: int, args, rng: random.Random) -> dict:
    """Pairs of prompts sharing a fresh prefix of --shared-prefix tokens: TTFT of the first
    (a miss) and the second (a hit), and the cached tokens the usage reports."""
    if args.shared_prefix + 16 + args.new_tokens > args.max_len:
        raise SystemExit(f"--shared-prefix {args.shared_prefix} + 16 + --new-tokens {args.new_tokens} must fit "
                         f"--max-len {args.max_len}")
    ttft, cached = {"miss": [], "hit": []}, {"miss": [], "hit": []}
    for _ in range(args.rounds):
        prefix = [rng.randrange(35, 130) for _ in range(args.shared_prefix)]
        for kind in ("miss", "hit"):
            r = _stream(port, prefix + [rng.randrange(35, 130) for _ in range(16)], args.new_tokens,
                        {"stream_options": {"include_usage": True}})
            ttft[kind].append(r["arrivals"][0] - r["start"])
            cached[kind].append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
    median = {kind: round(1e3 * _percentile(values, 50), 1) for kind, values in ttft.items()}
    return {"prefix_tokens": args.shared_prefix, "pairs": args.rounds, "ttft_ms_p50": median,
            "cached_tokens": cached, "ratio": round(median["miss"] / median["hit"], 2)}


def _clean_clients(port: int, prompts: list, new_tokens: int, clients: int, seconds: float) -> tuple[list, float]:
    """`clients` streaming clients going round `prompts` for `seconds`: ((prompt index,
    result or error text) per request, wall seconds)."""
    start = time.perf_counter()

    def client(k: int) -> list:
        done, i = [], k
        while time.perf_counter() - start < seconds:
            try:
                done.append((i % len(prompts), _stream(port, prompts[i % len(prompts)], new_tokens)))
            except (OSError, RuntimeError, http.client.HTTPException) as e:
                done.append((i % len(prompts), f"{type(e).__name__}: {e}"[:200]))
            i += clients
        return done

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(client, range(clients)) for r in rs]
    return done, time.perf_counter() - start


def _abusive_bodies(rng: random.Random, new_tokens: int) -> dict:
    """The request body of each abusive kind."""
    stops = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(10_000)]
    return {
        "malformed": b'{"prompt": "hello", "max_tokens": 4, "stream": tr',
        "oversized": json.dumps({"prompt": "a" * 20_000_000, "max_tokens": 4}).encode(),
        "pathological": json.dumps({"prompt": [rng.randrange(35, 130) for _ in range(32)], "max_tokens": new_tokens,
                                    "temperature": 0.8, "top_k": 2**32, "stop": stops}).encode(),
    }


def _send(port: int, body: bytes) -> str:
    """The HTTP status of one POST /v1/completions of `body` (or the exception's name)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        conn.close()
        return str(response.status)
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__


def _abuse(port: int, proc, prompts: list, args, rng: random.Random) -> dict:
    """Clean clients alone, then beside one abusive request a second (see the module)."""
    clean, wall = _clean_clients(port, prompts, args.new_tokens, args.clients, args.abuse)
    bodies, statuses, rss = _abusive_bodies(rng, args.new_tokens), {k: [] for k in ABUSE_KINDS}, []
    stop = threading.Event()
    deadline = time.perf_counter() + args.abuse

    def abuser():  # one a second while the clean clients start requests
        senders = []
        for kind in itertools.cycle(args.abuse_kinds):
            if stop.wait(1.0) or time.perf_counter() > deadline:
                break
            sender = threading.Thread(target=lambda kind=kind: statuses[kind].append(_send(port, bodies[kind])))
            sender.start()
            senders.append(sender)
        for sender in senders:
            sender.join(timeout=300)

    def sampler():
        while not stop.wait(5.0):
            rss.append(round(_rss_mib(proc.pid), 1))

    rss.append(round(_rss_mib(proc.pid), 1))
    side = [threading.Thread(target=abuser), threading.Thread(target=sampler)]
    for t in side:
        t.start()
    abused, abused_wall = _clean_clients(port, prompts, args.new_tokens, args.clients, args.abuse)
    stop.set()
    for t in side:
        t.join()
    rss.append(round(_rss_mib(proc.pid), 1))
    time.sleep(3)  # the server hands freed memory back within a second or two of quiet
    rss.append(round(_rss_mib(proc.pid), 1))
    first = {}
    for i, r in clean + abused:
        if isinstance(r, dict):
            first.setdefault(i, r["text"])
    failed = [r for _, r in clean + abused if not isinstance(r, dict)]
    differ = sum(1 for i, r in clean + abused if isinstance(r, dict) and r["text"] != first[i])
    try:
        up = _get(port, "/health").get("status")
    except OSError as e:
        up = type(e).__name__
    alone = _figures([r for _, r in clean if isinstance(r, dict)], wall, args.clients)
    beside = _figures([r for _, r in abused if isinstance(r, dict)], abused_wall, args.clients)
    return {"seconds": args.abuse, "clean": alone, "abused": beside,
            "itl_p99_ratio": round(beside["itl_ms"]["p99"] / alone["itl_ms"]["p99"], 2),
            "clean_failed": failed[:5], "clean_failures": len(failed), "clean_replies_differing": differ,
            "abusive_statuses": {k: dict(collections.Counter(v)) for k, v in statuses.items() if v},
            "rss_mib": rss, "health_after": up}


def _report(r: dict) -> None:
    m, s = r["model"], r["server"]
    print(f"bench serve: {m['layers']} layers, d_model {m['d_model']}; --max-batch {s['max_batch']} "
          f"--max-len {s['max_len']} --chunk {s['chunk']}; server ready in {s['start_s']} s")
    if "abuse" in r:
        a = r["abuse"]
        for name in ("clean", "abused"):
            p = a[name]
            print(f"  {name:>6}: {p['clients']} clients for {a['seconds']:.0f} s, {p['requests']} requests, "
                  f"{p['tokens_per_s']:.1f} tokens/s; ITL p50 {p['itl_ms']['p50']:.1f} p99 {p['itl_ms']['p99']:.1f} ms")
        print(f"  ITL p99 abused / clean: {a['itl_p99_ratio']}x; clean replies differing from the first to their "
              f"prompt: {a['clean_replies_differing']}; clean requests failed: {a['clean_failures']} {a['clean_failed']}")
        print(f"  abusive requests' HTTP status: {a['abusive_statuses']}; server RSS MiB {a['rss_mib']}; "
              f"/health after: {a['health_after']}")
    if "json_schema" in r:
        j = r["json_schema"]
        print(f"  {j['clients']} clients, {j['rounds']} alternating rounds: free {j['tokens_per_s']['free']} tokens/s "
              f"{j['per_round']['free']}, JSON schema {j['tokens_per_s']['json_schema']} tokens/s "
              f"{j['per_round']['json_schema']}; ratio {j['ratio']}x; tokens {j['new_tokens']}; compilations after "
              f"warm-up {j['compilations_after_warmup']}")
    if "shared_prefix" in r:
        x = r["shared_prefix"]
        print(f"  {x['pairs']} pairs sharing a {x['prefix_tokens']}-token prefix, one at a time: TTFT p50 miss "
              f"{x['ttft_ms_p50']['miss']} ms, hit {x['ttft_ms_p50']['hit']} ms: {x['ratio']}x lower on a hit; "
              f"cached prompt tokens {x['cached_tokens']}")
    if "adapters" in r:
        a = r["adapters"]
        print(f"  {a['clients']} clients, {a['rounds']} alternating rounds: base alone {a['tokens_per_s']['base']} "
              f"tokens/s {a['per_round']['base']}, {a['adapters']} adapters of ranks {a['ranks']} round-robin "
              f"{a['tokens_per_s']['adapters']} tokens/s {a['per_round']['adapters']}; ratio {a['ratio']}x; "
              f"load {a['load_1m']}; compilations after warm-up {a['compilations_after_warmup']}")
    if "concurrent" not in r:
        print(f"  server exit code after SIGTERM: {s.get('exit_code')}")
        return
    for name in ("one_at_a_time", "concurrent"):
        p = r[name]
        print(f"  {name:>13}: {p['clients']:>2} clients, {p['requests']} requests, {p['new_tokens']} tokens in "
              f"{p['wall_s']:.2f} s = {p['tokens_per_s']:.1f} tokens/s; TTFT p50 {p['ttft_ms']['p50']:.1f} "
              f"p99 {p['ttft_ms']['p99']:.1f} ms; ITL p50 {p['itl_ms']['p50']:.1f} p99 {p['itl_ms']['p99']:.1f} ms")
    print(f"  concurrent / one at a time: {r['speedup']}x tokens/s; ITL p99 ratio {r['itl_p99_ratio']}x")
    if "soak" in r:
        k = r["soak"]
        print(f"  soak: {k['requests']} requests of mixed lengths, {k['compilations_after_warmup']} compilations "
              f"after warm-up; server RSS MiB {k['rss_mib']}")
    print(f"  server exit code after SIGTERM: {s['exit_code']}")


# ------------------------------------------------------------ --against transformers

# SmolLM2-135M-Instruct's config.json: the shape of the model both servers load.
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0 to 3; 0 to 2 as in SmolLM2
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _write_chat_folder(folder, seed: int) -> list:
    """An HF folder of SmolLM2-135M-Instruct's shape with random weights and a word-level
    tokenizer whose every id is a word ("w17"), so each generated token is text; returns
    the words. The special tokens' embeddings are zero: their logit is 0 against the
    thousands of positive ones, so greedy decoding never ends early on either server."""
    import tokenizers
    import torch
    import transformers

    words = [f"w{i}" for i in range(SMOLLM2_135M["vocab_size"] - len(SPECIALS))]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS[:3])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}))
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**SMOLLM2_135M, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:3] = 0
    model.save_pretrained(folder)
    return words


def _chat(port: int, model: str, content: str, max_tokens: int) -> dict:
    """One streamed greedy chat completion through the openai client: {'start', 'first'
    (the first content's arrival), 'end', 'tokens' (usage.completion_tokens)}."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=900, max_retries=0)
    start, first, tokens = time.perf_counter(), None, None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    client.close()
    return {"start": start, "first": first, "end": time.perf_counter(), "tokens": tokens}


def _chat_phase(port: int, model: str, prompts: list, max_tokens: int, clients: int) -> dict:
    """The prompts through `clients` concurrent clients: tokens/s and time to first token."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: _chat(port, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    counts = sorted({r["tokens"] for r in results})
    if counts != [max_tokens]:
        raise SystemExit(f"bench serve: {model} generated {counts} tokens per request, not {max_tokens}: "
                         "the comparison needs both servers to generate exactly --new-tokens")
    ttft = [r["first"] - r["start"] for r in results]
    return {"clients": clients, "requests": len(results), "tokens_per_s": round(len(results) * max_tokens / wall, 2),
            "ttft_ms_p50": round(1e3 * _percentile(ttft, 50), 1), "wall_s": round(wall, 2)}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_against(args: argparse.Namespace) -> dict:
    """`flaxformer-lite serve` against `transformers serve --continuous-batching` on one
    random SmolLM2-135M-Instruct-shaped folder, in alternating rounds: see BENCHMARKS.md."""
    import importlib.util
    import shutil

    import openai

    theirs_cli = shutil.which("transformers")
    if theirs_cli is None or importlib.util.find_spec("fastapi") is None:
        raise SystemExit("bench serve: transformers serve cannot start here: it needs the transformers command and "
                         "fastapi (pip install transformers fastapi)")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "SmolLM2-135M-Instruct-random"
        words = _write_chat_folder(folder, args.seed)
        lo, hi = args.prompt_len
        prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(args.requests)]
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        ours_cmd = [sys.executable, "-m", "flaxformer_lite", "serve", "--hf", str(folder), "--port", str(ports[0]),
                    "--max-batch", str(args.max_batch), "--max-len", str(args.max_len), "--chunk", str(args.chunk),
                    "--max-queue", str(max(64, args.clients)), *_budget(args)]
        # Their KV cache holds what our pool holds (on a CPU it would take 60% of free memory).
        theirs_cmd = [theirs_cli, "serve", str(folder), "--continuous-batching", "--device", "cpu", "--dtype",
                      "float32", "--host", "127.0.0.1", "--port", str(ports[1]), "--cb-block-size", "32",
                      "--cb-num-blocks", str(-(-args.max_batch * args.max_len // 32))]
        servers, start_s = {}, {}
        try:  # theirs first: it starts sooner, and a failure there costs no compilation of ours
            for name, who, command, port, ready, model in (
                    ("transformers", "transformers serve", theirs_cmd, ports[1], "/v1/models", str(folder)),
                    ("ours", "flaxformer-lite serve", ours_cmd, ports[0], "/health", folder.name)):
                started = time.perf_counter()
                servers[name] = (_launch(command, port, ready, who, {}), port, model)
                start_s[name] = round(time.perf_counter() - started, 1)

            def phase(name: str, some: list, clients: int) -> dict:
                proc, port, model = servers[name]
                try:
                    return _chat_phase(port, model, some, args.new_tokens, clients)
                except openai.APIError as e:
                    why = f"exited {proc.returncode}: {_last_error(proc)}" if proc.poll() is not None else e
                    raise SystemExit(f"bench serve: {name} failed a request ({why})") from None

            for name in servers:  # first-request effects
                phase(name, prompts[:2], 2)
            rounds = []
            for _ in range(args.rounds):
                for name in servers:
                    idle = {n: _cpu_seconds(p.pid) for n, (p, _, _) in servers.items() if n != name}
                    row = {"server": name, "load_1m": round(os.getloadavg()[0], 2),
                           "one_at_a_time": phase(name, prompts, 1), "concurrent": phase(name, prompts, args.clients)}
                    row["idle_cpu_s"] = {n: round(_cpu_seconds(servers[n][0].pid) - c, 2) for n, c in idle.items()}
                    rounds.append(row)
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
            for proc, _, _ in servers.values():
                proc.wait(timeout=120)
    results = {"against": "transformers", "model": "SmolLM2-135M-Instruct shape, random weights, float32",
               "requests": args.requests, "new_tokens": args.new_tokens, "clients": args.clients,
               "server": {"max_batch": args.max_batch, "max_len": args.max_len, "chunk": args.chunk,
                          "start_s": start_s},
               "rounds": rounds}
    for phase in ("one_at_a_time", "concurrent"):
        best = {n: max(r[phase]["tokens_per_s"] for r in rounds if r["server"] == n) for n in servers}
        results[f"{phase}_ratio"] = round(best["ours"] / best["transformers"], 2)
    _report_against(results)
    return results


def _report_against(r: dict) -> None:
    s = r["server"]
    print(f"bench serve --against transformers: {r['model']}; {r['requests']} chat requests of {r['new_tokens']} "
          f"greedy tokens per phase; ours --max-batch {s['max_batch']} --max-len {s['max_len']} --chunk {s['chunk']} "
          f"(ready in {s['start_s']['ours']} s), transformers serve --continuous-batching "
          f"(ready in {s['start_s']['transformers']} s)")
    for row in r["rounds"]:
        one, many = row["one_at_a_time"], row["concurrent"]
        print(f"  {row['server']:>12}: alone {one['tokens_per_s']:.1f} tokens/s, TTFT p50 {one['ttft_ms_p50']:.0f} ms; "
              f"{many['clients']} concurrent {many['tokens_per_s']:.1f} tokens/s, TTFT p50 {many['ttft_ms_p50']:.0f} ms; "
              f"load {row['load_1m']}; the idle server's CPU meanwhile {row['idle_cpu_s']} s")
    print(f"  ours / transformers (best rounds): alone {r['one_at_a_time_ratio']}x, "
          f"{r['clients']} concurrent {r['concurrent_ratio']}x tokens/s")
