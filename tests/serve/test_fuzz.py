"""Hostile input against the real HTTP API: whatever arrives, the answer is never a 5xx.

Over 1,000 generated requests (hypothesis): arbitrary JSON, valid requests with one field replaced by
arbitrary JSON, hostile unicode and huge numbers in every field, raw bytes that are not JSON, wrong
content types, unknown routes; and the same over the OpenAI routes (/v1/completions, /v1/chat/completions,
streamed or not). The last test checks the count and that the server is still healthy.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

SENT: Counter[str] = Counter()
FIELDS = ["user_id", "user", "item_id", "item", "seed", "max_new_tokens", "temperature", "top_k", "top_p"]
OPENAI_FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "user", "stream",
                 "stream_options", "aigc", "logprobs", "tools", "response_format", "best_of", "extra_field"]
OPENAI_ROUTES = ["completions", "chat/completions"]
FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))

hostile_text = st.text(st.characters(codec=None, categories=None), max_size=40) | st.sampled_from([
    "\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "e\u0301" * 50, "🧪" * 300, "\U0010ffff", "x" * 5000])
huge_numbers = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400, 1e308, -1e308, 0, -1, 1.5, 2**31])
json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_text | huge_numbers
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(hostile_text, inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def fuzz_url(serve_cluster, serve_kit):
    # The chat-template checkpoint: its messages go through the chat template, its features through the prompt one.
    url = serve_cluster.deploy("fuzz", serve_kit.config(artifact=serve_kit.lm_chat, max_body_bytes=64 * 1024))
    yield url
    serve_cluster.delete("fuzz")


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def _send(session: requests.Session, url: str, data: bytes, content_type: str = "application/json") -> int:
    answer = session.post(url, data=data, headers={"content-type": content_type}, timeout=60)
    SENT[url.rsplit("/", 1)[-1]] += 1
    assert answer.status_code < 500, f"{answer.status_code} for {data[:300]!r}: {answer.text[:300]}"
    if "/v1/completions" in url or "/v1/chat/completions" in url:
        if answer.status_code >= 400:  # OpenAI's error shape on its routes, whatever went wrong
            assert set(answer.json()["error"]) == {"message", "type", "param", "code"}, answer.text[:300]
        elif answer.headers["content-type"].startswith("text/event-stream"):
            assert answer.text.endswith("data: [DONE]\n\n"), answer.text[-300:]
    return answer.status_code


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode("utf-8")


@settings(FUZZ, max_examples=250)
@given(body=json_value)
def test_arbitrary_json_bodies(fuzz_url, session, body):
    _send(session, f"{fuzz_url}/v1/generate", _dumps(body))
    _send(session, f"{fuzz_url}/v1/images", _dumps(body))
    for route in OPENAI_ROUTES:
        _send(session, f"{fuzz_url}/v1/{route}", _dumps(body))


def _openai_body(route: str, serve_kit: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "copy-chat", "max_tokens": 4, "seed": 1}
    if route == "completions":
        body["prompt"] = "New in:"
    else:
        body["messages"] = [{"role": "user", "content": "Copy for a tent"}]
    return body


@settings(FUZZ, max_examples=250)
@given(route=st.sampled_from(OPENAI_ROUTES), field=st.sampled_from([*OPENAI_FIELDS, "prompt", "messages"]),
       value=json_value, personalized=st.booleans(), stream=st.booleans())
def test_valid_openai_requests_with_one_field_replaced(fuzz_url, session, serve_kit, route, field, value,
                                                       personalized, stream):
    body = _openai_body(route, serve_kit)
    if personalized:  # the aigc extension instead of the prompt / messages
        body.pop("prompt", None)
        body.pop("messages", None)
        body["aigc"] = {"user_id": "u1", "item_id": "i2"}
    body["stream"] = stream
    body[field] = value
    _send(session, f"{fuzz_url}/v1/{route}", _dumps(body))


@settings(FUZZ, max_examples=100)
@given(route=st.sampled_from(OPENAI_ROUTES), part=st.sampled_from(["user", "item", "message", "content"]),
       key=hostile_text, value=json_value)
def test_openai_requests_with_hostile_features_and_messages(fuzz_url, session, serve_kit, route, part, key, value):
    body = _openai_body(route, serve_kit)
    if part in ("user", "item"):
        body.pop("prompt", None)
        body.pop("messages", None)
        body["aigc"] = {"user_id": "u1", "item_id": "i2", part: {key: value}}
    elif part == "message":
        body.pop("prompt", None)
        body["messages"] = [{"role": key, "content": value}]
    else:
        body["prompt" if route == "completions" else "messages"] = value
    _send(session, f"{fuzz_url}/v1/{route}", _dumps(body))


@settings(FUZZ, max_examples=300)
@given(field=st.sampled_from([*FIELDS, "extra_field"]), value=json_value, where=st.sampled_from(["request", "user"]))
def test_valid_requests_with_one_field_replaced(fuzz_url, session, serve_kit, field, value, where):
    request = serve_kit.request(max_new_tokens=4)
    if where == "user":
        request["user"] = {**request["user"], field: value}
    else:
        request[field] = value
    _send(session, f"{fuzz_url}/v1/generate", _dumps({"requests": [request]}))


@settings(FUZZ, max_examples=200)
@given(data=st.binary(max_size=300) | st.builds(lambda b: b"{\"requests\": [" + b, st.binary(max_size=60)),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
       route=st.sampled_from(["generate", *OPENAI_ROUTES]))
def test_bytes_that_are_not_json(fuzz_url, session, data, content_type, route):
    _send(session, f"{fuzz_url}/v1/{route}", data, content_type)


@settings(FUZZ, max_examples=150)
@given(label=json_value, features=json_value, seed=json_value, count=st.integers(0, 3))
def test_image_requests(fuzz_url, session, label, features, seed, count):
    _send(session, f"{fuzz_url}/v1/images",
          _dumps({"requests": [{"label": label, "features": features, "seed": seed}] * count}))


@settings(FUZZ, max_examples=60)
@given(size=st.sampled_from([65 * 1024, 200 * 1024, 1024 * 1024]),
       path=st.sampled_from(["generate", "images", *OPENAI_ROUTES]))
def test_bodies_over_the_limit(fuzz_url, session, size, path):
    assert _send(session, f"{fuzz_url}/v1/{path}", b"[" + b"0," * (size // 2) + b"0]") == 413


@settings(FUZZ, max_examples=60)
@given(path=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="?#%"), max_size=30))
def test_unknown_routes(fuzz_url, session, path):
    answer = session.get(f"{fuzz_url}/{path}", timeout=60)
    SENT["routes"] += 1
    assert answer.status_code < 500


def test_over_a_thousand_hostile_requests_were_answered_and_the_server_is_healthy(fuzz_url, serve_kit):
    assert sum(SENT.values()) >= 1000, SENT
    assert requests.get(f"{fuzz_url}/healthz", timeout=30).status_code == 200
    ok = serve_kit.post(f"{fuzz_url}/v1/generate", {"requests": [serve_kit.request()]})
    assert ok.status_code == 200 and ok.json()["results"][0]["num_tokens"] > 0
    chat = serve_kit.post(f"{fuzz_url}/v1/chat/completions", {"model": "copy-chat", "max_tokens": 4,
                                                              "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] > 0
