"""The OpenAI-compatible routes through the official `openai` client against a local Serve.

Two deployments serve every test: `openai` (API keys on, a chat-template checkpoint whose own prompts
use the feature template, the users and items tables) and `openai-small` (a long-context model without
a chat template, one decode slot, one call at a time and one queued: overload and disconnects).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import requests

from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest
from aigc_dist.models.artifact import load_artifact
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow

KEYS_ENV = "AIGC_TEST_OPENAI_KEYS"
KEY = "sk-test-openai"
MESSAGES = [{"role": "system", "content": "Write short copy."}, {"role": "user", "content": "A lamp for campers"}]


@pytest.fixture(scope="module")
def openai_url(serve_cluster, serve_kit):
    from ray import serve

    from aigc_dist.serve.app import application

    cfg = serve_kit.config(artifact=serve_kit.lm_chat, api_keys_env=KEYS_ENV, batch_wait_timeout_s=0.05,
                           max_tokens_per_call=256)
    serve.run(application(cfg, runtime_env={"env_vars": {KEYS_ENV: KEY}}), name="openai", route_prefix="/openai")
    yield f"{serve_cluster.url}/openai"
    serve_cluster.delete("openai")


@pytest.fixture(scope="module")
def small_url(serve_cluster, serve_kit):
    url = serve_cluster.deploy("openai-small", serve_kit.config(
        artifact=serve_kit.lm_long, max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1, retry_after_s=3,
        max_new_tokens_cap=4000, max_tokens_per_call=8000))
    yield url
    serve_cluster.delete("openai-small")


@pytest.fixture(scope="module")
def client(openai_url):
    return openai.OpenAI(base_url=f"{openai_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(serve_kit):
    return TextEngine(load_artifact(serve_kit.lm_chat, Storage()))


def _direct(engine: TextEngine, seed: int, max_new_tokens: int, temperature: float = 0.8, **what: Any) -> Any:
    return engine.generate([TextRequest(seed=seed, sampling=SamplingParams(max_new_tokens=max_new_tokens,
                                                                          temperature=temperature), **what)])[0]


def _reassemble(stream: Any, chat: bool) -> tuple[dict[int, str], dict[int, str], Any]:
    """Texts and finish reasons by choice index, and the usage of the last chunk."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    last_usage = None
    for chunk in stream:
        assert chunk.object == ("chat.completion.chunk" if chat else "text_completion")
        last_usage = chunk.usage
        for choice in chunk.choices:
            piece = (choice.delta.content if chat else choice.text) or ""
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, last_usage


def test_completions_chat_and_models_through_the_openai_client_equal_direct_engine_calls(client, engine):
    models = client.models.list()
    assert "copy-chat" in [m.id for m in models.data]

    completion = client.completions.create(model="copy-chat", prompt="New in shoes:", max_tokens=12, seed=7,
                                           temperature=0.9)
    direct = _direct(engine, 7, 12, 0.9, prompt="New in shoes:")
    assert completion.object == "text_completion" and completion.model == "copy-chat"
    assert completion.choices[0].text == direct.text and direct.text
    assert completion.choices[0].finish_reason == ("stop" if direct.finished else "length")
    assert completion.usage.completion_tokens == direct.num_tokens
    assert completion.usage.prompt_tokens == direct.prompt_tokens

    chat = client.chat.completions.create(model="copy-chat:v1", messages=MESSAGES, max_completion_tokens=10, seed=3,
                                          temperature=0, extra_body={"top_k": 5})
    direct = engine.generate([TextRequest(messages=MESSAGES, seed=3, sampling=SamplingParams(
        max_new_tokens=10, temperature=0, top_k=5))])[0]
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == direct.text
    assert chat.usage.total_tokens == direct.prompt_tokens + direct.num_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_chunks_reassemble_to_the_non_streamed_text_with_usage_last(client, chat):
    what: dict[str, Any] = {"messages": MESSAGES} if chat else {"prompt": "Trail pack"}
    create = client.chat.completions.create if chat else client.completions.create
    whole = create(model="copy-chat", max_tokens=24, seed=11, n=2, **what)
    stream = create(model="copy-chat", max_tokens=24, seed=11, n=2, stream=True,
                    stream_options={"include_usage": True}, **what)
    texts, reasons, last_usage = _reassemble(stream, chat)
    expected = [c.message.content if chat else c.text for c in whole.choices]
    assert [texts[0], texts[1]] == expected and expected[0] != expected[1]
    assert [reasons[0], reasons[1]] == [c.finish_reason for c in whole.choices]
    assert last_usage is not None and last_usage.model_dump() == whole.usage.model_dump()


