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
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from aigc_dist.batch.inputs import WORK_SCHEMA
from aigc_dist.batch.layout import ERRORS_SCHEMA, RunLayout
from aigc_dist.batch.lock import Fence
from aigc_dist.batch.reading import ProfileIndex, read_work_files
from aigc_dist.batch.tasks import PREPARED_SCHEMA, Results, backfill_task
from aigc_dist.config import BackfillConfig, StorageConfig
from aigc_dist.metrics import ActorMetrics
from aigc_dist.storage import Storage

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
    model: dict[str, Any]  # pipeline.describe_artifact: name, version, digest, kind, sizes, template, tokenizer, labels
    work: str  # the partition pass the plan adopted (`_work/<work>/`)
    fence: Fence  # the driver's lock: checked before every commit and delete
    session: str  # this driver session: names its generated task files, never read by another session
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
        self.task = backfill_task(context, self.storage)

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
        condition, problem = self.task.condition(user, item)
        if problem:
            return None, ("prompt", problem)
        return {"request_id": row["key"], "user_id": row["user_id"], "item_id": row["item_id"],
                "seed": row_seed(self.context.backfill.seed, row["key"]), "user": json.dumps(user),
                "item": json.dumps(item), "raw": row["raw"], "request": None, **condition}, None

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
        condition: dict[str, Any] = {}  # a raw prompt or messages: the engine encodes them
        if "aigc" in request:
            if not self.context.profiles:
                return None, ("join", "body.aigc names a user and an item: set data.users and data.items")
            (user, user_problem), (item, item_problem) = (self._batch_users().get(row["user_id"]),
                                                          self.items.get(row["item_id"]))
            if user_problem or item_problem:
                return None, ("join", user_problem or item_problem)
            condition, problem = self.task.condition(user, item, request["max_new_tokens"])
            if problem:
                return None, ("prompt", problem)
        return {"request_id": row["key"], "user_id": row["user_id"], "item_id": row["item_id"],
                "seed": request["seed"], "user": json.dumps(user), "item": json.dumps(item), "raw": row["raw"],
                "request": json.dumps(request), **condition}, None


class ShardGenerator:
    """Ray Data actor: loads the artifact once, then generates task after task, of any shard."""

    def __init__(self, context: ShardContext):
        import ray
        import torch

        backfill = context.backfill
        # Each actor gets its share of cores; co-located actors would otherwise oversubscribe them.
        torch.set_num_threads(max(1, int(backfill.cpus_per_actor)))
        device = "cuda" if backfill.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.context, self.storage, self.layout = context, Storage(context.storage), RunLayout(context.root)
        # Who generated what, as the manifest reports it: the host and the process of this actor.
        self.name = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.task = backfill_task(context, self.storage)
        self.engine = self.task.open_engine(device)
        self.metrics = ActorMetrics("backfill", {"run": backfill.run_id, "model": context.model["name"]})

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"generated": [json.dumps(self.generate(task)) for task in batch.to_pylist()]},
                        schema=GENERATED_SCHEMA)

    def _record(self, results: Results, seconds: float) -> None:
        ok = [columns for columns, problem in results if problem is None]
        self.metrics.observe("aigc_generate_batch_seconds", seconds)
        self.metrics.observe("aigc_generate_batch_size_rows", len(results))
        self.metrics.inc("aigc_generate_rows_total", len(ok), status="ok")
        self.metrics.inc("aigc_generate_rows_total", len(results) - len(ok), status="error")
        self.task.record(self.metrics, ok)

    def generate(self, task: dict[str, Any]) -> dict[str, Any]:
        """Generate one task, write it under `_work/` (whole, as one object) and say where."""
        started = time.perf_counter()
        requests = from_ipc(task["rows"]).to_pylist()
        errors = from_ipc(task["errors"]).to_pylist()
        stats = json.loads(task["stats"])
        # One engine call per task: its scheduler keeps backfill.batch_size decode slots busy across
        # the task's rows (task_rows is several batches, so the call's draining tail is a small share).
        results = self.task.generate(self.engine, requests) if requests else []
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
                          pa.Table.from_pylist(generated, schema=self.task.generated_schema),
                          pa.Table.from_pylist(errors, schema=PENDING_ERRORS_SCHEMA), stats)
        uri = self.layout.uri(self.layout.generated_file(self.context.work, task["shard"], task["task"],
                                                         self.context.session))
        self.storage.write_bytes(uri, to_ipc(pa.Table.from_pylist([record], schema=TASK_SCHEMA)))
        return {"shard": task["shard"], "task": task["task"], "num_tasks": task["num_tasks"], "uri": uri,
                "rows": stats["rows"], "generated": len(generated), "actor": self.name,
                "tokens": sum(row.get("num_tokens") or 0 for row in generated)}


