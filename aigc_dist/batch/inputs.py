"""Backfill inputs: where the tables are, how their rows are read, what makes a row valid.

Every row of the requests side (candidates, or a pre-joined requests table) becomes one "work row":

    shard      which shard the row belongs to (a stable hash, so a re-run puts it in the same shard)
    key        request_id (requests side), user_id (users) or item_id (items); null when unusable
    user_id, item_id   as given, when they are text
    raw        the input row as JSON (what errors/ shows for a bad row)
    error, stage       why the row is bad and where that was found (null for a good row)

Rows are never dropped here: a line that is not JSON, a wrong type, a null id, an over-long value or
invalid UTF-8 becomes a work row with `error` set, and ends in errors/ like any other failure.
Parquet is read with Ray Data's reader; jsonl and csv are read as whole files and parsed here, so a
bad line (invalid UTF-8, not JSON) costs that line only instead of failing the read task.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import hashlib
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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
TableKind = Literal["candidates", "requests", "users", "items"]


class InputError(UserError, ValueError):
    """An input location that cannot be used (nothing there, unknown format); the message says which."""


@dataclass(frozen=True)
class InputTable:
    """One input table: its location, format and files (uri, size), in a stable order."""

    name: TableKind
    uri: str
    format: str
    files: tuple[tuple[str, int], ...]

    @property
    def fingerprint(self) -> list[Any]:
        """What a resume compares: the same files with the same sizes."""
        return [self.name, self.format, [list(f) for f in self.files]]


@dataclass(frozen=True)
class RowRules:
    """What makes a row of one table valid, and which shard it goes to."""

    kind: TableKind
    num_shards: int = 1
    id_salt: str = ""  # the template digest: part of every default request_id
    max_id_chars: int = 256
    max_value_chars: int = 4096


def resolve_input(name: TableKind, uri: str, fmt: str, storage: Storage) -> InputTable:
    """Find the files of an input (a file or a directory of files; names starting with . or _ are skipped)."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [info]
    elif info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(path, recursive=True)
        infos = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File
                 and not any(part.startswith((".", "_")) for part in i.path[len(path):].split("/") if part)]
    else:
        raise InputError(f"data.{name}: nothing at {uri}")
    if not infos:
        raise InputError(f"data.{name}: {uri} holds no input files")
    infos.sort(key=lambda i: i.path)
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
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def _printable(text: str) -> str:
    """Undecodable bytes (kept as surrogates by the reader) shown as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        return _printable(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.date | datetime.time | datetime.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | datetime.timedelta):
        return str(value)
    return value


def raw_json(row: Any) -> str:
    """The row as JSON for errors/: bytes and invalid UTF-8 as escapes, NaN as null."""
    return json.dumps(_jsonable(row), ensure_ascii=False, separators=(",", ":"), default=str)


# -- validation ---------------------------------------------------------------------------------

def _check_text(name: str, value: Any, limit: int) -> str | None:
    """Problems of a feature value: binary data, invalid UTF-8, over-long text (lists/dicts recursively)."""
    if isinstance(value, bytes):
        return f"{name}: binary value where text is expected"
    if isinstance(value, str):
        if len(value) > limit:
            return f"{name}: {len(value)} characters, over the limit of {limit} (data.max_value_chars)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{name}: invalid UTF-8"
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            if problem := _check_text(f"{name}[{i}]", v, limit):
                return problem
    elif isinstance(value, dict):
        for k, v in value.items():
            if problem := _check_text(f"{name}.{k}", v, limit):
                return problem
    return None


def _check_id(name: str, value: Any, limit: int, required: bool = True) -> str | None:
    if value is None or value == "":
        return f"missing {name}" if required else None
    if not isinstance(value, str):
        return f"{name} must be text (got {type(value).__name__} {str(value)[:40]!r})"
    if len(value) > limit:
        return f"{name}: {len(value)} characters, over the limit of {limit} (data.max_id_chars)"
    if value.strip() != value or any(ord(c) < 32 for c in value):
        return f"{name} {_printable(value)[:40]!r} has surrounding spaces or control characters"
    return _check_text(name, value, limit)


def _check_number(name: str, value: Any, integer: bool) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        return f"{name} must be {'an integer' if integer else 'a finite number'} (got {str(value)[:40]!r})"
    return None


def check_row(row: dict[str, Any], rules: RowRules) -> str | None:
    """Why `row` is not a valid row of its table, or None."""
    limit = rules.max_id_chars
    if rules.kind == "candidates":
        checks = [_check_id("user_id", row.get("user_id"), limit), _check_id("item_id", row.get("item_id"), limit),
                  _check_number("rank", row.get("rank"), integer=True),
                  _check_number("score", row.get("score"), integer=False)]
    elif rules.kind == "requests":
        has_id = row.get("request_id") not in (None, "")
        checks = [_check_id("request_id", row.get("request_id"), limit, required=False),
                  _check_id("user_id", row.get("user_id"), limit, required=not has_id),
                  _check_id("item_id", row.get("item_id"), limit, required=not has_id)]
    else:
        key = "user_id" if rules.kind == "users" else "item_id"
        checks = [_check_id(key, row.get(key), limit)]
    if problem := next((c for c in checks if c), None):
        return problem
    return next((p for k, v in row.items() if (p := _check_text(str(k), v, rules.max_value_chars))), None)


def _request_key(row: dict[str, Any], rules: RowRules) -> str | None:
    """The row's request_id when it can be known (also for bad rows, so errors/ can name it)."""
    def valid(name: str) -> bool:
        return _check_id(name, row.get(name), rules.max_id_chars) is None

    if rules.kind == "requests" and row.get("request_id") not in (None, ""):
        return row["request_id"] if valid("request_id") else None
    if valid("user_id") and valid("item_id"):
        return stable_request_id(row["user_id"], row["item_id"], rules.id_salt)
    return None


