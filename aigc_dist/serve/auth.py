"""Bearer-token authentication of the ingress (`serve.api_keys_env`), answered in OpenAI's error shape.

The keys come from an environment variable of the replica (comma- or newline-separated, so a
Kubernetes Secret's value works as it is mounted by `env.valueFrom.secretKeyRef` or `envFrom`).
They are read once when a replica starts, compared in constant time and never logged. /healthz
stays open: Kubernetes probes carry no key, and it tells nothing beyond the served models' names.
"""

from __future__ import annotations

import hmac
import json
import os

from aigc_dist.config import ConfigError
from aigc_dist.serve.http import ASGIApp, Receive, Scope, Send

# Paths answered without a key (after the app's route prefix): the liveness/readiness probe.
OPEN_PATHS = frozenset({"/healthz"})


def load_api_keys(env_name: str) -> tuple[bytes, ...]:
    """The keys in `$env_name`; a ConfigError naming the field and the variable when there are none,
    so a misconfigured server never starts open."""
    raw = os.environ.get(env_name)
    keys = tuple(dict.fromkeys(k.strip() for k in (raw or "").replace("\n", ",").split(",") if k.strip()))
    if not keys:
        state = "is not set" if raw is None else "holds no key"
        raise ConfigError(f"serve.api_keys_env names ${env_name}, which {state} in the replica's environment "
                          "(set it to one or more keys, comma- or newline-separated, or unset serve.api_keys_env)")
    return tuple(key.encode("utf-8") for key in keys)


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


def key_matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    """Whether `presented` is one of `keys`; every key is compared, each in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


async def _unauthorized(send: Send, message: str, code: str | None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b'Bearer realm="aigc-dist"')]})
    await send({"type": "http.response.body", "body": body})


class BearerAuthMiddleware:
    """401 for a request without one of `app.state.api_keys` (None: authentication is off).

    It runs before the body is read, so a caller without a key holds no replica slot for the body.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = getattr(scope["app"].state, "api_keys", None) if scope["type"] == "http" else None
        path = scope.get("path", "").removeprefix(scope.get("root_path", "")) or "/"
        if keys is None or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if presented is None:
            await _unauthorized(send, "Missing API key: send it as the header `Authorization: Bearer <key>`.", None)
        elif not key_matches(presented, keys):
            await _unauthorized(send, "Incorrect API key provided.", "invalid_api_key")
        else:
            await self.app(scope, receive, send)
