"""The output contract of a backfill run: where everything lives under `<output>/<run_id>/`.

    data/shard-SSSSS-ATTEMPT.parquet     generated rows of one shard (one file per committed shard)
    errors/shard-SSSSS-ATTEMPT.parquet   quarantined and filtered rows of one shard, with the reason
    openai/output-SSSSS-ATTEMPT.jsonl    backfill.output_format = "parquet+openai": the shard's rows as OpenAI
    openai/errors-SSSSS-ATTEMPT.jsonl    batch output and error lines (openai_batch.py), committed with the parquet
    _commits/shard-SSSSS.json            commit marker: the shard's files, counts, tokens, timings
    _manifest.json                       written last, when every shard is committed
    _run.json, _plan.json                what the run was started with; how its input was sharded
    _lock, _progress.json                the driver holding the run, and its latest progress line
    _work/PASS/                          the input partitioned by shard, and the users and items the run
                                         reads (deleted when the run completes); PASS names the partition
                                         pass `_plan.json` adopted, so a pass of a fenced driver is never read
    _work/PASS/generated/                generated rows of one generate task, until its shard commits

Readers trust only the files `_manifest.json` lists (`read_output` does exactly that); files of an
attempt that never committed may exist while a run is in progress or after a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from aigc_dist.storage import Storage, join_uri

MANIFEST_FORMAT = 2  # 2: errors/ has `table`; counts.profiles; inputs carry content identities
_MODEL_COLUMNS = [("model_name", pa.string()), ("model_version", pa.string()), ("model_digest", pa.string()),
                  ("seed", pa.int64())]
_KEYS = [("request_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string())]
_CREATED = ("created_at", pa.timestamp("ms", tz="UTC"))

TEXT_SCHEMA = pa.schema([
    *_KEYS, ("content", pa.string()), *_MODEL_COLUMNS,
    ("temperature", pa.float64()), ("top_k", pa.int32()), ("top_p", pa.float64()), ("max_new_tokens", pa.int32()),
    ("num_tokens", pa.int32()), ("prompt_tokens", pa.int32()), ("finished", pa.bool_()),
    ("grounded", pa.bool_()), ("personalized", pa.bool_()), ("num_chars", pa.int32()), ("repetitive", pa.bool_()),
    _CREATED,
])
IMAGE_SCHEMA = pa.schema([
    *_KEYS, ("image", pa.binary()), ("label", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("num_bytes", pa.int32()), *_MODEL_COLUMNS, _CREATED,
])
DATA_SCHEMAS = {"text": TEXT_SCHEMA, "image": IMAGE_SCHEMA}  # by backfill.mode (a ModelSpec's modality)
# `table`: which input the row came from: the requests side ("candidates" or "requests"), or a bad
# row of the users or items table (those count under counts.profiles, not in counts.total).
ERRORS_SCHEMA = pa.schema([
    *_KEYS, ("stage", pa.string()), ("error", pa.string()), ("raw", pa.large_string()), ("content", pa.string()),
    ("table", pa.string()), _CREATED,
])
# Output file kinds besides data/ and errors/: JSON lines, under openai/ (their names' prefixes).
JSONL_KINDS = {"openai_output": "openai/output", "openai_errors": "openai/errors"}
OUTPUT_DIRS = ("data", "errors", "openai")
# Where a row can fail, in pipeline order; "filter" rows count as filtered, the others as quarantined.
STAGES = ("read", "validate", "join", "prompt", "generate", "filter")


@dataclass(frozen=True)
class RunLayout:
    """Locations of one run's objects; `root` is `<output>/<run_id>` (a path or an s3:// URI)."""

    root: str

    def uri(self, relative: str) -> str:
        return join_uri(self.root, relative)

    @property
    def manifest(self) -> str:
        return self.uri("_manifest.json")

    @property
    def run_info(self) -> str:
        return self.uri("_run.json")

    @property
    def plan(self) -> str:
        return self.uri("_plan.json")

    @property
    def lock(self) -> str:
        return self.uri("_lock")

    @property
    def progress(self) -> str:
        return self.uri("_progress.json")

    @property
    def commits(self) -> str:
        return self.uri("_commits")

    @property
    def work(self) -> str:
        return self.uri("_work")

    def work_pass(self, work: str) -> str:
        """The directory of one partition pass."""
        return self.uri(f"_work/{work}")

    def work_dir(self, work: str, part: str, shard: int) -> str:
        """Ray Data writes `_work/PASS/part=<requests|users|items>/shard=<k>/...` (hive partitioning)."""
        return self.uri(f"_work/{work}/part={part}/shard={shard}")

    @staticmethod
    def generated_file(work: str, shard: int, task: int, session: str) -> str:
        """Relative path of one generate task's rows, named by the driver session that runs it."""
        return f"_work/{work}/generated/shard-{shard:05d}/task-{task:05d}-{session}.arrow"

    def commit_marker(self, shard: int) -> str:
        return self.uri(f"_commits/shard-{shard:05d}.json")

    @staticmethod
    def output_file(kind: str, shard: int, attempt: str, part: int | None = None) -> str:
        """Relative path of a shard attempt's data or errors file (`part`: one of several, when the
        shard's rows are over backfill.max_file_bytes)."""
        suffix = "" if part is None else f"-part{part:04d}"
        if kind in JSONL_KINDS:
            return f"{JSONL_KINDS[kind]}-{shard:05d}-{attempt}{suffix}.jsonl"
        return f"{kind}/shard-{shard:05d}-{attempt}{suffix}.parquet"


def read_manifest(root: str, storage: Storage) -> dict[str, Any]:
    """The manifest of a completed run; FileNotFoundError while the run is incomplete."""
    return storage.read_json(RunLayout(root).manifest)


def write_manifest(root: str, storage: Storage, manifest: dict[str, Any]) -> None:
    """The run's last write: readers trust only the files it lists."""
    storage.write_json(RunLayout(root).manifest, manifest)


def read_output(root: str, storage: Storage | None = None) -> tuple[pa.Table, pa.Table]:
    """(data, errors) of a completed run, from exactly the files its manifest lists."""
    storage = storage or Storage()
    manifest = read_manifest(root, storage)
    layout = RunLayout(root)
    schema = DATA_SCHEMAS[manifest["mode"]]
    tables = []
    for kind, kind_schema in (("data", schema), ("errors", ERRORS_SCHEMA)):
        parts = []
        for entry in manifest["files"][kind]:
            fs, path = storage.filesystem(layout.uri(entry["path"]))
            parts.append(pq.read_table(path, filesystem=fs, schema=kind_schema))
        tables.append(pa.concat_tables(parts) if parts else kind_schema.empty_table())
    return tables[0], tables[1]
