"""ASGI middleware of the ingress: the body's size and time limits, Serve's proxy-control headers,
per-route request metrics.

They read their settings from `app.state` (set by the replica when it starts), because the FastAPI
app is a module-level object the deployment class is bound to, while the limits come from config.

Where the body is read: Serve's HTTP proxy does not buffer it. It hands the request to a replica as
soon as the headers are in, and the replica pulls the body from the proxy message by message while
the ASGI app awaits `receive()`. So a client that trickles its body holds one of the replica's
`max_ongoing_requests` slots, and the bound belongs here, in the replica, around those `receive()`s.
"""

from __future__ import annotations

import asyncio
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
OPENAI_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})  # whose errors are in OpenAI's shape
KNOWN_ROUTES = frozenset({"/v1/generate", "/v1/images", "/v1/models", "/healthz", "/openapi.json", "/docs",
                          *OPENAI_ROUTES})


def route_of(scope: Scope) -> str:
    """The request's path within the app (after Serve's route prefix)."""
    return scope.get("path", "").removeprefix(scope.get("root_path", "")) or "/"


async def _respond(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = (),
                   scope: Scope | None = None) -> None:
    """An error answer: {"detail": ...}, or OpenAI's {"error": {...}} on the OpenAI routes."""
    if scope is not None and route_of(scope) in OPENAI_ROUTES:
        body = json.dumps({"error": {"message": detail, "type": "invalid_request_error", "param": None,
                                     "code": None}}).encode()
    else:
        body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads a request body up to `app.state.max_body_bytes` and answers 413 beyond it, 408 when the
    whole of it has not arrived within `app.state.body_read_timeout_s`.

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
                    await _respond(send, 413, too_large, scope=scope)
                    return
            except ValueError:
                await _respond(send, 400, "Content-Length is not a number", scope=scope)
                return
        timeout_s = getattr(scope["app"].state, "body_read_timeout_s", None)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        await _respond(send, 413, too_large, scope=scope)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _respond(send, 408, f"request body not received within {timeout_s:g} s "
                           f"({size} bytes arrived)", [(b"connection", b"close")], scope)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# Headers by which a client steers Serve's proxy (ray.serve._private.http_util): a non-positive or large
# timeout lifts serve.request_timeout_s, and "disconnect disabled" keeps a replica working for a caller
# that has gone. Nothing in Ray sets them, so from a client they are refused.
PROXY_CONTROL_HEADERS = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")


class ProxyControlHeaderMiddleware:
    """400 for a request that carries one of Serve's proxy-control headers."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, _ in scope.get("headers") or []:
                if name in PROXY_CONTROL_HEADERS:
                    await _respond(send, 400, f"the {name.decode()} header steers Ray Serve's proxy and is not "
                                   "accepted from clients (this server sets its own timeouts)", scope=scope)
                    return
        await self.app(scope, receive, send)


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
        path = route_of(scope)
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
