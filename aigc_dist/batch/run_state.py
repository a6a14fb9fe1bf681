"""The run's own records: its plan and each shard's commit marker, one dataclass with one reader and
one writer each.

    _plan.json                  Plan: the partition pass, the shard count, the input's identity
    _commits/shard-K.json       CommitMarker: the files one attempt of shard K committed, its counts

(The manifest, the JSON document users read, has its one reader and writer in layout.py.)

The JSON is the format runs were written in before these classes existed, so an earlier run resumes
as it is: fields that were added later (`actors`, `tasks`, `quality`, `counts.profiles`) read with the
value they stood for when absent. Every write of a plan or a marker is exclusive (if_absent): the
first one wins, which is what makes a shard's commit happen once (commit.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aigc_dist.batch.layout import RunLayout
from aigc_dist.storage import Storage


@dataclass(frozen=True)
class Plan:
    """What the partition pass fixed: read back by every later session of the run."""

    num_shards: int
    total_rows: int
    rows_per_file: int
    inputs: list[Any]  # each input table's fingerprint (inputs.InputTable.fingerprint), in table order
    work: str  # the pass's directory under `_work/`
    planned_at: float | None = None  # set when written

    def to_json(self) -> dict[str, Any]:
        return {"num_shards": self.num_shards, "total_rows": self.total_rows, "rows_per_file": self.rows_per_file,
                "inputs": self.inputs, "work": self.work, "planned_at": self.planned_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(data["num_shards"], data["total_rows"], data["rows_per_file"], data["inputs"], data["work"],
                   data.get("planned_at"))


def read_plan(layout: RunLayout, storage: Storage) -> Plan | None:
    """The run's plan; None before its partition pass has written one."""
    try:
        return Plan.from_json(storage.read_json(layout.plan))
    except FileNotFoundError:
        return None


def write_plan(layout: RunLayout, storage: Storage, plan: Plan) -> None:
    """Write the plan once (AlreadyExistsError when one is there: the caller checks whose it is)."""
    storage.write_json(layout.plan, plan.to_json(), if_absent=True)


@dataclass(frozen=True)
class Counts:
    """Rows by status: every requests-side row is ok, quarantined (by_stage says where) or filtered;
    `profiles` counts the bad rows of the users and items tables, which are no request."""

    total: int = 0
    ok: int = 0
    quarantined: int = 0
    filtered: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)
    profiles: dict[str, int] = field(default_factory=lambda: {"users": 0, "items": 0})

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "ok": self.ok, "quarantined": self.quarantined, "filtered": self.filtered,
                "by_stage": dict(self.by_stage), "profiles": dict(self.profiles)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Counts:
        return cls(data["total"], data["ok"], data["quarantined"], data["filtered"], dict(data["by_stage"]),
                   {"users": 0, "items": 0, **data.get("profiles", {})})


@dataclass(frozen=True)
class ShardStats:
    """What finishing a shard measured, as its commit marker records it."""

    counts: Counts
    generated_tokens: int
    prompt_tokens: int
    seconds: dict[str, float]  # by stage (prepare, generate, finish), summed over the shard's tasks
    actors: dict[str, int]  # rows each generator actor (host:pid) generated
    tasks: int  # generate tasks the shard was cut into
    quality: dict[str, Any] | None = None  # text: the shard's quality sums (quality.shard_quality)


@dataclass(frozen=True)
class OutputFile:
    path: str  # relative to the run's root
    kind: str  # data, errors, or a layout.JSONL_KINDS kind
    rows: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "rows": self.rows, "bytes": self.bytes}


@dataclass(frozen=True)
class CommitMarker:
    """One shard's commit: the attempt whose files are the shard's output, and their counts."""

    shard: int
    attempt: str
    committed_at: str
    files: tuple[OutputFile, ...]
    stats: ShardStats

    def to_json(self) -> dict[str, Any]:
        stats = self.stats
        out = {"shard": self.shard, "attempt": self.attempt, "committed_at": self.committed_at,
               "files": [f.to_json() for f in self.files], "counts": stats.counts.to_json(),
               "tokens": {"generated": stats.generated_tokens, "prompt": stats.prompt_tokens},
               "seconds": dict(stats.seconds), "actors": dict(stats.actors), "tasks": stats.tasks}
        if stats.quality is not None:
            out["quality"] = stats.quality
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommitMarker:
        # Markers older than row-level tasks: one task per shard, no actor tally; older than the quality sums: none.
        stats = ShardStats(Counts.from_json(data["counts"]), data["tokens"]["generated"], data["tokens"]["prompt"],
                           dict(data["seconds"]), dict(data.get("actors", {})), data.get("tasks", 1),
                           data.get("quality"))
        return cls(data["shard"], data["attempt"], data["committed_at"],
                   tuple(OutputFile(**entry) for entry in data["files"]), stats)


def read_marker(layout: RunLayout, storage: Storage, shard: int) -> CommitMarker:
    """Shard `shard`'s marker (FileNotFoundError while it is not committed)."""
    return CommitMarker.from_json(storage.read_json(layout.commit_marker(shard)))


def write_marker(layout: RunLayout, storage: Storage, marker: CommitMarker) -> None:
    """Commit: write the marker once (AlreadyExistsError when another attempt's is there)."""
    storage.write_json(layout.commit_marker(marker.shard), marker.to_json(), if_absent=True)


def read_commits(layout: RunLayout, storage: Storage) -> dict[int, CommitMarker]:
    """Every commit marker of the run, by shard."""
    markers = [CommitMarker.from_json(storage.read_json(uri)) for uri in storage.list(layout.commits)
               if uri.endswith(".json")]
    return {marker.shard: marker for marker in markers}


def sum_counts(markers: Iterable[CommitMarker]) -> dict[str, Any]:
    """Rows by status and by failing stage, tokens, per-stage seconds, rows by actor and tasks over markers."""
    totals: dict[str, Any] = {"total": 0, "ok": 0, "quarantined": 0, "filtered": 0, "by_stage": {},
                              "profiles": {"users": 0, "items": 0}, "tokens": 0, "prompt_tokens": 0, "seconds": {},
                              "actors": {}, "tasks": 0}
    for marker in markers:
        stats, counts = marker.stats, marker.stats.counts
        for key in ("total", "ok", "quarantined", "filtered"):
            totals[key] += getattr(counts, key)
        for tally, source in ((totals["profiles"], counts.profiles), (totals["by_stage"], counts.by_stage),
                              (totals["seconds"], stats.seconds), (totals["actors"], stats.actors)):
            for key, value in source.items():
                tally[key] = tally.get(key, 0) + value
        totals["tokens"] += stats.generated_tokens
        totals["prompt_tokens"] += stats.prompt_tokens
        totals["tasks"] += stats.tasks
    return totals
