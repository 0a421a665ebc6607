"""Who may drive the server: API keys (401 in OpenAI's shape, /health open), the Host
check on loopback (DNS rebinding), CORS only for named origins, the warning for an open
network bind, and `serve --help` showing every default."""

import argparse

import pytest
from serve_helpers import ScriptedEngine
from test_serve_protocol import COMPLETION, call

from flaxformer_lite.serve import access, app, commands


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    from flaxformer_lite.interop import hf

    return hf.load_tokenizer(hf_dir)


def _app(tokenizer, **policy):
    served = app.Served(name="m", tokenizer=tokenizer, max_len=64, engine=ScriptedEngine("ok"))
    return app.build_app(served, policy=access.Policy(**policy))


def test_api_keys_guard_every_route_but_health(tokenizer):
    application = _app(tokenizer, api_keys=("key-one", "key-two"))
    for headers in ({}, {"authorization": "Bearer key-three"}, {"authorization": "Basic key-one"}):
        response = call(application, "POST", "/v1/completions", body=COMPLETION, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert call(application, "GET", path).status_code == 401
    assert call(application, "GET", "/health").status_code == 200
    for key in ("key-one", "key-two"):
        ok = call(application, "POST", "/v1/completions", body=COMPLETION, headers={"authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"


def test_environment_key_joins_the_flags(monkeypatch):
    monkeypatch.setenv(access.API_KEY_ENV, "from-env")
    policy = access.Policy.from_flags(["from-flag"], [], "127.0.0.1")
    assert policy.api_keys == ("from-flag", "from-env")
    assert policy.key_ok("Bearer from-env") and not policy.key_ok("Bearer from")


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("localhost", True), ("[::1]:8000", True),
    ("attacker.example:8000", False), ("127.0.0.1.attacker.example", False),
])
def test_a_loopback_server_refuses_other_host_names(tokenizer, host, allowed):
    application = _app(tokenizer, bound_host="127.0.0.1")
    response = call(application, "GET", "/v1/models", headers={"host": host})
    assert response.status_code == (200 if allowed else 400)
    if not allowed:
        assert "Host header" in response.json()["error"]["message"]


def test_a_network_bind_checks_no_host_and_warns_without_a_key(tokenizer):
    application = _app(tokenizer, bound_host="0.0.0.0")
    assert call(application, "GET", "/v1/models", headers={"host": "server.example"}).status_code == 200
    assert "--api-key" in access.Policy(bound_host="0.0.0.0").warning()
    assert access.Policy(bound_host="0.0.0.0", api_keys=("k",)).warning() is None
    assert access.Policy(bound_host="127.0.0.1").warning() is None


def test_cors_only_for_named_origins(tokenizer):
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    closed = call(_app(tokenizer), "OPTIONS", "/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    named = _app(tokenizer, allowed_origins=("https://app.example",), api_keys=("k",))
    opened = call(named, "OPTIONS", "/v1/completions", headers=preflight)
    assert opened.status_code == 200 and opened.headers["access-control-allow-origin"] == "https://app.example"
    other = call(named, "OPTIONS", "/v1/completions", headers={**preflight, "origin": "https://evil.example"})
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_serve_help_shows_every_default():
    parser = argparse.ArgumentParser()
    commands.add_serve_arguments(parser)
    formatter = parser.formatter_class(prog="serve")
    missing = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"
               and "default" not in formatter._get_help_string(a)
               and a.dest not in ("workdir", "hf", "peft", "config")]  # the model's source: one is chosen
    assert not missing
    assert "(default: 4194304)" in parser.format_help().replace("\n", " ").replace("  ", " ")
