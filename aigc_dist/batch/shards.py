"""The per-shard stages of the backfill, as Ray Data runs them.

A shard travels through the pipeline as one row (its number plus Arrow IPC payloads), so Ray Data
can never split or merge shards while it streams them through three stages:

    ShardPreparer  (actor pool)  join users (same shard of the users table) and items (the catalog,
                                 broadcast to each actor once), drop duplicates, check prompts; report
                                 the bad rows of the users table (each in its own shard) and of the
                                 items table (with shard 0), so they reach errors/ exactly once
    ShardGenerator (actor pool)  load the artifact once, generate with the shared Text/ImageEngine
                                 in batches of backfill.batch_size
    finish_shards  (tasks)       evaluate, filter, write data/ and errors/, commit (commit.py)

Rows inside a shard are sorted by request_id and every row's seed derives from backfill.seed and its
request_id, so a shard generated again after a crash holds the same rows with the same content as
the first attempt; only `created_at` (when the attempt finished) and the attempt id in the file
names differ.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from aigc_dist.batch.commit import commit_shard
from aigc_dist.batch.inputs import WORK_SCHEMA
from aigc_dist.batch.layout import ERRORS_SCHEMA, IMAGE_SCHEMA, STAGES, TEXT_SCHEMA, RunLayout
from aigc_dist.batch.lock import Fence, FencedError
from aigc_dist.batch.quality import filter_reason, text_quality
from aigc_dist.batch.reading import ProfileIndex, read_work_files
from aigc_dist.config import BackfillConfig, StorageConfig
from aigc_dist.metrics import ActorMetrics
from aigc_dist.storage import Storage, join_uri

_KEY_COLUMNS = [("request_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string())]
PREPARED_SCHEMA = pa.schema([*_KEY_COLUMNS, ("seed", pa.int64()), ("user", pa.large_string()),
                             ("item", pa.large_string()), ("raw", pa.large_string()), ("label", pa.int32())])
GENERATED_SCHEMAS = {
    "text": PREPARED_SCHEMA.append(pa.field("content", pa.string())).append(pa.field("num_tokens", pa.int32()))
    .append(pa.field("prompt_tokens", pa.int32())).append(pa.field("finished", pa.bool_())),
    "image": PREPARED_SCHEMA.append(pa.field("image", pa.binary())).append(pa.field("width", pa.int32()))
    .append(pa.field("height", pa.int32())),
}
PENDING_ERRORS_SCHEMA = ERRORS_SCHEMA.remove(ERRORS_SCHEMA.get_field_index("created_at"))
SHARD_SCHEMA = pa.schema([("shard", pa.int32()), ("rows", pa.large_binary()), ("errors", pa.large_binary()),
                          ("stats", pa.string())])


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
    template: dict[str, Any] | None = None  # text: the artifact's prompt template
    tokenizer: dict[str, Any] | None = None
    labels: list[str] = field(default_factory=list)  # image: class names, index = class id


def stats_side(shard_row: dict[str, Any]) -> str:
    """The requests-side table of a shard in flight ("candidates" or "requests")."""
    return json.loads(shard_row["stats"])["side"]


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


def _shard_row(shard: int, rows: pa.Table, errors: pa.Table, stats: dict[str, Any]) -> dict[str, Any]:
    return {"shard": shard, "rows": to_ipc(rows), "errors": to_ipc(errors), "stats": json.dumps(stats)}


def _error(row: dict[str, Any], stage: str, message: str, table: str, content: str | None = None) -> dict[str, Any]:
    return {"request_id": row.get("key", row.get("request_id")), "user_id": row.get("user_id"),
            "item_id": row.get("item_id"), "stage": stage, "error": message, "raw": row["raw"], "content": content,
            "table": table}


def _profile_errors(index: ProfileIndex) -> list[dict[str, Any]]:
    """errors/ rows for the rejected rows of a users or items table (no request_id: they are no request)."""
    rows = sorted(index.rejected(), key=lambda r: (r["key"] or "", r["raw"]))  # the same order in every attempt
    return [{**_error(r, r["stage"], r["error"], f"{index.side}s"), "request_id": None} for r in rows]


class ShardPreparer:
    """Ray Data actor: a shard's work rows -> requests ready to generate, plus the rows that failed."""

    def __init__(self, context: ShardContext, item_refs: list[Any]):
        import ray

        self.context = context
        self.storage = Storage(context.storage)
        self.layout = RunLayout(context.root)
        items = [ray.get(ref) for ref in item_refs]
        self.items = ProfileIndex(pa.concat_tables(items) if items else WORK_SCHEMA.empty_table(), "item")
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.prepare(shard) for shard in batch["shard"].to_pylist()]
        return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)

    def _condition(self, user: dict[str, Any], item: dict[str, Any]) -> tuple[int | None, str | None]:
        """(image label, None) or (None, why no prompt/condition can be built for this pair)."""
        backfill, model = self.context.backfill, self.context.model
        if self.template is not None:
            from aigc_dist.data.prompts import encode_prompt

            try:
                prompt = encode_prompt(user, item, self.template, self.tokenizer)
            except ValueError as exc:  # PromptError, or text that cannot be encoded
                return None, str(exc)
            if len(prompt) + backfill.max_new_tokens > model["max_seq_len"]:
                return None, (f"prompt of {len(prompt)} tokens + max_new_tokens={backfill.max_new_tokens} exceeds "
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

    def prepare(self, shard: int) -> dict[str, Any]:
        started = time.perf_counter()
        work_pass = self.context.work
        work = read_work_files(self.storage, self.layout.work_dir(work_pass, "requests", shard)).to_pylist()
        users = None
        prepared, errors, seen = [], [], set()
        if self.context.joins_users:
            users = ProfileIndex(read_work_files(self.storage, self.layout.work_dir(work_pass, "users", shard)), "user")
            errors += _profile_errors(users)
            if shard == 0:
                errors += _profile_errors(self.items)
        work.sort(key=lambda r: (r["key"] or "", r["raw"]))  # the same order in every attempt
        for row in work:
            if row["error"] is not None:
                errors.append(_error(row, row["stage"], row["error"], self.side))
                continue
            if row["key"] in seen:
                errors.append(_error(row, "validate", f"duplicate request_id {row['key']} (the first row is kept)",
                                     self.side))
                continue
            seen.add(row["key"])
            if users is not None:
                (user, user_problem), (item, item_problem) = users.get(row["user_id"]), self.items.get(row["item_id"])
                if user_problem or item_problem:
                    errors.append(_error(row, "join", user_problem or item_problem, self.side))
                    continue
            else:
                user = item = json.loads(row["raw"])
            label, problem = self._condition(user, item)
            if problem:
                errors.append(_error(row, "prompt", problem, self.side))
                continue
            prepared.append({"request_id": row["key"], "user_id": row["user_id"], "item_id": row["item_id"],
                             "seed": row_seed(self.context.backfill.seed, row["key"]), "user": json.dumps(user),
                             "item": json.dumps(item), "raw": row["raw"], "label": label})
        stats = {"seconds": {"prepare": time.perf_counter() - started}, "input_rows": len(work), "side": self.side}
        return _shard_row(shard, pa.Table.from_pylist(prepared, schema=PREPARED_SCHEMA),
                          pa.Table.from_pylist(errors, schema=PENDING_ERRORS_SCHEMA), stats)


class ShardGenerator:
    """Ray Data actor: loads the artifact once, then generates every prepared request of a shard."""

    def __init__(self, context: ShardContext):
        import torch

        from aigc_dist.models.artifact import load_artifact

        backfill = context.backfill
        # Each actor gets its share of cores; co-located actors would otherwise oversubscribe them.
        torch.set_num_threads(max(1, int(backfill.cpus_per_actor)))
        device = "cuda" if backfill.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        artifact = load_artifact(backfill.artifact, Storage(context.storage), device=device)
        self.mode = context.backfill.mode
        if self.mode == "text":
            from aigc_dist.engine.text import SamplingParams, TextEngine

            self.engine: Any = TextEngine(artifact, max_batch_size=backfill.batch_size)
            self.sampling = SamplingParams(backfill.max_new_tokens, backfill.temperature, backfill.top_k,
                                           backfill.top_p)
        else:
            from aigc_dist.engine.images import ImageEngine

            self.engine = ImageEngine(artifact, max_batch_size=backfill.batch_size)
        self.metrics = ActorMetrics("backfill", {"run": backfill.run_id, "model": context.model["name"]})

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.generate(row) for row in batch.to_pylist()], schema=SHARD_SCHEMA)

    def _results(self, requests: list[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, str | None]]:
        """(output columns, None) or (None, error) per request, in order."""
        if self.mode == "text":
            from aigc_dist.engine.text import TextRequest

            results = self.engine.generate([TextRequest(json.loads(r["user"]), json.loads(r["item"]), r["seed"],
                                                        self.sampling) for r in requests])
            return [(None, res.error) if res.error else
                    ({"content": res.text, "num_tokens": res.num_tokens, "prompt_tokens": res.prompt_tokens,
                      "finished": res.finished}, None) for res in results]
        from aigc_dist.engine.images import ImageRequest

        results = self.engine.generate([ImageRequest(r["label"], None, r["seed"]) for r in requests])
        return [(None, res.error) if res.error else
                ({"image": res.png, "width": res.width, "height": res.height}, None) for res in results]

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

    def generate(self, shard_row: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        requests = from_ipc(shard_row["rows"]).to_pylist()
        errors = from_ipc(shard_row["errors"]).to_pylist()
        # One engine call for the whole shard: its scheduler keeps backfill.batch_size decode slots
        # busy across the shard; smaller calls would drain them at every call's end.
        tick = time.perf_counter()
        results = self._results(requests)
        if requests:
            self._record(results, time.perf_counter() - tick)
        generated = []
        for request, (columns, problem) in zip(requests, results, strict=True):
            if problem is not None:
                errors.append(_error(request, "generate", problem, stats_side(shard_row)))
            else:
                generated.append({**request, **columns})
        stats = json.loads(shard_row["stats"])
        stats["seconds"]["generate"] = time.perf_counter() - started
        return _shard_row(shard_row["shard"], pa.Table.from_pylist(generated, schema=GENERATED_SCHEMAS[self.mode]),
                          pa.Table.from_pylist(errors, schema=PENDING_ERRORS_SCHEMA), stats)


def _data_row(row: dict[str, Any], context: ShardContext, created_at: Any) -> dict[str, Any]:
    backfill, model = context.backfill, context.model
    out = {"request_id": row["request_id"], "user_id": row["user_id"], "item_id": row["item_id"],
           "model_name": model["name"], "model_version": model["version"], "model_digest": model["digest"],
           "seed": row["seed"], "created_at": created_at}
    if backfill.mode == "image":
        return {**out, "image": row["image"], "label": row["label"], "width": row["width"], "height": row["height"],
                "num_bytes": len(row["image"])}
    return {**out, "content": row["content"], "temperature": backfill.temperature, "top_k": backfill.top_k,
            "top_p": backfill.top_p, "max_new_tokens": backfill.max_new_tokens, "num_tokens": row["num_tokens"],
            "prompt_tokens": row["prompt_tokens"], "finished": row["finished"]}


def finish_shard(shard_row: dict[str, Any], context: ShardContext) -> dict[str, Any]:
    """Evaluate and filter a generated shard, write its files and commit it; returns the commit marker."""
    import datetime

    started = time.perf_counter()
    backfill = context.backfill
    created_at = datetime.datetime.now(datetime.UTC)
    errors = from_ipc(shard_row["errors"]).to_pylist()
    data = []
    for row in from_ipc(shard_row["rows"]).to_pylist():
        out = _data_row(row, context, created_at)
        if backfill.mode == "text":
            out.update(text_quality(row["content"], json.loads(row["user"]), json.loads(row["item"])))
            reason = filter_reason(row["content"], out, backfill)
            if reason is not None:
                errors.append(_error(row, "filter", reason, stats_side(shard_row), content=row["content"]))
                continue
        data.append(out)
    for error in errors:
        error["created_at"] = created_at
    stats = json.loads(shard_row["stats"])
    side = stats.pop("side")
    requests_side = [e for e in errors if e["table"] == side]
    by_stage = {stage: sum(e["stage"] == stage for e in requests_side) for stage in STAGES}
    filtered = by_stage["filter"]
    stats.update(
        counts={"total": len(data) + len(requests_side), "ok": len(data),
                "quarantined": len(requests_side) - filtered, "filtered": filtered,
                "by_stage": {k: v for k, v in by_stage.items() if v},
                "profiles": {table: sum(e["table"] == table for e in errors) for table in ("users", "items")}},
        tokens={"generated": sum(r.get("num_tokens", 0) for r in data),
                "prompt": sum(r.get("prompt_tokens", 0) for r in data)},
    )
    stats["seconds"]["finish"] = time.perf_counter() - started
    schema = TEXT_SCHEMA if backfill.mode == "text" else IMAGE_SCHEMA
    outputs = {"data": pa.Table.from_pylist(data, schema=schema),
               "errors": pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)}
    return commit_shard(RunLayout(context.root), Storage(context.storage), shard_row["shard"], outputs, stats,
                        context.fence)


def _finished(row: dict[str, Any], context: ShardContext) -> dict[str, Any]:
    try:
        return finish_shard(row, context)
    except FencedError as exc:  # the driver must hear it as such (exit 4), not as a failed task
        return {"shard": row["shard"], "fenced": str(exc)}


def finish_shards(batch: pa.Table, context: ShardContext) -> pa.Table:
    """Ray Data task: finish each shard of the batch; one row per shard holding its commit marker
    (or, when the driver's lock was taken over, why nothing was committed)."""
    markers = [_finished(row, context) for row in batch.to_pylist()]
    return pa.table({"shard": pa.array([m["shard"] for m in markers], pa.int32()),
                     "commit": pa.array([json.dumps(m) for m in markers], pa.string())})
