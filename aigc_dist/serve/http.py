"""ASGI middleware of the ingress: the body size limit and per-route request metrics.

Both read their settings from `app.state` (set by the replica when it starts), because the FastAPI
app is a module-level object the deployment class is bound to, while the limits come from config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The routes metrics are labelled with; anything else is "other", so a scan of random paths cannot
# create unbounded label values.
KNOWN_ROUTES = frozenset({"/v1/generate", "/v1/images", "/v1/models", "/healthz", "/openapi.json", "/docs"})


async def _respond(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads a request body up to `app.state.max_body_bytes` and answers 413 beyond it.

    The declared Content-Length is checked before anything is read; a chunked body is counted as it
    arrives. The buffered body is then replayed to the app, which sees an ordinary request.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        limit = getattr(scope["app"].state, "max_body_bytes", None)
        if limit is None:
            await self.app(scope, receive, send)
            return
        too_large = f"request body larger than {limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    await _respond(send, 413, too_large)
                    return
            except ValueError:
                await _respond(send, 400, "Content-Length is not a number")
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
                await _respond(send, 413, too_large)
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


class RequestMetricsMiddleware:
    """Counts answered requests by route and status, and observes their latency."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = getattr(scope["app"].state, "metrics", None) if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        route = path if path in KNOWN_ROUTES else "other"
        status = 500  # what the caller gets if the app fails before it starts a response

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            metrics.inc("aigc_requests_total", route=route, status=str(status))
            metrics.observe("aigc_request_latency_seconds", time.perf_counter() - started, route=route)
