"""Prometheus metrics of the service and its two ASGI middlewares (timing, body limits).

Both middlewares are plain ASGI callables, not Starlette's ``BaseHTTPMiddleware``, which
adds a task and a memory stream to every request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Recommendation answers take ~1 ms; buckets resolve 0.25 ms .. 5 s.
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class ServiceMetrics:
    """The service's metrics in their own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "fedrec_edge_http_request_duration_seconds",
            "HTTP request latency by route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommend_seconds = Histogram(
            "fedrec_edge_recommend_duration_seconds",
            "Time to compute one recommendation (store read + inference), by source",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events = Counter(
            "fedrec_edge_events_total",
            "Events received, by outcome (accepted, duplicate, rejected)",
            ["outcome"],
            registry=r,
        )
        self.model_swaps = Counter(
            "fedrec_edge_model_swaps_total", "Model versions swapped in", registry=r
        )
        self.model_rejections = Counter(
            "fedrec_edge_model_rejections_total",
            "Model versions refused (corrupt, truncated, vocabulary mismatch, ...)",
            registry=r,
        )
        self.model_info = Gauge(
            "fedrec_edge_model_info",
            "1 for the model version being served (version=popularity when none)",
            ["version"],
            registry=r,
        )
        self.model_info.labels("popularity").set(1)
        self.store_events = Gauge(
            "fedrec_edge_store_events", "Events in the site's store", registry=r
        )
        self._served = "popularity"

    def serving(self, version: str | None) -> None:
        """Record which version is served now."""
        new = version or "popularity"
        if new != self._served:
            self.model_info.remove(self._served)
            self.model_info.labels(new).set(1)
            self._served = new

    def track_store(self, count: Callable[[], float]) -> None:
        """Read the store's event count at scrape time."""
        self.store_events.set_function(count)


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail, "errors": []}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse request bodies over a size limit with 413, before the app parses anything.

    A declared Content-Length over the limit is refused without reading the body; a body
    sent without one (chunked) is read up to the limit and refused as soon as it passes.
    Paths in ``larger`` (prefix -> limit) get their own limit (the bulk import).
    """

    def __init__(self, app: ASGIApp, limit: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.larger = larger or {}

    def _limit_for(self, path: str) -> int:
        for prefix, limit in self.larger.items():
            if path.startswith(prefix):
                return limit
        return self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared size, buffer the body up to the limit, then replay it."""
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope["path"])
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
                break
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if int(declared) > limit:
                await _send_json(
                    send,
                    413,
                    f"request body of {int(declared)} bytes exceeds the {limit}-byte limit",
                )
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_json(send, 413, f"request body exceeds the {limit}-byte limit")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class TimingMiddleware:
    """Observe every HTTP request's latency under its route template (not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request and record it under its route template and status."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - start
            )