def test_n_choices_use_seed_plus_i_and_each_equals_a_single_request(client):
    three = client.completions.create(model="copy-chat", prompt="Meet the", n=3, seed=40, max_tokens=10)
    singles = [client.completions.create(model="copy-chat", prompt="Meet the", seed=40 + i, max_tokens=10)
               for i in range(3)]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in three.choices}) == 3


def test_stop_strings_cut_the_text_before_the_first_one_streamed_or_not(client, engine):
    free = _direct(engine, 5, 40, prompt="Sale:")
    stop = free.text[8:10]  # a piece the unstopped text holds (any characters, multi-byte ones included)
    assert len(stop) == 2, free.text
    cut = free.text[: free.text.find(stop)]
    answer = client.completions.create(model="copy-chat", prompt="Sale:", seed=5, max_tokens=40, stop=[stop, "\x00"])
    assert answer.choices[0].text == cut and answer.choices[0].finish_reason == "stop"
    texts, reasons, _ = _reassemble(client.completions.create(
        model="copy-chat", prompt="Sale:", seed=5, max_tokens=40, stop=stop, stream=True), chat=False)
    assert texts[0] == cut and reasons[0] == "stop"


def test_the_aigc_extension_gives_generates_copy_for_the_same_user_item_and_seed(client, openai_url, serve_kit):
    pairs = [("u1", "i2", 3), ("u4", "i7", 99)]
    generated = requests.post(f"{openai_url}/v1/generate", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                              json={"requests": [{"user_id": u, "item_id": i, "seed": s, "max_new_tokens": 16}
                                                 for u, i, s in pairs]}).json()["results"]
    for (user, item, seed), expected in zip(pairs, generated, strict=True):
        aigc = {"aigc": {"user_id": user, "item_id": item}}
        chat = client.chat.completions.create(model="copy-chat", messages=[], seed=seed, max_tokens=16,
                                              extra_body=aigc)
        completion = client.completions.create(model="copy-chat", prompt=None, seed=seed, max_tokens=16,
                                               extra_body=aigc)
        assert chat.choices[0].message.content == completion.choices[0].text == expected["content"]
    features = {"aigc": {"user": {"segment": "camper", "locale": "de-DE"},  # u1's row, sent as features
                         "item": {"title": "Item number 2", "category": serve_kit.categories[2]}}}
    by_features = client.chat.completions.create(model="copy-chat", messages=[], seed=3, max_tokens=16,
                                                 extra_body=features)
    assert by_features.choices[0].message.content == generated[0]["content"]


