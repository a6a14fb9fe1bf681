"""Finishing a shard: gather its generated tasks, evaluate, filter, write its files, commit.

The driver starts `finish_generated` (a Ray task) once it has heard of every generate task of a
shard. The tasks' rows are read back from `_work/` in task order, which is the shard's request_id
order, so the shard's files hold the same rows in the same order however its tasks were spread over
the actors. Commit (commit.py) is per shard, as before: exactly once does not depend on the tasks.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from aigc_dist.batch.commit import commit_shard
from aigc_dist.batch.layout import ERRORS_SCHEMA, STAGES, RunLayout
from aigc_dist.batch.lock import FencedError
from aigc_dist.batch.openai_batch import output_lines
from aigc_dist.batch.run_state import CommitMarker, Counts, ShardStats, read_marker
from aigc_dist.batch.shards import ShardContext, error_row, from_ipc
from aigc_dist.batch.tasks import backfill_task
from aigc_dist.storage import Storage

log = logging.getLogger(__name__)


def _keys(row: dict[str, Any], model: dict[str, Any], created_at: Any) -> dict[str, Any]:
    """The data/ columns every modality has: the row's keys, the model that made it, its seed, its time."""
    return {"request_id": row["request_id"], "user_id": row["user_id"], "item_id": row["item_id"],
            "model_name": model["name"], "model_version": model["version"], "model_digest": model["digest"],
            "seed": row["seed"], "created_at": created_at}


def read_generated(tasks: list[dict[str, Any]], storage: Storage,
                   schema: pa.Schema) -> tuple[pa.Table, list[dict], dict]:  # fmt: skip
    """(generated rows, pending errors, stats) of a shard from its tasks' files, in task order; stats sum
    the tasks' seconds by stage and rows by actor."""
    rows, errors = [], []
    stats: dict[str, Any] = {"seconds": {}, "actors": {}}
    for task in sorted(tasks, key=lambda t: t["task"]):
        record = from_ipc(storage.read_bytes(task["uri"])).to_pylist()[0]
        rows.append(from_ipc(record["rows"]))
        errors += from_ipc(record["errors"]).to_pylist()
        part = json.loads(record["stats"])
        stats["side"] = part["side"]
        for stage, seconds in part["seconds"].items():
            stats["seconds"][stage] = stats["seconds"].get(stage, 0.0) + seconds
        for actor, count in part["actors"].items():
            stats["actors"][actor] = stats["actors"].get(actor, 0) + count
    table = pa.concat_tables(rows) if rows else schema.empty_table()
    return table, errors, stats


def finish_shard(shard: int, tasks: list[dict[str, Any]], context: ShardContext) -> CommitMarker:
    """Evaluate and filter a generated shard, write its files and commit it; returns the commit marker."""
    storage, layout = Storage(context.storage), RunLayout(context.root)
    # A retry of this task after its first try committed (its node died before it returned) finds
    # the marker, and the task files that try deleted are not needed.
    if storage.exists(layout.commit_marker(shard)):
        return read_marker(layout, storage, shard)
    started = time.perf_counter()
    backfill, modality = context.backfill, backfill_task(context, storage)
    created_at = datetime.datetime.now(datetime.UTC)
    generated, errors, stats = read_generated(tasks, storage, modality.generated_schema)
    side = stats["side"]
    data, answered = [], []  # answered: the generated rows kept in data/, for the OpenAI output lines
    scored = []  # each generated copy's entry of the shard's quality sums (text), filtered ones too
    for row in generated.to_pylist():
        columns, score, reason = modality.finish_row(row)
        if score is not None:
            scored.append(score)
        if reason is not None:
            errors.append(error_row(row, "filter", reason, side, content=row.get("content")))
            continue
        data.append({**_keys(row, context.model, created_at), **columns})
        answered.append(row)
    for error in errors:
        error["created_at"] = created_at
    requests_side = [e for e in errors if e["table"] == side]
    by_stage = {stage: sum(e["stage"] == stage for e in requests_side) for stage in STAGES}
    filtered = by_stage["filter"]
    counts = Counts(total=len(data) + len(requests_side), ok=len(data), quarantined=len(requests_side) - filtered,
                    filtered=filtered, by_stage={k: v for k, v in by_stage.items() if v},
                    profiles={table: sum(e["table"] == table for e in errors) for table in ("users", "items")})
    seconds = {**stats["seconds"], "finish": time.perf_counter() - started}
    shard_stats = ShardStats(counts, sum(r.get("num_tokens", 0) for r in data),
                             sum(r.get("prompt_tokens", 0) for r in data), seconds, stats["actors"], len(tasks),
                             modality.shard_quality(scored))
    outputs: dict[str, Any] = {"data": pa.Table.from_pylist(data, schema=modality.data_schema),
                               "errors": pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)}
    if backfill.output_format == "parquet+openai":
        outputs.update(output_lines(backfill.run_id, context.model["name"], answered, errors, side,
                                    int(created_at.timestamp())))
    marker = commit_shard(layout, storage, shard, outputs, shard_stats, context.fence, backfill.max_file_bytes)
    # Committed (ours or a winner's): the task files are this session's own and no longer needed;
    # what a failed delete leaves goes with `_work/` when the run completes.
    for task in tasks:
        try:
            storage.delete(task["uri"])
        except OSError as exc:
            log.warning("could not delete %s: %s", task["uri"], exc)
    return marker


@dataclass(frozen=True)
class Fenced:
    """What finish_generated returns when the driver's lock was taken over: nothing was committed."""

    shard: int
    reason: str


def finish_generated(shard: int, tasks: list[dict[str, Any]], context: ShardContext) -> CommitMarker | Fenced:
    """Ray task: finish the shard; its commit marker, or (the driver's lock was taken over) why nothing
    was committed, which the driver must hear as such (exit 4), not as a failed task."""
    try:
        return finish_shard(shard, tasks, context)
    except FencedError as exc:
        return Fenced(shard, str(exc))
