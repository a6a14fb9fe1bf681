"""An OpenAI Batch file as the backfill's requests table, with OpenAI-shaped output and error files.

One run serves every backfill test here (a module fixture): a batch file on S3 with completion, chat and
personalization (aigc) lines and bad lines of every kind, backfilled with
`output_format = "parquet+openai"` by a driver subprocess SIGKILLed after its first commit and then
resumed in-process, so what the tests read is the output of a resumed run.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
import torch

from aigc_dist.batch.inputs import stable_request_id
from aigc_dist.batch.layout import RunLayout, read_output
from aigc_dist.batch.pipeline import FAILPOINT_ENV, run_backfill
from aigc_dist.batch.records import raw_json
from aigc_dist.batch.run_state import read_commits
from aigc_dist.batch.shards import row_seed
from aigc_dist.config import DataConfig, StorageConfig
from aigc_dist.data.prompts import template_digest
from aigc_dist.demo.world import WorldConfig, make_world
from aigc_dist.engine.text import prompt_conditioning
from aigc_dist.models.artifact import save_text_artifact
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage, join_uri

pytestmark = pytest.mark.slow
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ROWS_PER_FILE = 3  # 8 shards: the kill after the first commit finds shards pending
# Raw completions and chat lines (custom_id -> url, body): the engine's prompt and messages paths.
RAW = {
    "cmpl-seeded": (COMPLETIONS, {"model": "copy-test", "prompt": "New in shoes:", "max_tokens": 10,
                                  "temperature": 0.7, "seed": 7}),
    "cmpl-stop": (COMPLETIONS, {"prompt": "Meet the", "stop": ["e", "a"], "max_tokens": 12, "top_p": 0.9}),
    "cmpl-greedy": (COMPLETIONS, {"prompt": "Trail pack", "temperature": 0, "max_tokens": 6, "logprobs": None,
                                  "n": 1, "stream": False}),
    "chat-0": (CHAT, {"model": "copy-test", "max_completion_tokens": 8,
                      "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Copy for a lamp"}]}),
    "chat-1": (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "stop": "\n", "top_k": 3}),
}


def _line(custom_id: str | None, body: Any, url: str = COMPLETIONS, method: str = "POST") -> bytes:
    line = {"method": method, "url": url, "body": body}
    if custom_id is not None:
        line["custom_id"] = custom_id
    return json.dumps(line).encode()


def _batch_lines(world: Any, salt: str) -> tuple[list[bytes], dict[str, Any]]:
    """The batch file's lines, and what the tests expect of them."""
    pairs = [(c["user_id"], c["item_id"]) for c in world.candidates.to_pylist()[:4]]
    personal = {f"aigc-{k}": pair for k, pair in enumerate(pairs)}
    lines = [_line(cid, body, url) for cid, (url, body) in RAW.items()]
    lines += [_line(cid, {"model": "copy-test", "aigc": {"user_id": u, "item_id": i},
                         "seed": row_seed(0, stable_request_id(u, i, salt))}, url=CHAT if k % 2 else COMPLETIONS)
             for k, (cid, (u, i)) in enumerate(personal.items())]
    lines += [_line(f"aigc-sampled-{k}", {"aigc": {"user_id": u, "item_id": i}, "max_tokens": 8, "temperature": 0,
                                          "top_k": 5}) for k, (u, i) in enumerate(pairs[:2])]
    refused = {  # custom_id -> words of its reason
        "bad-url": (_line("bad-url", {"input": "x"}, url="/v1/embeddings"), "url \"/v1/embeddings\""),
        "bad-method": (_line("bad-method", {"prompt": "x"}, method="GET"), "method \"GET\""),
        "logprobs": (_line("logprobs", {"prompt": "x", "logprobs": 2}), "body.logprobs=2 is not supported"),
        "tools": (_line("tools", {"messages": [{"role": "user", "content": "x"}], "tools": []}, url=CHAT),
                  "body.tools is not supported"),
        "stream": (_line("stream", {"prompt": "x", "stream": True}), "body.stream=true is not supported"),
        "n-choices": (_line("n-choices", {"prompt": "x", "n": 3}), "body.n=3 is not supported"),
        "body-list": (_line("body-list", ["x"]), "body must be a JSON object"),
        "unknown-user": (_line("unknown-user", {"aigc": {"user_id": "u999999", "item_id": pairs[0][1]}}),
                         "unknown user"),
    }
    lines += [line for line, _ in refused.values()]
    duplicates = [_line("dup", {"aigc": {"user_id": u, "item_id": i}}) for u, i in pairs[:2]]
    lines += duplicates
    unnamed = [b'{"custom_id": "broken", ', b"[1, 2]", _line(None, {"prompt": "x"})]  # no custom_id to match
    lines += unnamed
    return lines, {"personal": personal, "refused": {k: words for k, (_, words) in refused.items()},
                   "duplicates": [json.loads(d) for d in duplicates], "unnamed": len(unnamed)}