def work_row(row: dict[str, Any], rules: RowRules, read_error: str | None = None) -> dict[str, Any]:
    """The work row of one parsed input row (see the module docstring)."""
    raw = raw_json(row)
    error = read_error or check_row(row, rules)
    user_id, item_id = (row.get(name) if _check_id(name, row.get(name), rules.max_id_chars) is None else None
                        for name in ("user_id", "item_id"))
    if rules.kind == "users":
        key = user_id
    elif rules.kind == "items":
        key = item_id
    else:
        key = _request_key(row, rules)
    # Candidates shard by user, so that each shard joins against one slice of the users table;
    # requests by request_id, so that duplicates meet in one shard.
    shard_key = (user_id if rules.kind in ("candidates", "users") else key) or raw
    return {"shard": shard_of(shard_key, rules.num_shards), "key": key, "user_id": user_id, "item_id": item_id,
            "raw": raw, "error": error, "stage": None if error is None else "read" if read_error else "validate"}


def _work_table(rows: Iterable[dict[str, Any]], part: str | None) -> pa.Table:
    table = pa.Table.from_pylist(list(rows), schema=WORK_SCHEMA)
    return table if part is None else table.append_column("part", pa.array([part] * table.num_rows, pa.string()))


# -- parsing ------------------------------------------------------------------------------------

