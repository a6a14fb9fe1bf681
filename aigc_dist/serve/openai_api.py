"""OpenAI-compatible routes of the `AigcServe` deployment: POST /v1/completions and /v1/chat/completions,
non-streaming and streaming (server-sent events ending with `data: [DONE]`).

They are a mixin of the deployment (Serve's ingress finds routes of every class in its MRO), so they
use its engine, profile tables, limits, batching and metrics: a non-streaming choice goes through
the same `@serve.batch` method as a /v1/generate request and may share its forward passes.

What a request continues:
- completions: `prompt`, raw text;
- chat: `messages`, through the checkpoint's chat template. aigc-dist's own models have none (their
  prompts are rendered from user and item features): chat with `messages` on them is a 400 saying so;
- either route, with the extension `"aigc": {"user_id" | "user", "item_id" | "item"}`: the prompt
  /v1/generate renders for that pair, so the same seed and sampling give /v1/generate's (and the
  backfill's) copy. `prompt` / `messages` must then be absent or empty: they would not be used, and
  a field that is sent but not used is refused here rather than ignored.
Choice i of a request with n choices is decoded with seed + i, so choice 0 equals the same request
with n = 1.

Streaming: each choice is a `LiveRequest` on the replica's `LiveDecoder` (streams.py): it joins the
decode running on the engine's thread at its next step, whatever the other streams' progress, and its
deltas come back to its call's asyncio queue, from which the call's response sends them as chunks.
A client that disconnects is seen on ASGI's `receive` (`EventStream`): its call is marked cancelled,
the engine asks each step and ends that request there, freeing its slot (counted as
`text_finish_cancelled` in the stats). Non-streamed choices go through `@serve.batch` as /v1/generate's.
"""

# No `from __future__ import annotations`: FastAPI reads these route signatures at run time (see app.py).
import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from aigc_dist.config import ServeConfig
from aigc_dist.engine.live import FeedClosed, LiveRequest
from aigc_dist.engine.text import SamplingParams, TextDelta, TextEngine, TextRequest, TextResult
from aigc_dist.metrics import ActorMetrics
from aigc_dist.serve.openai_schemas import (
    CHAT,
    COMPLETIONS,
    DONE,
    ChatBody,
    CompletionBody,
    Envelope,
    OpenAIBody,
    OpenAIError,
    completion_choice,
    delta_choice,
    error_body,
    finish_reason,
    usage,
)
from aigc_dist.serve.profiles import InvalidProfileError, ProfileTable, UnknownIdError
from aigc_dist.serve.schemas import GenerateItem, ModelInfo, check_features, model_info
from aigc_dist.serve.streams import LiveDecoder

router = APIRouter()
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A bad or unsupported parameter; OpenAI's error shape, `param` names the field."},
    401: {"description": "Missing or wrong API key (when serve.api_keys_env is set)."},
    404: {"description": "`model` is not served here (code model_not_found), or an unknown user_id / item_id."},
    413: {"description": "Request body over the server's limit."},
    503: {"description": "Over capacity; retry after the Retry-After header's seconds."},
}
DEFAULT_TEMPERATURE = GenerateItem.model_fields["temperature"].default  # /v1/generate's, so both agree


