"""Input tables: where they are, what identifies their content, what makes a row of them valid.

Every record of every table (candidates or a pre-joined requests table, users, items) becomes one
"work row", whatever its bytes:

    shard      which shard the row belongs to (a stable hash, so a re-run puts it in the same shard)
    key        request_id (requests side), user_id (users) or item_id (items); null when unusable
    user_id, item_id   as given, when they are valid ids
    raw        the input row as JSON (what errors/ shows for a bad row; the features of a good one)
    error, stage       why the row is bad and where that was found (null for a good row)

Rows are never dropped here: a line that is not JSON, a wrong type, a null id, an over-long value,
invalid UTF-8 in a value or a field name, a value nested too deep, too many fields: each becomes a
work row with `error` set and ends in errors/ like any other failure. records.py turns bytes into
rows within `ReadLimits`; reading.py runs it (Ray Data for the backfill; in-process for Serve's
profile tables and training's feature tables, so all three read a table the same way).
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aigc_dist.batch.openai_batch import batch_ids, parse_batch_line
from aigc_dist.batch.records import ReadLimits, nesting_depth, printable, raw_json
from aigc_dist.errors import UserError
from aigc_dist.storage import Storage

FORMAT_BY_SUFFIX = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
                    ".json": "jsonl", ".csv": "csv"}
WORK_SCHEMA = pa.schema([
    ("shard", pa.int32()),
    ("key", pa.string()),
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("raw", pa.large_string()),
    ("error", pa.string()),
    ("stage", pa.string()),
])
# examples: training rows; batch: the lines of an OpenAI Batch file read as the requests table
TableKind = Literal["candidates", "requests", "users", "items", "examples", "batch"]
_IDENTITY_THREADS = 16  # HEADs (S3) or hashes (local) of many input files at once


class InputError(UserError, ValueError):
    """An input location that cannot be used (nothing there, unknown format); the message says which."""


@dataclass(frozen=True)
class InputTable:
    """One input table: its location, format and files (uri, size), in a stable order.

    `versions` (from `identify`) holds each file's content identity: its S3 ETag (and VersionId), or
    the sha256 of a local file. A size alone misses a same-size edit.
    """

    name: TableKind
    uri: str
    format: str
    files: tuple[tuple[str, int], ...]
    versions: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> list[Any]:
        """What a resume compares: the same files with the same sizes and content."""
        versions = self.versions or ("",) * len(self.files)
        return [self.name, self.format, [[uri, size, version] for (uri, size), version in
                                         zip(self.files, versions, strict=True)]]


def identify(table: InputTable, storage: Storage) -> InputTable:
    """The table with the content identity of every file (S3: one HEAD each; local: a streamed sha256).

    A parquet file is opened too: one that cannot be read at all (corrupt, or a schema nested past
    parquet's own limit) holds no record to quarantine, and fails here naming it rather than in a
    read task.
    """
    def version(uri: str) -> str:
        if table.format == "parquet":
            fs, path = storage.filesystem(uri)
            try:
                with fs.open_input_file(path) as fh:
                    pq.ParquetFile(fh).schema_arrow  # noqa: B018 - reading it is the check
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"data.{table.name}: {uri} cannot be read as parquet ({exc}); fix or remove "
                                 "the file") from None
        return storage.content_identity(uri)

    with ThreadPoolExecutor(min(_IDENTITY_THREADS, max(1, len(table.files)))) as pool:
        versions = tuple(pool.map(version, [uri for uri, _ in table.files]))
    return replace(table, versions=versions)


def describe_input_change(name: str, then: list[Any], now: list[Any]) -> str | None:
    """What differs between two fingerprints of table `name`, naming the file; None when equal."""
    if then == now:
        return None
    before = {uri: (size, version) for uri, size, version in then[2]}
    after = {uri: (size, version) for uri, size, version in now[2]}
    for uri in sorted(before.keys() | after.keys()):
        if uri not in after:
            return f"data.{name}: file {uri} is gone"
        if uri not in before:
            return f"data.{name}: file {uri} is new"
        if before[uri] != after[uri]:
            (size_then, version_then), (size_now, version_now) = before[uri], after[uri]
            what = f"{size_then:,} then, {size_now:,} bytes now" if size_then != size_now else \
                f"same size, other content: {version_then or '?'} then, {version_now or '?'} now"
            return f"data.{name}: file {uri} changed ({what})"
    return f"data.{name}: format {then[1]} then, {now[1]} now"


@dataclass(frozen=True)
class RowRules:
    """What makes a row of one table valid, and which shard it goes to."""

    kind: TableKind
    num_shards: int = 1
    id_salt: str = ""  # the template digest: part of every default request_id
    limits: ReadLimits = field(default_factory=ReadLimits.default)


def resolve_input(name: TableKind, uri: str, fmt: str, storage: Storage) -> InputTable:
    """Find the files of an input (a file or a directory of files; names starting with . or _ are skipped)."""
    fs, path = storage.filesystem(uri)
    infos = storage.files(uri)
    if infos is None:
        raise InputError(f"data.{name}: nothing at {uri}")
    infos = [i for i in infos if not any(part.startswith((".", "_")) for part in i.path[len(path):].split("/") if part)]
    if not infos:
        raise InputError(f"data.{name}: {uri} holds no input files")
    if fmt == "auto":
        found = {FORMAT_BY_SUFFIX.get("." + i.base_name.rsplit(".", 1)[-1].lower()) for i in infos}
        if None in found or len(found) != 1:
            raise InputError(f"data.{name}: cannot tell the format of {uri} from its file names "
                             f"(use .parquet, .jsonl or .csv, or set data.format)")
        fmt = found.pop()
    prefix = "s3://" if isinstance(fs, pafs.S3FileSystem) else ""
    return InputTable(name, uri, fmt, tuple((prefix + i.path, i.size) for i in infos))


# -- ids, hashes, JSON --------------------------------------------------------------------------

def stable_request_id(user_id: str, item_id: str, salt: str) -> str:
    """The default request_id: a hash of (user_id, item_id, template digest), 32 hex digits."""
    return hashlib.sha256("\x1f".join((user_id, item_id, salt)).encode("utf-8")).hexdigest()[:32]


def shard_of(key: str, num_shards: int) -> int:
    """Stable shard of a key (blake2b, not Python's per-process hash)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


# -- validation ---------------------------------------------------------------------------------

def _check_name(name: str, limits: ReadLimits) -> str | None:
    """Problems of a field name: invalid UTF-8 (a name is text like any value), over max_id_chars."""
    if not isinstance(name, str):
        return f"field name '{printable(str(name))}' is not text"
    if printable(name) != name:  # quoted by hand: repr would double the backslashes of the escapes
        return f"field name '{printable(name)[:60]}': invalid UTF-8"
    if len(name) > limits.max_id_chars:
        return f"field name {name[:40]!r}...: {len(name)} characters, over the limit of {limits.max_id_chars} " \
               "(data.max_id_chars)"
    return None


def _check_text(name: str, value: Any, limits: ReadLimits) -> str | None:
    """Problems of a feature value: binary data, invalid UTF-8, over-long text (lists/dicts recursively;
    their depth is bounded before this runs)."""
    if isinstance(value, bytes):
        return f"{name}: binary value where text is expected"
    if isinstance(value, str):
        if len(value) > limits.max_value_chars:
            return f"{name}: {len(value)} characters, over the limit of {limits.max_value_chars} (data.max_value_chars)"
        if printable(value) != value:
            return f"{name}: invalid UTF-8 (undecodable bytes or an unpaired surrogate escape)"
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            if problem := _check_text(f"{name}[{i}]", v, limits):
                return problem
    elif isinstance(value, dict):
        for k, v in value.items():
            if problem := _check_name(k, limits):
                return f"{name}: {problem}"
            if problem := _check_text(f"{name}.{k}", v, limits):
                return problem
    return None


def _check_id(name: str, value: Any, limits: ReadLimits, required: bool = True) -> str | None:
    if value is None or value == "":
        return f"missing {name}" if required else None
    if not isinstance(value, str):
        return f"{name} must be text (got {type(value).__name__} {printable(str(value)[:40])!r})"
    if len(value) > limits.max_id_chars:
        return f"{name}: {len(value)} characters, over the limit of {limits.max_id_chars} (data.max_id_chars)"
    if value.strip() != value or any(ord(c) < 32 for c in value):
        return f"{name} {printable(value)[:40]!r} has surrounding spaces or control characters"
    return _check_text(name, value, limits)


def _check_number(name: str, value: Any, integer: bool) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        shown = printable(str(value)[:40]) if not isinstance(value, dict | list) else type(value).__name__
        return f"{name} must be {'an integer' if integer else 'a finite number'} (got {shown!r})"
    return None


def _check_shape(row: dict[str, Any], limits: ReadLimits) -> str | None:
    """Limits on the row as a whole, checked first so no later check can meet an unbounded row."""
    if len(row) > limits.max_fields:
        return f"{len(row)} fields, over the limit of {limits.max_fields} (data.max_fields)"
    for name, value in row.items():
        if problem := _check_name(name, limits):
            return problem
        if nesting_depth(value, limits.max_nesting_depth) > limits.max_nesting_depth:
            return f"{name}: nested more than {limits.max_nesting_depth} levels deep (data.max_nesting_depth)"
    return None


def check_row(row: dict[str, Any], rules: RowRules) -> str | None:
    """Why `row` is not a valid row of its table, or None."""
    limits = rules.limits
    if problem := _check_shape(row, limits):
        return problem
    if rules.kind == "candidates":
        checks = [_check_id("user_id", row.get("user_id"), limits), _check_id("item_id", row.get("item_id"), limits),
                  _check_number("rank", row.get("rank"), integer=True),
                  _check_number("score", row.get("score"), integer=False)]
    elif rules.kind == "requests":
        has_id = row.get("request_id") not in (None, "")
        checks = [_check_id("request_id", row.get("request_id"), limits, required=False),
                  _check_id("user_id", row.get("user_id"), limits, required=not has_id),
                  _check_id("item_id", row.get("item_id"), limits, required=not has_id)]
    elif rules.kind == "batch":
        user_id, item_id = batch_ids(row)
        checks = [_check_id("custom_id", row.get("custom_id"), limits), parse_batch_line(row)[1],
                  _check_id("body.aigc.user_id", user_id, limits, required=False),
                  _check_id("body.aigc.item_id", item_id, limits, required=False)]
    elif rules.kind == "examples":  # training rows: ids are looked up, not required (features may be inline)
        checks = []
    else:
        key = "user_id" if rules.kind == "users" else "item_id"
        checks = [_check_id(key, row.get(key), limits)]
    if problem := next((c for c in checks if c), None):
        return problem
    return next((p for k, v in row.items() if (p := _check_text(k, v, limits))), None)


def _valid_id(row: dict[str, Any], name: str, limits: ReadLimits) -> str | None:
    value = row.get(name)
    return value if _check_id(name, value, limits) is None else None


def _request_key(row: dict[str, Any], rules: RowRules) -> str | None:
    """The row's request_id when it can be known (also for bad rows, so errors/ can name it)."""
    if rules.kind == "batch":
        return _valid_id(row, "custom_id", rules.limits)
    if rules.kind == "requests" and row.get("request_id") not in (None, ""):
        return _valid_id(row, "request_id", rules.limits)
    user_id, item_id = _valid_id(row, "user_id", rules.limits), _valid_id(row, "item_id", rules.limits)
    return stable_request_id(user_id, item_id, rules.id_salt) if user_id and item_id else None


def work_row(row: dict[str, Any], rules: RowRules, read_error: str | None = None) -> dict[str, Any]:
    """The work row of one parsed input row (see the module docstring)."""
    error = read_error or check_row(row, rules)
    raw = raw_json(row, rules.limits.max_nesting_depth)
    ids = dict(zip(("user_id", "item_id"), batch_ids(row), strict=True)) if rules.kind == "batch" else row
    user_id, item_id = _valid_id(ids, "user_id", rules.limits), _valid_id(ids, "item_id", rules.limits)
    if rules.kind == "users":
        key = user_id
    elif rules.kind == "items":
        key = item_id
    else:
        key = _request_key(row, rules)
    # Candidates shard by user, so that each shard joins against one slice of the users table;
    # requests by request_id (a batch file's lines by custom_id), so that duplicates meet in one shard.
    shard_key = (user_id if rules.kind in ("candidates", "users") else key) or raw
    return {"shard": shard_of(shard_key, rules.num_shards), "key": key, "user_id": user_id, "item_id": item_id,
            "raw": raw, "error": error, "stage": None if error is None else "read" if read_error else "validate"}


def work_table(rows: list[dict[str, Any]], part: str | None = None) -> pa.Table:
    """Work rows as an Arrow table (with a `part` column naming the table, if given)."""
    table = pa.Table.from_pylist(rows, schema=WORK_SCHEMA)
    return table if part is None else table.append_column("part", pa.array([part] * table.num_rows, pa.string()))
