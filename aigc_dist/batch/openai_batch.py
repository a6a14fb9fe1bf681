"""OpenAI Batch files: a batch input file as the backfill's requests table, and OpenAI-shaped output.

Input (`data.requests_format = "openai_batch"`): each line of the `.jsonl` file is

    {"custom_id": "...", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body": {...}}

and becomes one request row: request_id = custom_id, sampling from the body (`parse_batch_line`).
A body asks for one of three things: `prompt` (completions: raw text), `messages` (chat: rendered
with the checkpoint's chat template) or the extension `aigc: {"user_id", "item_id"}` (either url:
the backfill's own prompt from the users and items tables, so the line gets the copy a candidates
backfill gives for the same pair and seed). A line that asks for anything the engine cannot do
(a field it does not know, n > 1, streaming, logprobs, tools, ...) is refused with the field named:
it is a row of errors/ like any other bad input, never a silent approximation.

Output (`backfill.output_format = "parquet+openai"`): beside data/ and errors/, each shard writes
`openai/output-SSSSS-ATTEMPT.jsonl` (a line per generated row) and `openai/errors-SSSSS-ATTEMPT.jsonl`
(a line per failed request whose custom_id is known) in the shape of OpenAI's batch output files
(`output_lines`), committed by the shard's one marker with its parquet files.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from aigc_dist.batch.records import printable
from aigc_dist.data.prompts import CHAT_ROLES

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LINE_FIELDS = ("custom_id", "method", "url", "body")
# Body fields that set the request: what it asks for and how to sample it.
_ASKS = {COMPLETIONS: "prompt", CHAT: "messages"}
_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
_INERT = {"model", "user"}  # the model is the run's artifact; `user` is OpenAI's end-user tag, not a feature
# OpenAI fields the engine has no use for, accepted at their neutral value only (null is always absent).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "stream": (False,), "logprobs": (False,), "echo": (False,), "best_of": (1,),
    "presence_penalty": (0,), "frequency_penalty": (0,), "parallel_tool_calls": (False,),
}
_ONLY = {COMPLETIONS: {"prompt", "echo", "best_of"}, CHAT: {"messages", "max_completion_tokens", "parallel_tool_calls"}}
MAX_STOP = 4  # OpenAI's own bound on stop sequences
MAX_TEMPERATURE = 2.0  # OpenAI's range


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _shown(value: Any) -> str:
    return printable(json.dumps(value, ensure_ascii=False, default=str)[:60])


def _sampling(body: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The body's sampling fields (None where it leaves one to the run's config), or why one is refused."""
    tokens = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    for name, value in tokens.items():
        if not _is_int(value) or not 1 <= value <= 4096:
            return {}, f"body.{name} must be an integer in [1, 4096] (got {_shown(value)})"
    if len(set(tokens.values())) > 1:
        return {}, f"body: max_tokens={tokens['max_tokens']} and max_completion_tokens=" \
                   f"{tokens['max_completion_tokens']} disagree; give one"
    out: dict[str, Any] = {"max_new_tokens": next(iter(tokens.values()), None)}
    temperature, top_p, top_k, seed = (body.get(k) for k in ("temperature", "top_p", "top_k", "seed"))
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        return {}, f"body.temperature must be a number in [0, {MAX_TEMPERATURE:g}] (got {_shown(temperature)})"
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        return {}, f"body.top_p must be a number in (0, 1] (got {_shown(top_p)})"
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        return {}, f"body.top_k must be an integer >= 1 (got {_shown(top_k)})"
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        return {}, f"body.seed must be an integer in [0, 2**63) (got {_shown(seed)})"
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        return {}, f"body.stop must be a string or a list of at most {MAX_STOP} non-empty strings (got {_shown(stop)})"
    out.update(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stops)
    return out, None


def _asked(body: Mapping[str, Any], url: str) -> tuple[dict[str, Any], str | None]:
    """What the line asks for: {"prompt"} (completions), {"messages"} (chat) or {"aigc"} (either)."""
    field, aigc = _ASKS[url], body.get("aigc")
    given = [name for name in (field, "aigc") if body.get(name) is not None]
    if len(given) != 1:
        return {}, f"body: give one of {field} and aigc (got {' and '.join(given) or 'neither'})"
    if aigc is not None:
        if not isinstance(aigc, dict) or set(aigc) != {"user_id", "item_id"}:
            return {}, "body.aigc must be an object of exactly user_id and item_id"
        if not all(isinstance(aigc[k], str) and aigc[k] for k in ("user_id", "item_id")):
            return {}, "body.aigc: user_id and item_id must be non-empty text"
        return {"aigc": {"user_id": aigc["user_id"], "item_id": aigc["item_id"]}}, None
    value = body[field]
    if field == "prompt":
        if not isinstance(value, str) or not value:
            return {}, "body.prompt must be one non-empty string (a list of prompts is several requests: give " \
                       "each a line of its own)"
        return {"prompt": value}, None
    if not isinstance(value, list) or not value:
        return {}, "body.messages must be a non-empty list of {role, content} objects"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            extra = sorted(set(message) - {"role", "content"}) if isinstance(message, dict) else []
            return {}, f"body.messages[{i}]" + (f".{extra[0]} is not supported" if extra else " must be an object")
        if message.get("role") not in CHAT_ROLES:
            role = _shown(message.get("role"))
            return {}, f"body.messages[{i}].role must be one of {', '.join(CHAT_ROLES)} (got {role})"
        if not isinstance(message.get("content"), str):
            return {}, f"body.messages[{i}].content must be text (content parts are not supported)"
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in value]}, None