def _read_jsonl(root: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(line) for e in entries for line in (root / e["path"]).read_text().splitlines()]


@pytest.fixture(scope="module")
def batch_run(ray_local: None, s3_server: Any, tmp_path_factory: pytest.TempPathFactory, kit: Any,
              world_dir: str) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("openai-batch")
    torch.manual_seed(0)
    model = LlamaLM(LMConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=88, max_position_embeddings=192))
    tokenizer = byte_level_tokenizer(192)
    tokenizer.config["chat_template"] = CHAT_TEMPLATE
    artifact = str(tmp / "chat-lm")
    save_text_artifact(artifact, model, Storage(), tokenizer=tokenizer, conditioning=prompt_conditioning(kit.template),
                       metadata={"name": "copy-test", "version": "v1"})
    world = make_world(WorldConfig(num_users=60, num_items=40, candidates_per_user=5, seed=1))
    lines, expected = _batch_lines(world, template_digest(kit.template))
    batch_uri = join_uri(f"s3://{s3_server.new_bucket()}", "batch/requests.jsonl")
    Storage().write_bytes(batch_uri, b"\n".join(lines) + b"\n")
    data = DataConfig(requests=batch_uri, requests_format="openai_batch", users=str(Path(world_dir) / "users.parquet"),
                      items=str(Path(world_dir) / "items.parquet"))
    # min_chars=0: an untrained model's greedy copy may be empty, and filters are not what is tested here.
    backfill = kit.config(str(tmp), artifact, run_id="batch", rows_per_file=ROWS_PER_FILE, min_chars=0,
                          output_format="parquet+openai")

    # A driver SIGKILLed after its first commit, then the same run resumed: the tests read a resumed run.
    config = kit.write_config(tmp / "batch.toml", backfill, data)
    driver = kit.start_driver(config, tmp / "killed.log", **{FAILPOINT_ENV: "shard_committed:1"})
    assert driver.wait(timeout=240) == -signal.SIGKILL, (tmp / "killed.log").read_text()[-3000:]
    root = tmp / "batch"
    committed_at_kill = len(read_commits(RunLayout(str(root)), Storage()))
    manifest = run_backfill(backfill, data, StorageConfig())

    # The same pairs as a candidates backfill: what the aigc lines must equal.
    candidates = tmp / "candidates.jsonl"
    candidates.write_text("".join(json.dumps({"user_id": u, "item_id": i}) + "\n"
                                  for u, i in expected["personal"].values()))
    run_backfill(kit.config(str(tmp), artifact, run_id="candidates", rows_per_file=ROWS_PER_FILE, min_chars=0),
                 DataConfig(users=data.users, items=data.items, candidates=str(candidates)), StorageConfig())
    return {"root": root, "artifact": artifact, "batch_uri": batch_uri, "lines": lines, "expected": expected,
            "manifest": manifest, "reference_root": tmp / "candidates", "committed_at_kill": committed_at_kill,
            "output": _read_jsonl(root, manifest["files"]["openai_output"]),
            "errors": _read_jsonl(root, manifest["files"]["openai_errors"])}


