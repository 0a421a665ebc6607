"""`bench serve`: `flaxformer-lite serve` under N concurrent streaming clients over HTTP.

A server subprocess serves a random LLaMA-shaped model (default 4 layers, d_model 256,
byte tokenizer). The same requests (token-id prompts of mixed lengths, greedy, a fixed
number of new tokens each) are sent first one at a time, then by --clients concurrent
clients; each request streams with `logprobs=0`, so every token arrives as its own
event. Reported per phase: total new tokens/s, time to first token (TTFT) and
inter-token latency (ITL) p50/p99. A soak phase then sends --soak requests of mixed
prompt and completion lengths and reports the server's XLA compilations after warm-up
(from /health) and its resident memory every tenth of the way.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Model shape, server settings and workload of the serving benchmark."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per phase (one at a time, concurrent)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"),
                        help="prompt lengths are drawn uniformly from this range")
    parser.add_argument("--soak", type=int, default=1000,
                        help="requests of mixed lengths after the timed phases (0: skip): compilations and memory")
    parser.add_argument("--seed", type=int, default=0)


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else float("nan")


def _stream(port: int, prompt: list, max_tokens: int) -> dict:
    """One streamed completion: {'start', 'arrivals' [one per token], 'tokens'}."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "logprobs": 0, "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    arrivals, tokens = [], 0
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        n = len((choice.get("logprobs") or {}).get("tokens") or [])
        now = time.perf_counter()
        arrivals += [now] * n
        tokens += n
    conn.close()
    return {"start": start, "arrivals": arrivals, "tokens": tokens}


def _phase(port: int, prompts: list, max_tokens, clients: int) -> dict:
    """Run the requests with `clients` concurrent clients; their latency figures."""
    max_tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda a: _stream(port, *a), zip(prompts, max_tokens)))
    wall = time.perf_counter() - start
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:]) if b > a]
    # Tokens that arrive in one event (held back for a split character) count as one gap.
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "requests": len(prompts), "new_tokens": tokens, "wall_s": round(wall, 3),
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


def _start_server(args, port: int) -> subprocess.Popen:
    overrides = [f"model.d_model={args.d_model}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
                 f"model.num_kv_heads={args.heads}", f"model.d_ff={args.d_model * 11 // 4}",
                 f"model.max_len={args.max_len}", f"data.seq_len={args.max_len}"]
    command = [sys.executable, "-m", "flaxformer_lite", "serve", "--config", "llama_tiny", "--set", *overrides,
               "--port", str(port), "--max-batch", str(args.max_batch), "--max-len", str(args.max_len),
               "--chunk", str(args.chunk), "--max-queue", str(max(64, args.clients))]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "FLAXFORMER_LITE_COMPILATION_CACHE": "0"})
    proc.log = log
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"bench serve: the server exited {proc.returncode}:\n{log.read().decode()[-2000:]}")
        try:
            if _get(port, "/health").get("status") == "ok":
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("bench serve: the server did not start within 600 s")


def run_serve(args: argparse.Namespace) -> dict:
    """Start the server, run the phases, stop it (SIGTERM); print and return the figures."""
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
                          "start_s": round(time.perf_counter() - started, 1)}}
    try:
        _phase(port, prompts[: min(4, len(prompts))], args.new_tokens, 4)  # first-request effects
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
            results["soak"] = {"requests": args.soak, "compilations_after_warmup": health["compilations_after_warmup"],
                               "rss_mib": rss}
    finally:
        proc.terminate()
        results["server"]["exit_code"] = proc.wait(timeout=120)
    _report(results)
    return results


def _report(r: dict) -> None:
    m, s = r["model"], r["server"]
    print(f"bench serve: {m['layers']} layers, d_model {m['d_model']}; --max-batch {s['max_batch']} "
          f"--max-len {s['max_len']} --chunk {s['chunk']}; server ready in {s['start_s']} s")
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