def parse_batch_line(row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the request a batch line asks for, None), or (None, why it is refused, naming the field).

    The request: url, model, one of prompt / messages / aigc, and sampling (max_new_tokens,
    temperature, top_p, top_k, seed: None where the body leaves it to the run's config; stop: a list).
    The custom_id is checked by the reader like any id (inputs.py).
    """
    extra = sorted(set(row) - set(LINE_FIELDS))
    if extra:
        return None, f"field {printable(extra[0])!r} is not part of a batch line ({', '.join(LINE_FIELDS)})"
    if row.get("method") != "POST":
        return None, f"method {_shown(row.get('method'))}: batch lines are POST requests"
    url = row.get("url")
    if url not in _ASKS:
        return None, f"url {_shown(url)} is not supported (use {COMPLETIONS} or {CHAT})"
    body = row.get("body")
    if not isinstance(body, dict):
        return None, f"body must be a JSON object (got {_shown(body)})"
    allowed = {"aigc", *_SAMPLING, *_INERT, *_NEUTRAL, *_ONLY[url]}
    for name, value in body.items():
        if value is None:
            continue
        if name not in allowed:
            where = next((u for u, names in _ONLY.items() if name in names), None)
            why = f"belongs to {where}" if where else "is not supported"
            return None, f"body.{printable(name)} {why}"
        if name in _NEUTRAL and value not in _NEUTRAL[name]:
            return None, f"body.{name}={_shown(value)} is not supported (only {_shown(_NEUTRAL[name][0])})"
    if body.get("model") is not None and not isinstance(body["model"], str):
        return None, f"body.model must be text (got {_shown(body['model'])})"
    asked, problem = _asked(body, url)
    if problem:
        return None, problem
    sampling, problem = _sampling(body)
    if problem:
        return None, problem
    return {"url": url, "model": body.get("model"), **asked, **sampling}, None


def batch_ids(row: Mapping[str, Any]) -> tuple[Any, Any]:
    """(user_id, item_id) a line names in its aigc extension, else (None, None)."""
    body = row.get("body")
    aigc = body.get("aigc") if isinstance(body, dict) else None
    return (aigc.get("user_id"), aigc.get("item_id")) if isinstance(aigc, dict) else (None, None)


# -- output ------------------------------------------------------------------------------------------

# The code of an OpenAI error line: every failure the backfill reports per request is the request's own
# (bad input, an unknown user or item, a prompt over the context, no chat template), but for copy that
# the run's quality filters rejected and the other copies of a custom_id.
FILTERED, DUPLICATE, INVALID = "content_filter", "duplicate_custom_id", "invalid_request"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def response_body(row: Mapping[str, Any], request: Mapping[str, Any], model: str, created: int,
                  ident: str) -> dict[str, Any]:
    """A `text_completion` or `chat.completion` object for one generated row."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": row["finish_reason"], "logprobs": None}
    usage = {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["num_tokens"],
             "total_tokens": row["prompt_tokens"] + row["num_tokens"]}
    if request.get("url") == CHAT:
        choice["message"] = {"role": "assistant", "content": row["content"]}
        return {"id": f"chatcmpl-{ident}", "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage}
    choice["text"] = row["content"]
    return {"id": f"cmpl-{ident}", "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage}


def output_lines(run_id: str, model: str, answered: list[dict[str, Any]], errors: list[dict[str, Any]],
                 side: str, created: int) -> dict[str, list[str]]:
    """The shard's OpenAI output lines (one per generated row) and error lines (one per failed request whose
    custom_id is known: rows of the users and items tables are no request, a line without a custom_id
    has no id to match; both stay in errors/ only).

    Ids are hashes of the run, the custom_id and its occurrence in the shard (a duplicate custom_id has
    one output line and an error line per other copy), so a shard finished again after a crash writes
    the same lines; only `created` (when the attempt finished) differs, like `created_at` in parquet.
    """
    seen: Counter[str] = Counter()

    def ident(custom_id: str) -> str:
        seen[custom_id] += 1
        return _digest(run_id, custom_id, str(seen[custom_id]))

    out, failed = [], []
    for row in answered:
        request = json.loads(row["request"]) if row.get("request") else {}
        key = ident(row["request_id"])
        line = {"id": f"batch_req_{key}", "custom_id": row["request_id"],
                "response": {"status_code": 200, "request_id": f"req_{key}",
                             "body": response_body(row, request, model, created, key)},
                "error": None}
        out.append(json.dumps(line, ensure_ascii=False))
    for error in errors:
        if error["table"] != side or error["request_id"] is None:
            continue
        code = FILTERED if error["stage"] == "filter" else DUPLICATE if error["error"].startswith("duplicate ") \
            else INVALID
        line = {"id": f"batch_req_{ident(error['request_id'])}", "custom_id": error["request_id"], "response": None,
                "error": {"code": code, "message": f"{error['stage']}: {error['error']}"}}
        failed.append(json.dumps(line, ensure_ascii=False))
    return {"openai_output": out, "openai_errors": failed}


def request_counts(counts: Mapping[str, Any]) -> dict[str, int]:
    """The manifest's counts in the shape of OpenAI's Batch.request_counts (every input line is a request:
    completed = in data/, failed = in errors/, lines without a custom_id included)."""
    return {"total": counts["total"], "completed": counts["ok"], "failed": counts["quarantined"] + counts["filtered"]}
