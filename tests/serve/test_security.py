"""The ingress's defences over real HTTP: API keys, the body read bound, the token budget, bad profile rows.

One deployment serves them all (auth on, a 1 s body bound, a 100-token budget, a users table with bad
rows); its key variable reaches the replica through the runtime_env, as a pod's does from a Secret.
"""

from __future__ import annotations

import json
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from threading import Thread
from urllib.parse import urlsplit

import pytest
import requests

from aigc_dist.config import ConfigError
from aigc_dist.serve.auth import key_matches, load_api_keys

pytestmark = pytest.mark.slow

KEYS_ENV = "AIGC_TEST_SERVE_API_KEYS"
KEYS = "key-one,\nkey-two\n"  # comma- and newline-separated, as a Secret's value may be
AUTH = {"authorization": "Bearer key-two"}
BUDGET = 100  # tokens per call; the kit's default max_new_tokens is 12, its cap 64
GOOD_USERS = ["g0", "g1", "g2"]
USERS_JSONL = "\n".join([
    *(json.dumps({"user_id": u, "segment": "runner", "locale": "en-US"}) for u in GOOD_USERS),
    '{"user_id": "u-nan", "segment": NaN, "locale": "en-US"}',  # read as null: the prompt lacks a required field
    '{"user_id": "u-surrogate", "segment": "x\\ud800", "locale": "en-US"}',  # no UTF-8 form: rejected on load
]) + "\n"


@pytest.fixture(scope="module")
def guarded(serve_cluster, serve_kit, tmp_path_factory):
    from ray import serve

    from aigc_dist.serve.app import application

    users = tmp_path_factory.mktemp("guarded") / "users.jsonl"
    users.write_text(USERS_JSONL)
    cfg = serve_kit.config(api_keys_env=KEYS_ENV, body_read_timeout_s=1, max_tokens_per_call=BUDGET,
                           batch_wait_timeout_s=0.25)
    cfg.data.users = str(users)
    serve.run(application(cfg, runtime_env={"env_vars": {KEYS_ENV: KEYS}}), name="guarded", route_prefix="/guarded")
    yield f"{serve_cluster.url}/guarded"
    serve_cluster.delete("guarded")