def test_every_line_is_in_the_output_or_error_files_once_and_the_counts_say_so(batch_run):
    from openai.types.batch_request_counts import BatchRequestCounts

    manifest, expected = batch_run["manifest"], batch_run["expected"]
    assert 1 <= batch_run["committed_at_kill"] < manifest["num_shards"]  # the kill came with shards pending
    named = Counter(json.loads(line)["custom_id"] for line in batch_run["lines"][:-expected["unnamed"]])
    answered = Counter(line["custom_id"] for line in batch_run["output"] + batch_run["errors"])
    assert answered == named  # every line with a custom_id once, a duplicate's copies once each
    assert len({line["custom_id"] for line in batch_run["output"]}) == len(batch_run["output"])
    # The lines without a custom_id to match are in errors/ (parquet), named by file and line.
    data, errors = read_output(str(batch_run["root"]))
    unnamed = {e["error"] for e in errors.filter(pc.is_null(errors["request_id"])).to_pylist()}
    last, uri = len(batch_run["lines"]), batch_run["batch_uri"]
    assert unnamed == {f"{uri}:{last - 2}: not valid JSON (Expecting property name enclosed in double quotes)",
                       f"{uri}:{last - 1}: not a JSON object", "missing custom_id"}
    counts = manifest["counts"]
    assert counts["total"] == len(batch_run["lines"]) == data.num_rows + errors.num_rows
    assert manifest["request_counts"] == {"total": len(batch_run["lines"]), "completed": len(batch_run["output"]),
                                          "failed": len(batch_run["lines"]) - len(batch_run["output"])}
    BatchRequestCounts.model_validate(manifest["request_counts"])
    assert sorted(data["request_id"].to_pylist()) == sorted(line["custom_id"] for line in batch_run["output"])
    # Nothing under data/, errors/ or openai/ that the manifest does not list (the killed attempt's files went).
    root = batch_run["root"]
    listed = {e["path"] for entries in manifest["files"].values() for e in entries}
    assert {str(p.relative_to(root)) for d in ("data", "errors", "openai") for p in (root / d).glob("*")} == listed


def test_openai_types_parse_every_output_line_and_errors_name_the_field(batch_run):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    urls = {json.loads(line)["custom_id"]: json.loads(line)["url"] for line in batch_run["lines"][:-3]}
    for line in batch_run["output"]:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        kind = ChatCompletion if urls[line["custom_id"]] == CHAT else Completion
        body = kind.model_validate(response["body"])
        assert body.model == "copy-test" and len(body.choices) == 1
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens > 0
        assert body.choices[0].finish_reason in ("stop", "length")
    errors = {line["custom_id"]: line for line in batch_run["errors"]}
    for custom_id, words in batch_run["expected"]["refused"].items():
        line = errors[custom_id]
        assert line["response"] is None and words in line["error"]["message"], (words, line)
    assert errors["unknown-user"]["error"]["code"] == "invalid_request"
    # Of two lines with one custom_id, the one whose line sorts first is generated, the other is refused.
    first = min(batch_run["expected"]["duplicates"], key=raw_json)
    assert errors["dup"]["error"] == {"code": "duplicate_custom_id",
                                      "message": "validate: duplicate custom_id dup (the first row is kept)"}
    data, _ = read_output(str(batch_run["root"]))
    dup = next(r for r in data.to_pylist() if r["request_id"] == "dup")
    assert (dup["user_id"], dup["item_id"]) == (first["body"]["aigc"]["user_id"], first["body"]["aigc"]["item_id"])


def test_personalization_lines_get_the_copy_of_a_candidates_backfill_and_their_own_sampling(batch_run):
    data, _ = read_output(str(batch_run["root"]))
    rows = {r["request_id"]: r for r in data.to_pylist()}
    reference, _ = read_output(str(batch_run["reference_root"]))
    by_pair = {(r["user_id"], r["item_id"]): r for r in reference.to_pylist()}
    output = {line["custom_id"]: line["response"]["body"]["choices"][0] for line in batch_run["output"]}
    for custom_id, pair in batch_run["expected"]["personal"].items():
        row, same = rows[custom_id], by_pair[pair]
        assert (row["content"], row["seed"]) == (same["content"], same["seed"]) and row["content"]
        choice = output[custom_id]
        assert (choice.get("text") or choice["message"]["content"]) == rows[custom_id]["content"]
    for k in range(2):  # a line's own sampling reaches the engine and data/
        row = rows[f"aigc-sampled-{k}"]
        assert (row["max_new_tokens"], row["temperature"], row["top_k"]) == (8, 0.0, 5) and row["num_tokens"] <= 8


