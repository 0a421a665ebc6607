"""The server's life: a dead engine is seen (/health 503, requests 503, exit 1), the
address is taken before the model loads (a bad or busy --port is exit 2 at once), and a
connection that never finishes its headers is closed."""

import queue
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
from serve_helpers import request

from flaxformer_lite.bench.serve import _rss_mib
from flaxformer_lite.inference.engine import Engine, EngineDead, SamplingParams
from flaxformer_lite.interop import hf
from flaxformer_lite.models import build_model
from flaxformer_lite.serve.app import Served, build_app
from flaxformer_lite.serve.commands import EXIT_ENGINE_FAILED, bind, serve_app


def _serve_in_thread(app, worker, **kwargs):
    """(url, thread, [exit status once it returns]) of serve_app on a free port."""
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = []
    thread = threading.Thread(target=lambda: result.append(serve_app(app, sock, worker, drain_timeout=1, **kwargs)))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            request(url + "/health", timeout=5)
            return url, thread, result
        except OSError:  # not listening yet
            time.sleep(0.05)
    raise TimeoutError("serve_app did not start")


def test_a_fault_in_the_engine_loop_fails_every_request_and_the_server_exits(hf_dir):
    """A fault injected into the loop's decode step: the running and the queued request
    get "error" events naming it, `failure` is set, submit and check raise EngineDead
    (503); over HTTP /health answers 503 "failed" and a new completion 503; the server
    then stops with exit status 1."""
    cfg, params = hf.load(hf_dir)
    tokenizer = hf.load_tokenizer(hf_dir)
    engine = Engine(build_model(cfg), params, tokenizer, max_batch=1, max_len=32, chunk=8, max_queue=4)
    engine.start()
    watched = types.SimpleNamespace(failure=None, draining=False, busy=engine.busy)  # the exit, held back
    app = build_app(Served(name="tiny", tokenizer=tokenizer, max_len=32, engine=engine), on_shutdown=engine.stop)
    url, thread, result = _serve_in_thread(app, watched)
    try:
        assert request(url + "/health")[0] == 200
        real, steps = engine._decode_step, []

        def broken():
            steps.append(1)
            if len(steps) > 2:
                raise RuntimeError("injected fault")
            real()

        engine._decode_step = broken
        events = queue.SimpleQueue()
        greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        for name in ("running", "queued"):  # one slot: the second waits
            engine.submit([5, 6, 7], greedy, lambda e, name=name: events.put((name, e)))
        done = {}
        while len(done) < 2:
            name, event = events.get(timeout=60)
            if event["type"] == "done":
                done[name] = event
        assert {e["finish_reason"] for e in done.values()} == {"error"}
        assert all("injected fault" in e["error"] for e in done.values())
        assert engine.failure == "RuntimeError: injected fault" and engine.busy() == 0
        with pytest.raises(EngineDead) as refused:
            engine.submit([5, 6, 7], greedy, events.put)
        assert refused.value.http_status == 503
        with pytest.raises(EngineDead):
            engine.check([5], greedy)
        status, _, body = request(url + "/health")
        assert status == 503 and body["status"] == "failed" and "injected fault" in body["error"]
        status, _, body = request(url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 503 and "restart" in body["error"]["message"]
        watched.failure = engine.failure
        thread.join(timeout=30)
        assert result == [EXIT_ENGINE_FAILED]
    finally:
        watched.failure = watched.failure or "test over"
        thread.join(timeout=30)
        engine.stop()


def test_a_connection_that_never_finishes_its_headers_is_closed():
    """Slowloris: a socket sending half a request line is closed after the header
    timeout, a whole request on another socket is answered, and a keep-alive connection
    gets the same timeout again after its response."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    app = Starlette(routes=[Route("/health", lambda r: JSONResponse({"status": "ok"}))])
    worker = types.SimpleNamespace(failure=None, draining=False, busy=lambda: 0)
    url, thread, result = _serve_in_thread(app, worker, header_timeout=0.5)
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: headers never end
            started = time.monotonic()
            assert slow.recv(100) == b""  # closed by the server
            assert 0.4 < time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert kept.recv(1000).startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's headers never end
            started = time.monotonic()
            assert kept.recv(100) == b""
            assert time.monotonic() - started < 5
        assert request(url + "/health")[0] == 200
    finally:
        worker.failure = "test over"
        thread.join(timeout=30)
    assert result == [EXIT_ENGINE_FAILED]


def _serve_command(tmp_path, port) -> subprocess.CompletedProcess:
    """serve with a missing --hf folder: an error about the port shows it came first."""
    return subprocess.run([sys.executable, "-m", "flaxformer_lite", "serve", "--hf", str(tmp_path / "missing"),
                           "--port", str(port)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("port", [99999, -1])
def test_a_bad_port_is_exit_2_before_the_model_loads(tmp_path, port):
    out = _serve_command(tmp_path, port)
    assert out.returncode == 2 and out.stderr.strip() == f"error: --port {port} must be in [0, 65535] (0: any free port)"


def test_a_busy_port_is_exit_2_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _serve_command(tmp_path, port)
    assert out.returncode == 2 and f"error: --host 127.0.0.1 --port {port}: Address already in use" in out.stderr
    assert "missing" not in out.stderr


def test_memory_of_refused_large_prompts_goes_back(hf_dir, monkeypatch):
    """Three 2 MB prompts, tokenized and refused (too long): the server's RSS comes back to
    within 200 MB of where it was (it kept 500 MB with the training malloc settings)."""
    import random

    from serve_helpers import Server

    from flaxformer_lite.runtime.host import TUNE_ENV

    monkeypatch.setenv(TUNE_ENV, "1")  # the tests' conftest turns the tuning off; serve's own is tested here
    server = Server(hf_dir, "--max-batch", "2", "--max-len", "64", "--chunk", "16").wait_ready()
    try:
        server.post("/v1/completions", {"prompt": "warm up", "max_tokens": 2})
        before = _rss_mib(server.proc.pid)
        rng = random.Random(0)
        for _ in range(3):
            text = "".join(rng.choices("abcdefghij klmnop", k=2_000_000))
            status, _, body = server.post("/v1/completions", {"prompt": text, "max_tokens": 2})
            assert status == 400 and "context" in body["error"]["message"]  # refused by characters or by tokens
        time.sleep(2.5)  # the server polls its heap every second
        assert _rss_mib(server.proc.pid) < before + 200
    finally:
        server.close()


def test_a_request_failed_by_a_dead_engine_is_a_503_and_its_own_fault_a_500():
    from flaxformer_lite.serve.app import _failure

    failed = [{"finish_reason": "error", "error": "RuntimeError: boom"}]
    dead = _failure(failed, types.SimpleNamespace(failure="RuntimeError: boom"))
    assert dead.http_status == 503 and dead.code == "engine_failed" and "boom" in dead.message
    alone = _failure(failed, types.SimpleNamespace(failure=None))
    assert alone.http_status == 500 and alone.code == "model_error"
    assert _failure([{"finish_reason": "stop"}], types.SimpleNamespace(failure=None)) is None