@dataclass
class StreamCall:
    """One streamed HTTP call: its choices' deltas arrive on `queue` as (choice, delta), or (choice,
    exception) when the batch failed; `cancelled` once its client is gone."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False


class OpenAIRoutes:
    """The OpenAI routes of `AigcServe`; the attributes below are the deployment's."""

    text: TextEngine | None
    limits: ServeConfig
    users: ProfileTable
    items: ProfileTable
    stats: Counter[str]
    metrics: ActorMetrics
    live: LiveDecoder | None

    @router.post(COMPLETIONS, response_model=None, responses=OPENAI_ERRORS)
    async def completions(self, body: CompletionBody) -> JSONResponse | StreamingResponse:
        """OpenAI's completions: `prompt` (raw text) or the `aigc` extension; `stream: true` for SSE."""
        return await self._openai(body, chat=False)

    @router.post(CHAT, response_model=None, responses=OPENAI_ERRORS)
    async def chat_completions(self, body: ChatBody) -> JSONResponse | StreamingResponse:
        """OpenAI's chat completions: `messages` (the checkpoint's chat template) or the `aigc` extension."""
        return await self._openai(body, chat=True)

    async def _openai(self, body: OpenAIBody, chat: bool) -> JSONResponse | StreamingResponse:
        engine = self._served(body.model)
        requests, asks = self._choices(body, chat, engine)
        info = model_info(engine.artifact)
        envelope = Envelope(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                            model=body.model, system_fingerprint=f"{info.version}-{info.digest[:12]}")
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await self._stream(chat, envelope, engine, requests, asks, include_usage)
        results, _ = await self._decode_all("text", self._generate_batch, requests)
        _refuse_failed(results, asks)
        return JSONResponse(envelope.answer(chat, [completion_choice(i, r, chat) for i, r in enumerate(results)],
                                            results))

    def _served(self, model: str) -> TextEngine:
        """The text engine, if `model` names it (its name, or name:version); else OpenAI's 404."""
        engine = self.text
        info = model_info(engine.artifact) if engine is not None else None
        if engine is None or info is None or model not in (info.name, f"{info.name}:{info.version}"):
            served = f"; this server serves {info.name!r}" if info else " (no text model is served here)"
            raise OpenAIError(404, f"The model {model!r} does not exist{served}", param="model",
                              code="model_not_found")
        return engine

    def _choices(self, body: OpenAIBody, chat: bool, engine: TextEngine) -> tuple[list[TextRequest], str]:
        """The engine requests of a call, choice by choice (prompt-major for a list of prompts), and the
        field that says what they continue (the `param` of a refusal)."""
        asks = "messages" if chat else "prompt"
        max_field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        asked_tokens = body.max_completion_tokens if chat else None
        if asked_tokens is not None and body.max_tokens is not None and asked_tokens != body.max_tokens:
            raise OpenAIError(400, f"max_tokens={body.max_tokens} and max_completion_tokens={asked_tokens} "
                              "disagree; give one", param="max_tokens")
        max_new_tokens = asked_tokens or body.max_tokens or min(self.limits.default_max_new_tokens,
                                                                 self.limits.max_new_tokens_cap)
        if max_new_tokens > self.limits.max_new_tokens_cap:
            raise OpenAIError(400, f"{max_field} must be <= {self.limits.max_new_tokens_cap} (got {max_new_tokens})",
                              param=max_field)
        given = body.messages if isinstance(body, ChatBody) else body.prompt if isinstance(body, CompletionBody) \
            else None
        if body.aigc is not None:
            if given:
                raise OpenAIError(400, f"{asks} must be absent or empty when the aigc extension is given: the "
                                  "prompt is rendered from its user and item", param=asks)
            bases = [self._personalized(body)]
            asks = "aigc"
        elif isinstance(body, ChatBody):
            if not body.messages:
                raise OpenAIError(400, "messages: give at least one message (or the aigc extension)", param=asks)
            if engine.tokenizer.chat_template is None:
                raise OpenAIError(400, f"model {body.model!r} has no chat template: it renders its prompts from user "
                                  "and item features. Send the aigc extension ({\"aigc\": {\"user_id\": ..., "
                                  "\"item_id\": ...}}, messages empty), or a raw prompt to /v1/completions",
                                  param=asks, code="no_chat_template")
            bases = [{"messages": [{"role": m.role, "content": m.text} for m in body.messages]}]
        else:
            prompts = [given] if isinstance(given, str) else list(given or [])
            if not prompts:
                raise OpenAIError(400, "prompt: give a text (or a list of texts), or the aigc extension", param=asks)
            bases = [{"prompt": prompt} for prompt in prompts]
        count = len(bases) * body.n
        if count > self.limits.max_requests_per_call:
            raise OpenAIError(400, f"this call asks for {count} choices; at most {self.limits.max_requests_per_call} "
                              "per call", param="n")
        if count * max_new_tokens > self.limits.max_tokens_per_call:
            raise OpenAIError(400, f"this call asks for up to {count * max_new_tokens} new tokens ({count} choices x "
                              f"{max_field}={max_new_tokens}); the budget is {self.limits.max_tokens_per_call} per "
                              f"call: ask for fewer choices or a smaller {max_field}", param=max_field)
        sampling = SamplingParams(max_new_tokens=max_new_tokens, top_k=body.top_k, top_p=body.top_p,
                                  temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature)
        seed = body.seed or 0
        return [TextRequest(**base, seed=seed + i, sampling=sampling, stop=body.stops)
                for base in bases for i in range(body.n)], asks

    def _personalized(self, body: OpenAIBody) -> dict[str, Any]:
        """user and item features of the aigc extension, resolved as /v1/generate resolves them."""
        aigc = body.aigc
        assert aigc is not None
        for name in ("user_id", "item_id"):
            value = getattr(aigc, name)
            if value is not None and len(value) > self.limits.max_value_chars:
                raise OpenAIError(400, f"at most {self.limits.max_value_chars} characters (got {len(value)})",
                                  param=f"aigc.{name}")
        for side in ("user", "item"):
            problems = check_features(getattr(aigc, side), ["aigc", side], self.limits)
            if problems:
                where = ".".join(str(part) for part in problems[0]["loc"][1:])
                raise OpenAIError(400, f"{where}: {problems[0]['msg']}", param=where)
        try:
            return {"user": self.users.resolve(aigc.user_id, aigc.user),
                    "item": self.items.resolve(aigc.item_id, aigc.item)}
        except UnknownIdError as exc:
            raise OpenAIError(404, str(exc), param=f"aigc.{exc.side}_id", code="not_found") from None
        except InvalidProfileError as exc:
            raise OpenAIError(400, str(exc), param=f"aigc.{exc.side}_id") from None

    # -- streaming ------------------------------------------------------------------------------

    async def _stream(self, chat: bool, envelope: Envelope, engine: TextEngine, requests: list[TextRequest],
                      asks: str, include_usage: bool) -> StreamingResponse:
        """Put the choices on the live decode, wait for each one's first delta (so that a request the engine
        refuses is a 400 like a non-streamed one, not an error inside a 200), then stream."""
        call = StreamCall()
        loop = asyncio.get_running_loop()
        info = model_info(engine.artifact)

        def arrived(choice: int, delta: TextDelta | BaseException) -> None:  # on the loop
            call.queue.put_nowait((choice, delta))
            if isinstance(delta, TextDelta) and delta.result is not None:
                self._count_stream(info, delta.result)

        def deliver(choice: int) -> Any:
            return lambda delta: loop.call_soon_threadsafe(arrived, choice, delta)

        for choice, request in enumerate(requests):
            self._put_live(engine, LiveRequest(request, deliver(choice), lambda: call.cancelled))
        first: list[tuple[int, Any]] = []
        try:
            started: set[int] = set()
            while len(started) < len(requests):
                choice, delta = await call.queue.get()
                if isinstance(delta, BaseException):
                    raise delta
                first.append((choice, delta))
                started.add(choice)
        except BaseException:
            call.cancelled = True
            raise
        _refuse_failed([d.result for _, d in first if d.result is not None and d.result.error], asks, call)
        return EventStream(self._events(chat, envelope, call, first, len(requests), include_usage), call)

    def _put_live(self, engine: TextEngine, request: LiveRequest) -> None:
        """Put a request on the live decode of `engine`, starting one if there is none (the first stream,
        or after a swap of the model, which closed the one before: its streams end on the old engine)."""
        for _ in range(2):
            live = self.live
            if live is None or live.engine is not engine or not live.usable:
                if live is not None:
                    live.close()
                live = self.live = LiveDecoder(engine)
            try:
                live.put(request)
                return
            except FeedClosed:  # its loop failed a moment ago: a new one takes the request
                self.live = None
        raise RuntimeError("the live decode loop takes no requests")

    def _count_stream(self, info: ModelInfo, result: TextResult) -> None:
        """A streamed request's counters, once it ended (those of its decode steps: `live_stats`)."""
        self.stats["text_requests"] += 1
        if result.finish_reason:
            self.stats[f"text_finish_{result.finish_reason}"] += 1
        self.metrics.inc("aigc_generated_tokens_total", result.num_tokens, model=info.name)

    def live_stats(self) -> dict[str, int]:
        """The live decode's steps and the requests they decoded (rows / steps: its mean batch size)."""
        live = self.live
        return {"stream_steps": live.steps, "stream_rows": live.rows} if live is not None else {}

    async def _events(self, chat: bool, envelope: Envelope, call: StreamCall, first: list[tuple[int, Any]],
                      n: int, include_usage: bool) -> AsyncIterator[str]:
        results: dict[int, TextResult] = {}
        try:
            if chat:
                for choice in range(n):
                    yield envelope.chunk(chat, [delta_choice(choice, chat, None, role=True)], include_usage)
            while len(results) < n:
                choice, delta = first.pop(0) if first else await call.queue.get()
                if isinstance(delta, BaseException):  # the batch failed after the answer started: say so, no [DONE]
                    failure = error_body(f"generation failed: {delta!r}", kind="server_error")
                    yield f"data: {json.dumps(failure, separators=(',', ':'))}\n\n"
                    return
                if delta.text:
                    yield envelope.chunk(chat, [delta_choice(choice, chat, delta.text)], include_usage)
                if delta.result is not None:
                    results[choice] = delta.result
                    yield envelope.chunk(chat, [delta_choice(choice, chat, None, finish_reason(delta.result))],
                                         include_usage)
            if include_usage:
                yield envelope.chunk(chat, [], True, usage(list(results.values())))
            yield DONE
        finally:
            call.cancelled = True  # nothing more is read: any choice still decoding ends at its next step


