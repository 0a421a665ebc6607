"""GET /metrics: the server's counters in Prometheus' text format (prometheus-client).

    ffl_requests_total{route, status}        HTTP requests answered
    ffl_prompt_tokens_total, ffl_completion_tokens_total
    ffl_queue_length, ffl_running_slots      the engine's, read at each scrape
    ffl_time_to_first_token_seconds          request arrival to its first token event
    ffl_inter_token_latency_seconds          between a sequence's token events, per token
    ffl_engine_step_seconds                  between the engine's successive bursts of token events

The engine is not instrumented: its step time is read off the events it emits, one burst
per step (every running sequence's tokens at once), so the gap from one burst to the next
is one engine iteration (a decode step, plus a prefill chunk where one ran).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
          "/openapi.json")
_LATENCY = (.005, .01, .02, .04, .06, .08, .1, .15, .2, .3, .5, .75, 1, 2, 5, 10, 30)
_BURST_GAP_S = 0.002  # token events closer than this come from one engine step
_IDLE_S = 1.0  # a longer gap between bursts is an idle engine, not a step


class Metrics:
    """One server's collectors, in a registry of its own (several apps may share a process)."""

    def __init__(self, served):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ffl_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("ffl_prompt_tokens", "prompt tokens of finished sequences", registry=r)
        self.completion_tokens = Counter("ffl_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("ffl_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("ffl_inter_token_latency_seconds", "time between a sequence's tokens",
                             buckets=_LATENCY, registry=r)
        self.step = Histogram("ffl_engine_step_seconds", "one engine iteration, from its token events",
                              buckets=_LATENCY, registry=r)
        engine = served.engine
        if engine is not None and hasattr(engine, "queued"):
            Gauge("ffl_queue_length", "sequences waiting for a slot", registry=r).set_function(engine.queued)
            Gauge("ffl_running_slots", "sequences in a slot", registry=r).set_function(
                lambda: engine.busy() - engine.queued())
        self._burst_start = self._last_event = None

    def sequence(self, arrived: float) -> "SequenceClock":
        return SequenceClock(self, arrived)

    def engine_event(self, now: float) -> None:
        """One token event, on the engine's thread: times the engine's steps."""
        last = self._last_event
        self._last_event = now
        if last is not None and now - last < _BURST_GAP_S:
            return  # the same burst
        if self._burst_start is not None and last is not None and now - last < _IDLE_S:
            self.step.observe(now - self._burst_start)
        self._burst_start = now

    def finished(self, event: dict) -> None:
        self.prompt_tokens.inc(event.get("prompt_tokens") or 0)
        self.completion_tokens.inc(event.get("completion_tokens") or 0)

    def exposition(self) -> tuple[bytes, str]:
        """(the text format, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SequenceClock:
    """Time to first token and the gaps after it, for one sequence."""

    def __init__(self, metrics: Metrics, arrived: float):
        self.metrics, self.last = metrics, arrived
        self.first = True

    def token(self, event: dict) -> None:
        now = time.perf_counter()
        self.metrics.engine_event(now)
        if self.first:
            self.metrics.ttft.observe(now - self.last)
            self.first = False
        else:
            self.metrics.itl.observe((now - self.last) / max(1, len(event.get("tokens") or ()) or 1))
        self.last = now


class RequestCounter:
    """ASGI middleware counting responses by route and status (other paths as 'other')."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