def _post(url: str, body: dict, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{url}/v1/generate", json=body, headers=AUTH if headers is None else headers, timeout=60)


def test_keys_come_from_the_named_variable_and_a_missing_one_stops_the_start(monkeypatch):
    monkeypatch.setenv(KEYS_ENV, KEYS)
    assert load_api_keys(KEYS_ENV) == (b"key-one", b"key-two")
    assert key_matches(b"key-two", load_api_keys(KEYS_ENV)) and not key_matches(b"key-three", (b"key-two",))
    for value in ("", " ,\n"):
        monkeypatch.setenv(KEYS_ENV, value)
        with pytest.raises(ConfigError, match=f"serve.api_keys_env names \\${KEYS_ENV}, which holds no key"):
            load_api_keys(KEYS_ENV)
    monkeypatch.delenv(KEYS_ENV)
    with pytest.raises(ConfigError, match=f"serve.api_keys_env names \\${KEYS_ENV}, which is not set"):
        load_api_keys(KEYS_ENV)


def test_a_missing_or_wrong_key_is_401_in_openais_shape_and_the_probe_path_stays_open(guarded, serve_kit):
    body = {"requests": [serve_kit.request()]}
    missing = _post(guarded, body, headers={})
    wrong = _post(guarded, body, headers={"authorization": "Bearer key-three"})
    not_bearer = _post(guarded, body, headers={"authorization": "Basic a2V5LW9uZQ=="})
    for answer in (missing, wrong, not_bearer):
        assert answer.status_code == 401, answer.text
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert "key-three" not in wrong.text
    for key in ("key-one", "key-two"):
        assert _post(guarded, body, headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert requests.get(f"{guarded}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{guarded}/openapi.json", timeout=30).status_code == 401
    assert requests.get(f"{guarded}/healthz", timeout=30).status_code == 200


def test_a_call_over_the_token_budget_is_422_naming_the_budget_and_its_figure(guarded, serve_kit):
    over = _post(guarded, {"requests": [serve_kit.request(max_new_tokens=64), serve_kit.request(max_new_tokens=40)]})
    assert over.status_code == 422, over.text
    [problem] = over.json()["detail"]
    assert problem["loc"] == ["body", "requests"]
    assert "104 new tokens" in problem["msg"] and f"budget is {BUDGET}" in problem["msg"]
    by_default = _post(guarded, {"requests": [serve_kit.request()] * 9})  # 9 x the default 12 = 108
    assert by_default.status_code == 422 and "108 new tokens" in by_default.text
    assert _post(guarded, {"requests": [serve_kit.request()] * 8}).status_code == 200  # 96


def test_serves_proxy_control_headers_are_refused(guarded, serve_kit):
    for header, value in (("x-request-timeout-seconds", "0"), ("x-request-disconnect-disabled", "?1")):
        answer = _post(guarded, {"requests": [serve_kit.request()]}, headers={**AUTH, header: value})
        assert answer.status_code == 400 and header in answer.json()["detail"]


def _trickle(sockets: list[socket.socket], statuses: dict[int, str], interval_s: float, give_up_s: float) -> None:
    """One byte to every socket each `interval_s` until it answers; its status line goes in `statuses`."""
    pending = dict(enumerate(sockets))
    deadline = time.monotonic() + give_up_s
    while pending and time.monotonic() < deadline:
        readable, _, _ = select.select(list(pending.values()), [], [], interval_s)
        answered = [n for n, sock in pending.items() if sock in readable]
        for n in pending.keys() - answered:
            try:
                pending[n].send(b" ")
            except OSError as exc:  # closed under us: whatever it said is already in the receive buffer
                statuses[n] = f"send failed: {exc!r}"
                answered.append(n)
        for n in answered:
            sock = pending.pop(n)
            try:
                data = sock.recv(4096)
                statuses[n] = data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed without an answer"
            except OSError as exc:
                statuses.setdefault(n, f"recv failed: {exc!r}")
            sock.close()
    for n, sock in pending.items():
        statuses[n] = "no answer"
        sock.close()


def test_trickling_bodies_get_408_while_a_normal_request_succeeds(guarded, serve_kit):
    """40 clients that send their headers, then a byte each half second: more than the replica's 32
    slots (max_ongoing_requests), so without the body bound the normal request would wait behind them."""
    where = urlsplit(guarded)
    head = (f"POST {where.path}/v1/generate HTTP/1.1\r\nHost: {where.netloc}\r\nAuthorization: Bearer key-one\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"requests\"").encode()
    sockets = [socket.create_connection((where.hostname, where.port), timeout=10) for _ in range(40)]
    for sock in sockets:
        sock.sendall(head)
    statuses: dict[int, str] = {}
    trickler = Thread(target=_trickle, args=(sockets, statuses, 0.5, 120))
    trickler.start()
    try:
        normal = _post(guarded, {"requests": [serve_kit.request()]})
    finally:
        trickler.join()
    assert normal.status_code == 200, normal.text
    assert normal.json()["results"][0]["num_tokens"] > 0
    assert sorted(statuses) == list(range(40))
    assert all(status.startswith("HTTP/1.1 408") for status in statuses.values()), statuses


def test_a_bad_profile_row_fails_only_its_own_call_never_its_batch_neighbours(guarded, serve_kit):
    """The NaN user's request is decoded in the same batch as good ones (0.25 s batch window) and its
    prompt is refused there; the surrogate user's row was rejected on load and is refused before queueing."""
    item = {"item_id": "i1", "seed": 5}
    calls = [{"user_id": u, **item} for u in [*GOOD_USERS, "u-nan", "u-surrogate"]]
    shared_a_batch = False
    for _ in range(5):  # rounds until one shows the NaN request in a batch with the good ones
        before = requests.get(f"{guarded}/v1/models", headers=AUTH, timeout=30).json()["stats"]
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda call: _post(guarded, {"requests": [call]}), calls))
        after = requests.get(f"{guarded}/v1/models", headers=AUTH, timeout=30).json()["stats"]
        assert [a.status_code for a in answers] == [200, 200, 200, 422, 422], [a.text for a in answers]
        assert all(a.json()["results"][0]["num_tokens"] > 0 for a in answers[:3])
        nan, surrogate = answers[3].json()["detail"][0], answers[4].json()["detail"][0]
        assert nan["loc"] == ["body", "requests", 0]
        assert "user_id 'u-nan'" in nan["msg"] and "missing required user field 'segment'" in nan["msg"]
        assert surrogate["loc"] == ["body", "requests", 0, "user_id"]
        assert "user_id 'u-surrogate'" in surrogate["msg"] and "segment: invalid UTF-8" in surrogate["msg"]
        decoded = after["text_requests"] - before.get("text_requests", 0)
        batches = after["text_batches"] - before.get("text_batches", 0)
        assert decoded == 4  # the three good requests and the NaN one; the surrogate one never queued
        if batches == 1:
            shared_a_batch = True
            break
    assert shared_a_batch, "the good and the NaN requests never shared a batch in 5 rounds"