class EventStream(StreamingResponse):
    """Server-sent events whose call is marked cancelled as soon as the client disconnects.

    The disconnect is read from ASGI's `receive` (Serve's replica hands on the proxy's
    `http.disconnect`, or makes one up once the proxy has dropped the request). Neither Serve's
    cancellation nor Starlette catches it here: Serve's `send` never fails, so Starlette (ASGI spec
    2.4) does not look, and the cancellation Serve sends after a disconnect reaches the app only when
    its wrapping generators are garbage-collected (measured: a 4,000-token stream ran on for seconds
    after its client had gone, its slot taken). Once marked, each choice ends at its next decode step.
    """

    def __init__(self, events: AsyncIterator[str], call: StreamCall):
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.call = call

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.call.cancelled = True

        watcher = asyncio.ensure_future(watch())
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            self.call.cancelled = True


def _refuse_failed(results: list[TextResult], asks: str, call: StreamCall | None = None) -> None:
    """A call whose choice the engine refused (a prompt over the context, a feature missing) is a 400 as a
    whole, as /v1/generate's 422: the first reason, with the field that asked for it."""
    failed = [r.error for r in results if r.error]
    if failed:
        if call is not None:
            call.cancelled = True
        raise OpenAIError(400, failed[0] if len(failed) == 1 else f"{failed[0]} (and {len(failed) - 1} more choices)",
                          param=asks)