def parse_text_file(data: bytes, fmt: str, path: str) -> list[tuple[dict[str, Any], str | None]]:
    """(row, read error) per record of a jsonl or csv file; blank lines are not records.

    Undecodable bytes are kept as surrogates so validation can name the field they are in.
    """
    text = data.decode("utf-8", "surrogateescape")
    records: list[tuple[dict[str, Any], str | None]] = []
    if fmt == "jsonl":
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and other separators unescaped.
        for number, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                records.append(({"line": line}, f"{path}:{number}: not valid JSON ({getattr(exc, 'msg', exc)})"))
                continue
            if not isinstance(row, dict):
                records.append(({"line": line}, f"{path}:{number}: not a JSON object"))
            else:
                records.append((row, None))
        return records
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None) or []
    for row in reader:
        if not any(row):
            continue
        if len(row) != len(header):
            records.append(({"line": ",".join(row)},
                            f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}"))
        else:
            records.append(({k: (v if v != "" else None) for k, v in zip(header, row, strict=True)}, None))
    return records


def normalize_arrow(batch: pa.Table, rules: RowRules, part: str | None) -> pa.Table:
    """Ray Data batch of parquet rows -> work rows (with a `part` column naming the table, if given)."""
    return _work_table((work_row(row, rules) for row in batch.to_pylist()), part)


def normalize_files(batch: pa.Table, rules: RowRules, fmt: str, part: str | None) -> pa.Table:
    """Ray Data batch of whole jsonl/csv files (bytes, path) -> work rows."""
    rows = []
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist(), strict=True):
        rows += [work_row(row, rules, error) for row, error in parse_text_file(data, fmt, path)]
    return _work_table(rows, part)


def count_file_rows(batch: pa.Table, fmt: str) -> pa.Table:
    """Ray Data batch of whole jsonl/csv files -> their record counts."""
    counts = [len(parse_text_file(d, fmt, p)) for d, p in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist(),
                                                                strict=True)]
    return pa.table({"rows": pa.array(counts, pa.int64())})


# -- Ray Data -----------------------------------------------------------------------------------

def _paths(table: InputTable, storage: Storage) -> tuple[pafs.FileSystem, list[str]]:
    fs, _ = storage.filesystem(table.uri)
    return fs, [storage.filesystem(uri)[1] for uri, _ in table.files]


def count_rows(table: InputTable, storage: Storage) -> int:
    """Rows of an input table: parquet footers, or a Ray Data pass that parses jsonl/csv files."""
    import ray

    fs, paths = _paths(table, storage)
    if table.format == "parquet":
        total = 0
        for path in paths:
            with fs.open_input_file(path) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total
    ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True)
    counted = ds.map_batches(count_file_rows, batch_format="pyarrow", fn_kwargs={"fmt": table.format})
    return int(counted.sum("rows") or 0)


def _read_parquet(paths: list[str], fs: pafs.FileSystem) -> Any:
    """ray.data.read_parquet on Ray Data's V1 reader, which reads footers inside the read tasks.

    Ray Data 2.60's default (DataSourceV2) starts a pool of 32 footer-reading actors for every
    read_parquet (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, fixed when the worker starts); on a small
    cluster starting them takes longer than reading the data (measured: 15 s against 0.6 s for a
    15,000-row file on 2 cores). The setting is read when the read is planned, so it is restored at once.
    """
    import ray

    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, filesystem=fs)
    finally:
        context.use_datasource_v2 = previous


def read_work_rows(table: InputTable, rules: RowRules, storage: Storage, part: str | None = None) -> Any:
    """A Ray Dataset of the table's work rows (streaming: nothing is collected on the driver).

    `part` adds a column with that value, so that several tables can be written in one pass
    partitioned by (part, shard).
    """
    import ray

    fs, paths = _paths(table, storage)
    if table.format == "parquet":
        return _read_parquet(paths, fs).map_batches(
            normalize_arrow, batch_format="pyarrow", fn_kwargs={"rules": rules, "part": part})
    return ray.data.read_binary_files(paths, filesystem=fs, include_paths=True).map_batches(
        normalize_files, batch_format="pyarrow", fn_kwargs={"rules": rules, "fmt": table.format, "part": part})


def read_work_files(storage: Storage, uri: str) -> pa.Table:
    """The work rows under a directory written by Ray Data (empty when there is none)."""
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return WORK_SCHEMA.empty_table()
    selector = pafs.FileSelector(path, recursive=True)
    files = sorted(i.path for i in fs.get_file_info(selector)
                   if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    tables = [pq.read_table(f, filesystem=fs, schema=WORK_SCHEMA) for f in files]
    return pa.concat_tables(tables) if tables else WORK_SCHEMA.empty_table()
