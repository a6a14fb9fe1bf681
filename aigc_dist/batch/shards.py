"""The stages of the backfill that Ray Data runs, and the task that finishes a shard.

A shard (the unit of commit and of output file) is cut into generate tasks of `backfill.task_rows`
input rows, so that every generator actor works whatever the number of shards:

    ShardPreparer  (actor pool)  join users (same shard of the users table) and items (the catalog,
                                 broadcast to each actor once), drop duplicates, check prompts; report
                                 the bad rows of the users table (each in its own shard) and of the
                                 items table (with shard 0), so they reach errors/ exactly once; emit the
                                 shard task by task as each is prepared (the profile errors ride with task 0)
    ShardGenerator (actor pool)  load the artifact once, generate a task with the shared Text/ImageEngine
                                 in batches of backfill.batch_size, write its rows under `_work/` and
                                 tell the driver (shard, task, rows, actor): row-level progress
    finish_generated (task)      once the driver holds every task of a shard: read them back in task
                                 order, evaluate, filter, write data/ and errors/, commit (commit.py)

Rows inside a shard are sorted by request_id, cut into tasks at fixed offsets, and every row's seed
derives from backfill.seed and its request_id, so a shard generated again after a crash holds the same
rows with the same content as the first attempt (each task is one engine call over the same rows);
only `created_at` (when the attempt finished) and the attempt id in the file names differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from aigc_dist.batch.inputs import WORK_SCHEMA
from aigc_dist.batch.layout import ERRORS_SCHEMA, RunLayout
from aigc_dist.batch.lock import Fence
from aigc_dist.batch.reading import ProfileIndex, read_work_files
from aigc_dist.config import BackfillConfig, StorageConfig
from aigc_dist.metrics import ActorMetrics
from aigc_dist.storage import Storage, join_uri

_KEY_COLUMNS = [("request_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string())]
# `request`: what an OpenAI Batch line asks for (openai_batch.parse_batch_line, the run's defaults filled
# in), as JSON; null for the rows of a candidates or requests table, which the run's sampling serves.
PREPARED_SCHEMA = pa.schema([*_KEY_COLUMNS, ("seed", pa.int64()), ("user", pa.large_string()),
                             ("item", pa.large_string()), ("raw", pa.large_string()), ("label", pa.int32()),
                             ("request", pa.large_string())])
GENERATED_SCHEMAS = {
    "text": PREPARED_SCHEMA.append(pa.field("content", pa.string())).append(pa.field("num_tokens", pa.int32()))
    .append(pa.field("prompt_tokens", pa.int32())).append(pa.field("finished", pa.bool_()))
    .append(pa.field("finish_reason", pa.string())),
    "image": PREPARED_SCHEMA.append(pa.field("image", pa.binary())).append(pa.field("width", pa.int32()))
    .append(pa.field("height", pa.int32())),
}
PENDING_ERRORS_SCHEMA = ERRORS_SCHEMA.remove(ERRORS_SCHEMA.get_field_index("created_at"))
# One generate task: its shard, its place among the shard's tasks, its range's prepared rows and
# errors (task 0 also the shard's bad profile rows). Generated, the same record is what a generator
# writes under `_work/`.
TASK_SCHEMA = pa.schema([("shard", pa.int32()), ("task", pa.int32()), ("num_tasks", pa.int32()),
                         ("rows", pa.large_binary()), ("errors", pa.large_binary()), ("stats", pa.string())])
# What a generator tells the driver of each task it finished (JSON): where its rows are, how many, who.
GENERATED_SCHEMA = pa.schema([("generated", pa.string())])


@dataclass(frozen=True)
class ShardContext:
    """Everything the shard stages need, resolved once on the driver (small and picklable)."""

    root: str
    backfill: BackfillConfig
    storage: StorageConfig
    joins_users: bool  # candidates + users + items; False for a pre-joined requests table
    model: dict[str, Any]  # name, version, digest, kind, max_seq_len, num_classes
    work: str  # the partition pass the plan adopted (`_work/<work>/`)
    fence: Fence  # the driver's lock: checked before every commit and delete
    session: str  # this driver session: names its generated task files, never read by another session
    template: dict[str, Any] | None = None  # text: the artifact's prompt template
    tokenizer: dict[str, Any] | None = None
    labels: list[str] = field(default_factory=list)  # image: class names, index = class id
    requests_format: str = "table"  # data.requests_format: "openai_batch" reads the rows as batch lines
    profiles: bool = False  # users and items tables are given (candidates, or a batch file's aigc lines)


def row_seed(base_seed: int, request_id: str) -> int:
    """Per-row seed from the run's seed and the request_id: 63 bits of sha256."""
    digest = hashlib.sha256(f"{base_seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


def task_row(shard: int, task: int, num_tasks: int, rows: pa.Table, errors: pa.Table,
             stats: dict[str, Any]) -> dict[str, Any]:
    return {"shard": shard, "task": task, "num_tasks": num_tasks, "rows": to_ipc(rows), "errors": to_ipc(errors),
            "stats": json.dumps(stats)}


def error_row(row: dict[str, Any], stage: str, message: str, table: str, content: str | None = None) -> dict[str, Any]:
    return {"request_id": row.get("key", row.get("request_id")), "user_id": row.get("user_id"),
            "item_id": row.get("item_id"), "stage": stage, "error": message, "raw": row["raw"], "content": content,
            "table": table}


def _profile_errors(index: ProfileIndex) -> list[dict[str, Any]]:
    """errors/ rows for the rejected rows of a users or items table (no request_id: they are no request)."""
    rows = sorted(index.rejected(), key=lambda r: (r["key"] or "", r["raw"]))  # the same order in every attempt
    return [{**error_row(r, r["stage"], r["error"], f"{index.side}s"), "request_id": None} for r in rows]


def _in_request_order(work: pa.Table) -> pa.Table:
    """A shard's work rows by (request_id, raw): the same order in every attempt. Sorted in Arrow (UTF-8
    byte order is code point order, as Python sorts str), so that the first task is cut without
    turning the whole shard into Python rows first (100,000 rows: ~1 s of a run's start-up)."""
    keys = pa.table({"key": pc.fill_null(work["key"], ""), "raw": work["raw"]})
    return work.take(pc.sort_indices(keys, sort_keys=[("key", "ascending"), ("raw", "ascending")]))


class ShardPreparer:
    """Ray Data actor: a shard's work rows -> requests ready to generate, plus the rows that failed."""

    def __init__(self, context: ShardContext, gate: Any):
        self.context = context
        self.storage = Storage(context.storage)
        self.layout = RunLayout(context.root)
        self.gate = gate
        self.items: ProfileIndex | None = None  # once the partition pass is done (`_input`)
        self.users: ProfileIndex | None = None  # a batch file's: the whole users snapshot, read on first use
        self.batch = context.requests_format == "openai_batch"
        self.side = "candidates" if context.joins_users else "requests"
        self.template = self.tokenizer = None
        if context.template is not None:
            from aigc_dist.data.prompts import PromptTemplate
            from aigc_dist.models.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TextTokenizer

            self.template = PromptTemplate(**context.template)
            uri = context.tokenizer["uri"]  # the artifact's own tokenizer files: prompts as its engine encodes them
            self.tokenizer = TextTokenizer.from_files(self.storage.read_bytes(join_uri(uri, TOKENIZER_FILE)),
                                                      self.storage.read_bytes(join_uri(uri, TOKENIZER_CONFIG_FILE)),
                                                      uri)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        # One task per output block (the pipeline sets the dataset's block size so): Ray Data hands each
        # to a generator as soon as it is yielded, while the rest of the shard is being prepared.
        for shard in batch["shard"].to_pylist():
            for task in self.prepare(shard):
                yield pa.Table.from_pylist([task], schema=TASK_SCHEMA)

    def _input(self) -> ProfileIndex | None:
        """The run's items snapshot once this session's partition pass has written the input (startup.py),
        fetched from the object store once per actor; None when the pass failed (the driver raises its error)."""
        if self.items is None:
            import ray

            item_refs, error = ray.get(self.gate.wait.remote())
            if error is not None:
                return None
            items = [ray.get(ref) for ref in item_refs]
            self.items = ProfileIndex(pa.concat_tables(items) if items else WORK_SCHEMA.empty_table(), "item")
        return self.items

    def _batch_users(self) -> ProfileIndex:
        """A batch file's users: not sharded with its lines (those go by custom_id, so duplicates meet), but
        one snapshot (shard 0 of the pass) that every preparer reads once."""
        if self.users is None:
            self.users = ProfileIndex(read_work_files(self.storage, self.layout.work_dir(self.context.work, "users",
                                                                                         0)), "user")
        return self.users

    def _condition(self, user: dict[str, Any], item: dict[str, Any],
                   max_new_tokens: int | None = None) -> tuple[int | None, str | None]:
        """(image label, None) or (None, why no prompt/condition can be built for this pair)."""
        backfill, model = self.context.backfill, self.context.model
        max_new_tokens = max_new_tokens or backfill.max_new_tokens
        if self.template is not None:
            from aigc_dist.data.prompts import encode_prompt

            try:
                prompt = encode_prompt(user, item, self.template, self.tokenizer)
            except ValueError as exc:  # PromptError, or text that cannot be encoded
                return None, str(exc)
            if len(prompt) + max_new_tokens > model["max_seq_len"]:
                return None, (f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds "
                              f"the model's context of {model['max_seq_len']}")
            return None, None
        side, name = backfill.image_label_field.split(".", 1)
        value = (user if side == "user" else item).get(name)
        if isinstance(value, str) and value in self.context.labels:
            value = self.context.labels.index(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < model["num_classes"]:
            return None, (f"{backfill.image_label_field}={value!r} is not a class of the model (an id in "
                          f"[0, {model['num_classes']}) or one of its {len(self.context.labels)} label names)")
        return value, None

    def prepare(self, shard: int) -> Iterator[dict[str, Any]]:
        """The shard's generate tasks, one by one: its input rows in request_id order, cut at fixed offsets
        of task_rows rows, each task holding the range's prepared rows and its errors (task 0 also the bad
        rows of the shard's users and, in shard 0, of the items)."""
        items = self._input()  # (the first call waits until this session's partition pass has written it)
        if items is None:  # the pass failed: no tasks; the driver ends the pipeline and raises the pass's error
            return
        started = time.perf_counter()
        work_pass = self.context.work
        work = _in_request_order(read_work_files(self.storage, self.layout.work_dir(work_pass, "requests", shard)))
        users, errors, seen = None, [], set()
        if self.context.joins_users:
            users = ProfileIndex(read_work_files(self.storage, self.layout.work_dir(work_pass, "users", shard)), "user")
            errors += _profile_errors(users)
            if shard == 0:
                errors += _profile_errors(items)
        elif self.context.profiles and shard == 0:  # a batch file's users and items: one snapshot each
            errors += _profile_errors(self._batch_users()) + _profile_errors(items)
        size = self.context.backfill.task_rows
        num_tasks = max(1, math.ceil(work.num_rows / size))
        for number in range(num_tasks):
            rows = work.slice(number * size, size).to_pylist()  # Python rows of one task at a time
            prepared = []
            for row in rows:
                request, problem = self._prepare_row(row, users, seen)
                if problem is not None:
                    errors.append(error_row(row, *problem, self.side))
                else:
                    prepared.append(request)
            # `rows`: the requests-side input rows the task accounts for (the driver counts progress by them).
            stats = {"seconds": {"prepare": time.perf_counter() - started}, "side": self.side, "rows": len(rows)}
            yield task_row(shard, number, num_tasks, pa.Table.from_pylist(prepared, schema=PREPARED_SCHEMA),
                           pa.Table.from_pylist(errors, schema=PENDING_ERRORS_SCHEMA), stats)
            errors, started = [], time.perf_counter()

    def _prepare_row(self, row: dict[str, Any], users: ProfileIndex | None,
                     seen: set[str]) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
        """(request, None), or (None, (stage, reason)) for a row that goes to errors/."""
        if row["error"] is not None:
            return None, (row["stage"], row["error"])
        if row["key"] in seen:  # rows are in (request_id, raw) order, so the first of a duplicate is kept
            name = "custom_id" if self.batch else "request_id"
            return None, ("validate", f"duplicate {name} {row['key']} (the first row is kept)")
        seen.add(row["key"])
        if self.batch:
            return self._prepare_line(row)
        if users is not None:
            (user, user_problem), (item, item_problem) = users.get(row["user_id"]), self.items.get(row["item_id"])
            if user_problem or item_problem:
                return None, ("join", user_problem or item_problem)
        else:
            user = item = json.loads(row["raw"])
        label, problem = self._condition(user, item)
        if problem:
            return None, ("prompt", problem)
        return {"request_id": row["key"], "user_id": row["user_id"], "item_id": row["item_id"],
                "seed": row_seed(self.context.backfill.seed, row["key"]), "user": json.dumps(user),
                "item": json.dumps(item), "raw": row["raw"], "label": label, "request": None}, None

    def _prepare_line(self, row: dict[str, Any]) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
        """A batch file's line: its request with the run's sampling where the body leaves it; an aigc line
        joins the users and items tables and renders the run's own prompt, as a candidates row does."""
        from aigc_dist.batch.openai_batch import parse_batch_line

        backfill = self.context.backfill
        request, _ = parse_batch_line(json.loads(row["raw"]))  # valid: the partition pass checked it
        defaults = {"max_new_tokens": backfill.max_new_tokens, "temperature": backfill.temperature,
                    "top_k": backfill.top_k, "top_p": backfill.top_p,
                    "seed": row_seed(backfill.seed, row["key"])}
        request.update({k: v for k, v in defaults.items() if request.get(k) is None})
        user: dict[str, Any] = {}
        item: dict[str, Any] = {}
        if "aigc" in request:
            if not self.context.profiles:
                return None, ("join", "body.aigc names a user and an item: set data.users and data.items")
            (user, user_problem), (item, item_problem) = (self._batch_users().get(row["user_id"]),
                                                          self.items.get(row["item_id"]))
            if user_problem or item_problem:
                return None, ("join", user_problem or item_problem)
            _, problem = self._condition(user, item, request["max_new_tokens"])
            if problem:
                return None, ("prompt", problem)
        return {"request_id": row["key"], "user_id": row["user_id"], "item_id": row["item_id"],
                "seed": request["seed"], "user": json.dumps(user), "item": json.dumps(item), "raw": row["raw"],
                "label": None, "request": json.dumps(request)}, None


class ShardGenerator:
    """Ray Data actor: loads the artifact once, then generates task after task, of any shard."""

    def __init__(self, context: ShardContext):
        import ray
        import torch

        from aigc_dist.models.artifact import load_artifact

        backfill = context.backfill
        # Each actor gets its share of cores; co-located actors would otherwise oversubscribe them.
        torch.set_num_threads(max(1, int(backfill.cpus_per_actor)))
        device = "cuda" if backfill.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.context, self.storage, self.layout = context, Storage(context.storage), RunLayout(context.root)
        # Who generated what, as the manifest reports it: the host and the process of this actor.
        self.name = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.mode = context.backfill.mode
        if self.mode == "text":
            from aigc_dist.engine.text import SamplingParams
            from aigc_dist.engine.vllm_engine import text_engine

            engine = backfill.engine
            self.engine: Any = text_engine(backfill.artifact, self.storage, engine.backend, device=device,
                                           max_batch_size=backfill.batch_size, kv_cache_gib=engine.vllm_kv_cache_gib,
                                           gpu_memory_utilization=engine.vllm_gpu_memory_utilization,
                                           vllm_min_parameters=engine.vllm_min_parameters)
            self.sampling = SamplingParams(backfill.max_new_tokens, backfill.temperature, backfill.top_k,
                                           backfill.top_p)
        else:
            from aigc_dist.engine.images import ImageEngine

            self.engine = ImageEngine(load_artifact(backfill.artifact, self.storage, device=device),
                                      max_batch_size=backfill.batch_size)
        self.metrics = ActorMetrics("backfill", {"run": backfill.run_id, "model": context.model["name"]})

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"generated": [json.dumps(self.generate(task)) for task in batch.to_pylist()]},
                        schema=GENERATED_SCHEMA)

    def _results(self, requests: list[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, str | None]]:
        """(output columns, None) or (None, error) per request, in order."""
        if self.mode == "text":
            results = self.engine.generate([self._text_request(r) for r in requests])
            return [(None, res.error) if res.error else
                    ({"content": res.text, "num_tokens": res.num_tokens, "prompt_tokens": res.prompt_tokens,
                      "finished": res.finished, "finish_reason": res.finish_reason}, None) for res in results]
        from aigc_dist.engine.images import ImageRequest

        results = self.engine.generate([ImageRequest(r["label"], None, r["seed"]) for r in requests])
        return [(None, res.error) if res.error else
                ({"image": res.png, "width": res.width, "height": res.height}, None) for res in results]

    def _text_request(self, row: dict[str, Any]) -> Any:
        """The engine's request for a prepared row: the run's sampling, or a batch line's own (and its raw
        prompt or chat messages, when it gives them instead of an aigc user and item)."""
        from aigc_dist.engine.text import SamplingParams, TextRequest

        user, item = json.loads(row["user"]), json.loads(row["item"])
        if row.get("request") is None:
            return TextRequest(user, item, row["seed"], self.sampling)
        request = json.loads(row["request"])
        sampling = SamplingParams(request["max_new_tokens"], request["temperature"], request["top_k"],
                                  request["top_p"])
        return TextRequest(user, item, row["seed"], sampling, prompt=request.get("prompt"),
                           messages=request.get("messages"), stop=tuple(request["stop"]))

    def _record(self, results: list[tuple[dict[str, Any] | None, str | None]], seconds: float) -> None:
        ok = [columns for columns, problem in results if problem is None]
        self.metrics.observe("aigc_generate_batch_seconds", seconds)
        self.metrics.observe("aigc_generate_batch_size_rows", len(results))
        self.metrics.inc("aigc_generate_rows_total", len(ok), status="ok")
        self.metrics.inc("aigc_generate_rows_total", len(results) - len(ok), status="error")
        if self.mode == "text":
            self.metrics.inc("aigc_generated_tokens_total", sum(columns["num_tokens"] for columns in ok))
        else:
            self.metrics.inc("aigc_generated_images_total", len(ok))

    def generate(self, task: dict[str, Any]) -> dict[str, Any]:
        """Generate one task, write it under `_work/` (whole, as one object) and say where."""
        started = time.perf_counter()
        requests = from_ipc(task["rows"]).to_pylist()
        errors = from_ipc(task["errors"]).to_pylist()
        stats = json.loads(task["stats"])
        # One engine call per task: its scheduler keeps backfill.batch_size decode slots busy across
        # the task's rows (task_rows is several batches, so the call's draining tail is a small share).
        results = self._results(requests) if requests else []
        if requests:
            self._record(results, time.perf_counter() - started)
        generated = []
        for request, (columns, problem) in zip(requests, results, strict=True):
            if problem is not None:
                errors.append(error_row(request, "generate", problem, stats["side"]))
            else:
                generated.append({**request, **columns})
        stats["seconds"]["generate"] = time.perf_counter() - started
        stats["actors"] = {self.name: len(requests)}
        record = task_row(task["shard"], task["task"], task["num_tasks"],
                          pa.Table.from_pylist(generated, schema=GENERATED_SCHEMAS[self.mode]),
                          pa.Table.from_pylist(errors, schema=PENDING_ERRORS_SCHEMA), stats)
        uri = self.layout.uri(self.layout.generated_file(self.context.work, task["shard"], task["task"],
                                                         self.context.session))
        self.storage.write_bytes(uri, to_ipc(pa.Table.from_pylist([record], schema=TASK_SCHEMA)))
        return {"shard": task["shard"], "task": task["task"], "num_tasks": task["num_tasks"], "uri": uri,
                "rows": stats["rows"], "generated": len(generated), "actor": self.name,
                "tokens": sum(row.get("num_tokens") or 0 for row in generated)}