def _error(call: Any, status: type[openai.APIStatusError]) -> dict[str, Any]:
    with pytest.raises(status) as raised:
        call()
    body = raised.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_refusals_are_openai_errors_naming_the_field(client, openai_url):
    create = client.completions.create
    unknown = _error(lambda: create(model="gpt-4o", prompt="x"), openai.NotFoundError)
    assert unknown["code"] == "model_not_found" and unknown["param"] == "model" and "copy-chat" in unknown["message"]
    assert _error(lambda: create(model="copy-chat", prompt="x", temperature=3), openai.BadRequestError)["param"] \
        == "temperature"
    assert _error(lambda: create(model="copy-chat", prompt="x", max_tokens=65), openai.BadRequestError)["param"] \
        == "max_tokens"  # over the kit's cap (64)
    over_budget = _error(lambda: create(model="copy-chat", prompt="x", max_tokens=64, n=5), openai.BadRequestError)
    assert "320 new tokens" in over_budget["message"]  # n x max_tokens against max_tokens_per_call (256)
    logprobs = _error(lambda: client.chat.completions.create(model="copy-chat", messages=MESSAGES, logprobs=True),
                      openai.BadRequestError)
    assert logprobs["param"] == "logprobs" and logprobs["code"] == "unsupported_parameter"
    tools = _error(lambda: client.chat.completions.create(
        model="copy-chat", messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]),
        openai.BadRequestError)
    assert tools["param"] == "tools"
    assert _error(lambda: create(model="copy-chat", prompt="x", extra_body={"colour": 1}),
                  openai.BadRequestError)["code"] == "unknown_parameter"
    both = _error(lambda: client.chat.completions.create(model="copy-chat", messages=MESSAGES,
                                                         extra_body={"aigc": {"user_id": "u1", "item_id": "i1"}}),
                  openai.BadRequestError)
    assert both["param"] == "messages"
    stranger = {"aigc": {"user_id": "x", "item_id": "i1"}}
    nobody = _error(lambda: create(model="copy-chat", prompt=None, extra_body=stranger), openai.NotFoundError)
    assert nobody["param"] == "aigc.user_id"
    # Neutral values of unsupported fields are accepted: a client that spells out defaults is served.
    assert create(model="copy-chat", prompt="x", max_tokens=2, logprobs=None, echo=False, best_of=1,
                  presence_penalty=0).choices[0].finish_reason in ("stop", "length")

    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for data, param in ((b"{not json", None), (b'{"model": "copy-chat", "prompt": [1, 2]}', "prompt")):
        answer = requests.post(f"{openai_url}/v1/completions", data=data, headers=auth, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    huge = requests.post(f"{openai_url}/v1/chat/completions", data=b"{" + b" " * 2_000_000 + b"}", headers=auth,
                         timeout=30)
    assert huge.status_code == 413 and "error" in huge.json()

    keyless = openai.OpenAI(base_url=f"{openai_url}/v1", api_key="wrong", max_retries=0)
    for call in (lambda: keyless.completions.create(model="copy-chat", prompt="x"),
                 lambda: keyless.chat.completions.create(model="copy-chat", messages=MESSAGES, stream=True),
                 lambda: keyless.models.list()):
        assert _error(call, openai.AuthenticationError)["code"] == "invalid_api_key"
    missing = requests.post(f"{openai_url}/v1/chat/completions", json={"model": "copy-chat", "messages": MESSAGES},
                            timeout=30)
    assert missing.status_code == 401


def _small(small_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{small_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_messages_on_a_model_without_a_chat_template_are_refused_and_the_aigc_extension_works(small_url):
    client = _small(small_url)
    refused = _error(lambda: client.chat.completions.create(model="copy-long", messages=MESSAGES),
                     openai.BadRequestError)
    assert refused["code"] == "no_chat_template" and "aigc" in refused["message"]
    answer = client.chat.completions.create(model="copy-long", messages=[], max_tokens=8,
                                            extra_body={"aigc": {"user_id": "u0", "item_id": "i0"}})
    assert answer.choices[0].message.content


def test_a_burst_over_capacity_is_503_with_retry_after_as_the_client_sees_it(small_url):
    client = _small(small_url)

    def call(_: int) -> Any:
        try:
            return client.completions.create(model="copy-long", prompt="x", max_tokens=300, temperature=0)
        except openai.APIStatusError as exc:
            return exc

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, range(12)))
    refused = [a for a in answers if isinstance(a, openai.APIStatusError)]
    assert refused and len(refused) < len(answers), answers
    assert all(isinstance(a, openai.InternalServerError) and a.status_code == 503 for a in refused), refused
    assert all(a.response.headers.get("retry-after") == "3" for a in refused)
    assert client.completions.create(model="copy-long", prompt="x", max_tokens=4).choices[0].text is not None


def test_a_client_that_disconnects_mid_stream_frees_its_decode_slot(small_url):
    """One decode slot: the second stream can only start once the first's slot is free. The first asks
    for 4000 greedy tokens (this model's greedy continuation of "x" never reaches EOS: it would end at
    length), reads one chunk and hangs up; the stats must show it ended cancelled."""
    def stats() -> dict[str, int]:
        return requests.get(f"{small_url}/v1/models", timeout=30).json()["stats"]

    before = stats()
    body = {"model": "copy-long", "prompt": "x", "max_tokens": 4000, "temperature": 0, "stream": True}
    first = requests.post(f"{small_url}/v1/completions", json=body, stream=True, timeout=120)
    assert first.status_code == 200
    lines = first.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: {")
    first.close()  # the client is gone, mid-stream
    second = _small(small_url).completions.create(model="copy-long", prompt="y", max_tokens=8, stream=True)
    texts, reasons, _ = _reassemble(second, chat=False)
    assert reasons[0] in ("stop", "length")
    after = stats()
    assert after.get("text_finish_cancelled", 0) - before.get("text_finish_cancelled", 0) == 1, after
    assert after.get("text_finish_length", 0) - before.get("text_finish_length", 0) <= 1  # the second's, at most


def test_models_lists_both_shapes(openai_url):
    answer = requests.get(f"{openai_url}/v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert answer["object"] == "list" and {m["id"] for m in answer["data"]} == {"copy-chat", "banner-test"}
    assert {m["kind"] for m in answer["models"]} == {"lm", "cgan"} and "text_batches" in answer["stats"]
    assert all(m["object"] == "model" and m["created"] > 0 for m in answer["data"])
    assert json.loads(json.dumps(answer))  # plain JSON


def test_generate_chat_completions_and_a_backfill_give_the_same_copy(client, openai_url, serve_kit, tmp_path):
    """A candidates backfill over the serve tables and artifact; each row's (user, item, seed) and
    sampling sent to /v1/generate and to /v1/chat/completions (aigc extension) give the row's copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aigc_dist.batch.layout import read_output
    from aigc_dist.batch.pipeline import run_backfill
    from aigc_dist.config import BackfillConfig, DataConfig, StorageConfig

    pairs = [("u1", "i2"), ("u5", "i0"), ("u12", "i9")]
    candidates = tmp_path / "candidates.parquet"
    pq.write_table(pa.table({"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs]}), candidates)
    backfill = BackfillConfig(output=str(tmp_path / "out"), artifact=serve_kit.lm_chat, run_id="pairs",
                              max_new_tokens=14, temperature=0.7, batch_size=8, min_actors=1, max_actors=1,
                              cpus_per_actor=0.5)
    run_backfill(backfill, DataConfig(users=serve_kit.users, items=serve_kit.items, candidates=str(candidates)),
                 StorageConfig())
    rows = read_output(str(tmp_path / "out" / "pairs"))[0].to_pylist()
    assert sorted((r["user_id"], r["item_id"]) for r in rows) == sorted(pairs)
    generated = requests.post(f"{openai_url}/v1/generate", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                              json={"requests": [{"user_id": r["user_id"], "item_id": r["item_id"], "seed": r["seed"],
                                                  "temperature": 0.7, "max_new_tokens": 14} for r in rows]})
    assert [g["content"] for g in generated.json()["results"]] == [r["content"] for r in rows]
    for row in rows:
        chat = client.chat.completions.create(model="copy-chat", messages=[], seed=row["seed"], temperature=0.7,
                                              max_tokens=14, extra_body={"aigc": {"user_id": row["user_id"],
                                                                                  "item_id": row["item_id"]}})
        assert chat.choices[0].message.content == row["content"]


def test_ray_data_llm_http_request_processor_runs_a_dataset_through_the_chat_route(client, openai_url):
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    def payload(row: dict[str, Any]) -> dict[str, Any]:
        n = int(row["id"])
        return {"model": "copy-chat", "messages": [], "max_tokens": 10, "seed": 100 + n,
                "aigc": {"user_id": f"u{n}", "item_id": f"i{n % 10}"}}

    config = HttpRequestProcessorConfig(url=f"{openai_url}/v1/chat/completions",
                                        headers={"Authorization": f"Bearer {KEY}"}, concurrency=1, batch_size=4)
    processor = build_processor(
        config, preprocess=lambda row: {"id": row["id"], "payload": payload(row)},
        postprocess=lambda row: {"id": row["id"],
                                 "content": row["http_response"]["choices"][0]["message"]["content"]})
    rows = sorted(processor(ray.data.range(8)).take_all(), key=lambda row: row["id"])
    assert [row["id"] for row in rows] == list(range(8))
    for row in rows:
        body = payload(row)
        direct = client.chat.completions.create(model="copy-chat", messages=[], max_tokens=10, seed=body["seed"],
                                                extra_body={"aigc": body["aigc"]})
        assert row["content"] == direct.choices[0].message.content


@pytest.fixture(scope="module")
def live_url(serve_cluster, serve_kit):
    """The slow long-context model with eight decode slots: streams that overlap in time."""
    url = serve_cluster.deploy("openai-live", serve_kit.config(
        artifact=serve_kit.lm_long, max_batch_size=8, max_new_tokens_cap=2000, max_tokens_per_call=4000))
    yield url
    serve_cluster.delete("openai-live")


def test_streams_that_arrive_while_one_decodes_join_its_batch(live_url, serve_kit):
    """A 1,500-token stream decodes (about 5 s); three short streams sent after its first chunk all end
    before it does, each with a direct engine call's text, and decode steps held more than one request.
    Batches of whole calls (what streams had before) would keep the three waiting until the long one ended."""
    client = _small(live_url)
    stats = lambda: requests.get(f"{live_url}/v1/models", timeout=30).json()["stats"]  # noqa: E731
    before = stats()
    ended: dict[str, float] = {}
    first_chunk = threading.Event()

    def long_stream() -> tuple[dict[int, str], dict[int, str], Any]:
        stream = client.completions.create(model="copy-long", prompt="x", max_tokens=1500, temperature=0, stream=True)
        chunks = iter(stream)
        head = next(chunks)
        first_chunk.set()
        texts, reasons, _ = _reassemble(chunks, chat=False)
        ended["long"] = time.monotonic()
        return {0: (head.choices[0].text or "") + texts.get(0, "")}, reasons, None

    def short_stream(k: int) -> tuple[str, int]:
        stream = client.completions.create(model="copy-long", prompt=f"Sale {k}:", max_tokens=20, seed=k,
                                           temperature=0.8, stream=True, stream_options={"include_usage": True})
        texts, reasons, usage = _reassemble(stream, chat=False)
        ended[f"short{k}"] = time.monotonic()
        assert reasons[0] in ("stop", "length")
        return texts[0], usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(long_stream)
        assert first_chunk.wait(120)
        shorts = [pool.submit(short_stream, k) for k in range(3)]
        short_texts = [s.result(timeout=120) for s in shorts]
        long_texts, long_reasons, _ = long.result(timeout=300)
    assert long_reasons[0] == "length"
    assert max(ended[f"short{k}"] for k in range(3)) < ended["long"], ended
    engine = TextEngine(load_artifact(serve_kit.lm_long, Storage()))
    for k, (text, _) in enumerate(short_texts):
        assert text == _direct(engine, k, 20, 0.8, prompt=f"Sale {k}:").text
    after = stats()
    steps = after["stream_steps"] - before.get("stream_steps", 0)
    rows = after["stream_rows"] - before.get("stream_rows", 0)
    # Every step held the long stream; each short token came in one of those steps, beside it.
    assert steps >= 1500 and rows - steps >= sum(tokens for _, tokens in short_texts) > 0, (steps, rows)
