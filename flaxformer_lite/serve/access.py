"""Who may drive the server: API keys, the Host header, cross-origin pages.

    policy = Policy(api_keys=("sk-1",), allowed_origins=(), bound_host="127.0.0.1")
    app = build_app(served, policy=policy)   # serve/app.py puts `middleware(policy)` around the routes

- With keys, every route but /health needs `Authorization: Bearer KEY` (OpenAI's
  clients send their api_key so); keys are compared in constant time; a miss is a 401 in
  OpenAI's shape.
- Bound to a loopback address, the server answers only requests whose Host header names
  loopback (localhost, 127.0.0.1, [::1]): a page on another site that rebinds its DNS name
  to 127.0.0.1 sends its own name and is refused (DNS rebinding).
- No CORS headers unless `allowed_origins` names origins, so browsers keep other sites'
  pages from reading replies; the app takes only `application/json` bodies (415
  otherwise), which a browser does not send cross-origin without a preflight.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import os
from typing import Optional

API_KEY_ENV = "FLAXFORMER_LITE_API_KEY"
OPEN_PATHS = ("/health",)
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Policy:
    """The access rules of one server; the default checks nothing (an app used in-process)."""

    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    bound_host: Optional[str] = None  # the address served on; loopback turns on the Host check

    @classmethod
    def from_flags(cls, api_keys, allowed_origins, host: str) -> "Policy":
        """From `serve`'s flags, the environment's FLAXFORMER_LITE_API_KEY added to --api-key."""
        keys = list(api_keys or [])
        if os.environ.get(API_KEY_ENV):
            keys.append(os.environ[API_KEY_ENV])
        return cls(api_keys=tuple(keys), allowed_origins=tuple(allowed_origins or ()), bound_host=host)

    def warning(self) -> Optional[str]:
        """A line to print when the server is reachable from other machines with no key."""
        if self.bound_host is None or is_loopback(self.bound_host) or self.api_keys:
            return None
        return (f"warning: serving on {self.bound_host} with no API key: anyone who can reach this address can use "
                f"the model; pass --api-key KEY (or set {API_KEY_ENV}), or bind to 127.0.0.1 behind a reverse proxy")

    def host_allowed(self, host_header: str) -> bool:
        if self.bound_host is None or not is_loopback(self.bound_host):
            return True
        host = host_header.lower()
        if host.startswith("["):  # [::1]:8000
            host = host[:host.find("]") + 1]
        elif host.count(":") == 1:
            host = host.split(":")[0]
        return host in _LOOPBACK_NAMES

    def key_ok(self, authorization: str) -> bool:
        """Whether `Authorization: Bearer KEY` holds one of the keys, compared in constant time."""
        scheme, _, given = authorization.partition(" ")
        given_b = given.strip().encode()
        ok = False
        for key in self.api_keys:  # every key is compared, so the time says nothing about which matched
            ok |= hmac.compare_digest(given_b, key.encode())
        return ok and scheme.lower() == "bearer"


async def _refuse(send, status: int, message: str, kind: str, headers=()) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class HostCheck:
    """ASGI middleware: refuse a Host header that is not this loopback server's (400)."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.policy.host_allowed(host):
                await _refuse(send, 400, f"Host header {host!r} does not name this server, which listens on "
                              f"{self.policy.bound_host} only: use http://127.0.0.1:PORT or http://localhost:PORT",
                              "invalid_request_error")
                return
        await self.app(scope, receive, send)


class KeyCheck:
    """ASGI middleware: every path but OPEN_PATHS needs one of the policy's API keys (401)."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.policy.api_keys and scope["path"] not in OPEN_PATHS:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.policy.key_ok(authorization):
                message = ("no API key: send 'Authorization: Bearer KEY' (the openai client's api_key)"
                           if not authorization else "the API key is not one this server accepts")
                await _refuse(send, 401, message, "authentication_error", [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


def middleware(policy: Policy) -> list:
    """Starlette Middleware entries, outermost first: Host check, CORS (if origins), keys."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    out = [Middleware(HostCheck, policy=policy)]
    if policy.allowed_origins:
        # Outside the key check: a browser's preflight carries no Authorization header.
        out.append(Middleware(CORSMiddleware, allow_origins=list(policy.allowed_origins),
                              allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"]))
    out.append(Middleware(KeyCheck, policy=policy))
    return out