def test_completion_and_chat_lines_get_what_the_engine_gives_their_prompt_messages_and_sampling(batch_run):
    from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest
    from aigc_dist.models.artifact import load_artifact

    engine = TextEngine(load_artifact(batch_run["artifact"], Storage()))
    output = {line["custom_id"]: line["response"]["body"] for line in batch_run["output"]}
    for custom_id, (url, body) in RAW.items():
        stop = body.get("stop") or ()
        sampling = SamplingParams(body.get("max_tokens") or body.get("max_completion_tokens") or 16,
                                  body.get("temperature", 0.8), body.get("top_k"), body.get("top_p"))
        request = TextRequest(seed=body.get("seed", row_seed(0, custom_id)), sampling=sampling,
                              prompt=body.get("prompt"), messages=body.get("messages"),
                              stop=(stop,) if isinstance(stop, str) else tuple(stop))
        expected = engine.generate([request])[0]
        choice = output[custom_id]["choices"][0]
        assert output[custom_id]["object"] == ("chat.completion" if url == CHAT else "text_completion")
        text = choice["message"]["content"] if url == CHAT else choice["text"]
        assert (text, choice["finish_reason"]) == (expected.text, expected.finish_reason), custom_id
        assert output[custom_id]["usage"]["completion_tokens"] == expected.num_tokens


@pytest.mark.parametrize("line, words", [
    ({"url": COMPLETIONS, "body": {"prompt": "x"}}, 'method null: batch lines are POST requests'),
    ({"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x"}, "extra": 1}, "field 'extra' is not part"),
    ({"method": "POST", "url": COMPLETIONS, "body": {"messages": [{"role": "user", "content": "x"}]}},
     "body.messages belongs to /v1/chat/completions"),
    ({"method": "POST", "url": COMPLETIONS, "body": {"prompt": ["a", "b"]}}, "body.prompt must be one non-empty"),
    ({"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x", "aigc": {"user_id": "u", "item_id": "i"}}},
     "give one of prompt and aigc (got prompt and aigc)"),
    ({"method": "POST", "url": CHAT, "body": {"messages": [{"role": "tool", "content": "x"}]}},
     "body.messages[0].role must be one of system, user, assistant"),
    ({"method": "POST", "url": CHAT, "body": {"messages": [{"role": "user", "content": [{"type": "text"}]}]}},
     "content parts are not supported"),
    ({"method": "POST", "url": CHAT, "body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                                              "max_completion_tokens": 5}}, "disagree"),
    ({"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x", "temperature": 3}}, "body.temperature must be"),
    ({"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x", "stop": ["a"] * 5}}, "body.stop must be"),
    ({"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x", "seed": -1}}, "body.seed must be"),
    ({"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x", "response_format": {"type": "json"}}},
     "body.response_format is not supported"),
])
def test_a_batch_line_is_refused_naming_what_is_wrong(line, words):
    from aigc_dist.batch.openai_batch import parse_batch_line

    request, problem = parse_batch_line(line)
    assert request is None and words in problem, problem


def test_a_batch_line_maps_to_sampling_and_null_fields_are_absent():
    from aigc_dist.batch.openai_batch import parse_batch_line

    request, problem = parse_batch_line({"custom_id": "c", "method": "POST", "url": CHAT, "body": {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7, "top_p": 0.5,
        "stop": "\n", "logprobs": None, "tools": None, "n": 1, "presence_penalty": 0}})
    assert problem is None
    assert request == {"url": CHAT, "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 7,
                       "temperature": None, "top_p": 0.5, "top_k": None, "seed": None, "stop": ["\n"]}
