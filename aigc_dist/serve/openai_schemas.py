"""Bodies of the OpenAI-compatible routes (/v1/completions, /v1/chat/completions), their answers and
their errors, in the shapes of OpenAI's API reference.

What is refused, and how: a field of OpenAI's API this server cannot honour (logprobs, tools,
response_format, penalties, ...) is a 400 naming it (code `unsupported_parameter`), unless it is
sent at its neutral value (`"logprobs": false`, `"n": 1`, `"response_format": {"type": "text"}`):
a client that spells out a default is not refused, one that asks for something is never silently
served without it. Any other unknown field is a 400 too (`unknown_parameter`). `null` is absent
for every field, as OpenAI's clients send it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from aigc_dist.engine.text import TextResult
from aigc_dist.serve.schemas import (
    MAX_NEW_TOKENS_CEILING,
    MAX_REQUESTS_CEILING,
    MAX_SEED,
    Body,
    Identifier,
    Personalization,
    Text,
    printable,
)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_STOP = 4  # OpenAI's bound on stop sequences (the engine's too)
MAX_STOP_CHARS = 256  # a stop string is held back while it may be starting: keep what is held short
# OpenAI fields no route here can honour, with the values that ask for nothing (accepted and dropped).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (False, True),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "store": (False,), "metadata": ({},),
    "service_tier": ("auto", "default"),
}
# Fields of one route sent to the other: named in the error, so a client that swapped URLs is told.
ONLY_ON = {"prompt": COMPLETIONS, "messages": CHAT, "max_completion_tokens": CHAT}

StopString = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)]


class StreamOptions(Body):
    include_usage: bool = Field(False, description="A last chunk, before `data: [DONE]`, with the call's usage.")


class Aigc(Personalization):
    """The personalization extension: the user and the item the prompt is rendered from, by the artifact's
    own prompt template, exactly as /v1/generate and the backfill render it (same seed -> same copy)."""


class OpenAIBody(Body):
    """Fields both routes share."""

    model: Identifier = Field(description="The served model's id from GET /v1/models (its name, or name:version).")
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CEILING,
                                   description="New tokens at most; default: the server's default_max_new_tokens.")
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                      description="Default 0.8, as /v1/generate; 0 = greedy.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CEILING, description="Extension: top-k sampling.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Default 0, as /v1/generate. Choice i uses seed + i.")
    stop: Stop | None = Field(None, description="Up to 4 strings; the text ends before one.")
    n: int = Field(1, ge=1, le=MAX_REQUESTS_CEILING, description="Choices (within serve.max_requests_per_call).")
    user: Identifier | None = Field(None, description="OpenAI's end-user tag: accepted, it does not change the text.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    aigc: Aigc | None = Field(None, description="Personalization: render the prompt from this user and item.")

    @model_validator(mode="before")
    @classmethod
    def _neutral_fields(cls, data: Any) -> Any:
        """Drop nulls and unsupported fields at their neutral value; a non-neutral one stays, for
        `extra="forbid"` to refuse naming it (its message says it is unsupported: `openai_error`)."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items()
                if value is not None and not (key in UNSUPPORTED and _is_neutral(key, value))}

    @model_validator(mode="after")
    def _consistent(self) -> OpenAIBody:
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "stream_options is only allowed when stream is true")
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise _field_error("seed", f"seed + n - 1 must be <= {MAX_SEED} (choice i uses seed + i)")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(OpenAIBody):
    prompt: Text | list[Text] | None = Field(None, description="Text to continue (a list: one set of n choices "
                                             "per prompt); absent or empty when `aigc` is given.")


class TextPart(Body):
    type: Literal["text"]
    text: Text


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatBody(OpenAIBody):
    messages: list[ChatMessage] = Field(default_factory=list, max_length=MAX_REQUESTS_CEILING,
                                        description="The conversation; absent or empty when `aigc` is given.")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CEILING, description="As max_tokens.")


def _is_neutral(key: str, value: Any) -> bool:
    return any(type(value) is type(neutral) and value == neutral for neutral in UNSUPPORTED[key])


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.code, self.kind)


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _field_error(param: str, message: str) -> ValueError:
    # Raised in an "after" validator, pydantic's error has no location: the message starts with the field,
    # which `validation_error` takes as the param.
    return ValueError(f"{param}: {message}")


def _param(loc: list[Any]) -> str | None:
    """["body", "messages", 0, "content"] -> "messages[0].content" (OpenAI's way of naming a nested field)."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "list[str]", "function-after[_encodable(), str]") or "[" in str(part):
            continue  # the union member pydantic tried: not a field
        else:
            name += f".{part}" if name else str(part)
    return name or None


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """FastAPI's validation errors of an OpenAI route as OpenAI's 400 (it uses 400 for bad parameters):
    the first problem's field as `param`, the first few problems in the message."""
    problems = []
    for error in errors:
        param, kind = _param(list(error.get("loc", ()))), str(error.get("type"))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "extra_forbidden" and param and param.isidentifier():
            message = _unknown_field_message(param)
        head, colon, rest = message.partition(": ")
        if kind == "value_error" and param is None and colon and head.isidentifier():
            param, message = head, rest  # from an "after" validator of the whole body (`_field_error`)
        problems.append((None if kind == "json_invalid" else param, kind, message))
    param, kind, _ = problems[0]
    code = {"extra_forbidden": "unsupported_parameter" if param in UNSUPPORTED else "unknown_parameter",
            "missing": "missing_required_parameter", "json_invalid": "invalid_json"}.get(kind, "invalid_value")
    message = "; ".join(f"{where}: {text}" if where else text for where, _, text in problems[:5])
    if len(problems) > 5:
        message += f" (and {len(problems) - 5} more problems)"
    return OpenAIError(400, printable(message), param=printable(param) if param else None, code=code)


def _unknown_field_message(name: str) -> str:
    if name in UNSUPPORTED:
        neutral = UNSUPPORTED[name]
        allowed = f" (only {json.dumps(neutral[0])} is accepted)" if neutral else ""
        return f"{name} is not supported by this server{allowed}"
    if name in ONLY_ON:
        return f"{name} belongs to {ONLY_ON[name]}"
    return f"Unrecognized request argument supplied: {name}"


# -- answers ----------------------------------------------------------------------------------------


def finish_reason(result: TextResult) -> str:
    # "cancelled" never reaches a client: only a client that has gone cancels its request.
    return "length" if result.finish_reason == "length" else "stop"


def usage(results: list[TextResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.num_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_choice(index: int, result: TextResult, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None, "finish_reason": finish_reason(result)}
    return {"index": index, "text": result.text, "logprobs": None, "finish_reason": finish_reason(result)}


class Envelope(BaseModel):
    """What every answer and chunk of one call repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str  # the artifact's digest: the same seed gives the same text under the same one

    def answer(self, chat: bool, choices: list[dict[str, Any]], results: list[TextResult]) -> dict[str, Any]:
        return {**self.model_dump(), "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage(results)}

    def chunk(self, chat: bool, choices: list[dict[str, Any]], with_usage: bool,
              usage_value: dict[str, int] | None = None) -> str:
        """One server-sent event of a stream."""
        body: dict[str, Any] = {**self.model_dump(), "object": "chat.completion.chunk" if chat else "text_completion",
                                "choices": choices}
        if with_usage:
            body["usage"] = usage_value
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def delta_choice(index: int, chat: bool, text: str | None, reason: str | None = None,
                 role: bool = False) -> dict[str, Any]:
    """A chunk's choice: for chat a `delta` (role first, then content, then an empty one with the reason)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}


DONE = "data: [DONE]\n\n"
