"""Reading input tables into work rows: with Ray Data for the backfill, in-process for the rest.

One reader for every consumer of the tables, so they cannot disagree on what a row is:

- the backfill reads candidates/requests, users and items through Ray Data (`count_rows`, then
  `read_work_rows`): jsonl in byte ranges of `data.read_chunk_bytes`, one read task each; csv
  streamed, one task per file; parquet with Ray Data's reader, converted cell by cell;
- Serve's profile tables and training's feature tables read users/items in-process
  (`read_table_rows`) with the same records.py parsing and the same validation;
- all three index a users or items table with `ProfileIndex`: one rule for ids that are invalid or
  repeated (every copy of a repeated id is rejected: which copy is right cannot be told).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aigc_dist.batch.inputs import WORK_SCHEMA, InputTable, RowRules, resolve_input, work_row, work_table
from aigc_dist.batch.records import ReadLimits, TextChunk, arrow_records, count_text_chunk, read_text_chunk
from aigc_dist.storage import Storage

PROFILE_COLUMNS = ("key", "user_id", "item_id", "raw", "error", "stage")  # (the shard is in the path)
READ_BLOCK_ROWS = 100_000  # parquet rows per read block of the partition pass (its tasks' unit of work)
_ROWS_PER_BLOCK = 4096  # work rows per block a read task yields (bounds a task's memory, not its input)


def _paths(table: InputTable, storage: Storage) -> tuple[pafs.FileSystem, list[str]]:
    fs, _ = storage.filesystem(table.uri)
    return fs, [storage.filesystem(uri)[1] for uri, _ in table.files]


def text_chunks(table: InputTable, storage: Storage, limits: ReadLimits) -> list[TextChunk]:
    """The read ranges of a jsonl/csv table: jsonl files cut every read_chunk_bytes, csv files whole."""
    _, paths = _paths(table, storage)
    chunks = []
    for (uri, size), path in zip(table.files, paths, strict=True):
        step = limits.read_chunk_bytes if table.format == "jsonl" else max(size, 1)
        starts = range(0, max(size, 1), step)
        chunks += [TextChunk(uri, path, start, min(start + step, size), 1 if start == 0 else None)
                   for start in starts]
    return chunks


def _count_chunks(batch: pa.Table, fs: pafs.FileSystem, fmt: str, limits: ReadLimits) -> pa.Table:
    rows = batch.to_pylist()
    counts = [count_text_chunk(fs, TextChunk(**{k: v for k, v in row.items() if k != "index"}), fmt, limits)
              for row in rows]
    return pa.table({"index": pa.array([row["index"] for row in rows], pa.int64()),
                     "records": pa.array([c[0] for c in counts], pa.int64()),
                     "lines": pa.array([c[1] for c in counts], pa.int64())})


def count_rows(table: InputTable, storage: Storage, limits: ReadLimits) -> tuple[int, list[TextChunk]]:
    """Records of an input table, and (jsonl/csv) its read ranges, each knowing its first line number.

    Parquet: the footers. jsonl/csv: a Ray Data pass over the ranges, counting with the reader's own
    code (the plan's row count must equal the rows the read pass yields).
    """
    import ray

    fs, paths = _paths(table, storage)
    if table.format == "parquet":
        return _parquet_rows(fs, paths), []
    chunks = text_chunks(table, storage, limits)
    ds = ray.data.from_items([{"index": i, **asdict(c)} for i, c in enumerate(chunks)],
                             override_num_blocks=len(chunks))
    counted = sorted(ds.map_batches(_count_chunks, batch_size=1, batch_format="pyarrow",
                                    fn_kwargs={"fs": fs, "fmt": table.format, "limits": limits}).take_all(),
                     key=lambda c: c["index"])  # Ray Data may finish the tasks in any order
    return sum(c["records"] for c in counted), number_chunks(chunks, [c["lines"] for c in counted])


def _parquet_rows(fs: pafs.FileSystem, paths: list[str]) -> int:
    """Rows of parquet files, from their footers."""
    total = 0
    for path in paths:
        with fs.open_input_file(path) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def number_chunks(chunks: list[TextChunk], lines: list[int]) -> list[TextChunk]:
    """The ranges with the number of their first line, from the physical lines each range starts."""
    numbered, line = [], 1
    for chunk, count in zip(chunks, lines, strict=True):
        line = 1 if chunk.start == 0 else line
        numbered.append(replace(chunk, first_line=line))
        line += count
    return numbered


def normalize_arrow(batch: pa.Table, rules: RowRules, part: str | None) -> pa.Table:
    """Ray Data batch of parquet rows -> work rows (with a `part` column naming the table, if given)."""
    return work_table([work_row(row, rules, error) for row, error in arrow_records(batch, rules.limits)], part)


def _chunk_work_rows(fs: pafs.FileSystem, chunk: TextChunk, fmt: str, rules: RowRules) -> Iterator[list[dict]]:
    rows = []
    for _, row, error in read_text_chunk(fs, chunk, fmt, rules.limits):
        rows.append(work_row(row, rules, error))
        if len(rows) >= _ROWS_PER_BLOCK:
            yield rows
            rows = []
    if rows:
        yield rows


def _read_chunks(batch: pa.Table, fs: pafs.FileSystem, fmt: str, rules: RowRules, part: str | None
                 ) -> Iterator[pa.Table]:
    """Ray Data task: read ranges of jsonl/csv files -> blocks of work rows."""
    for chunk in batch.to_pylist():
        for rows in _chunk_work_rows(fs, TextChunk(**chunk), fmt, rules):
            yield work_table(rows, part)


def _read_parquet(paths: list[str], fs: pafs.FileSystem, blocks: int | None = None) -> Any:
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
        return ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=blocks)
    finally:
        context.use_datasource_v2 = previous


def read_work_rows(table: InputTable, rules: RowRules, storage: Storage, part: str | None = None,
                   chunks: list[TextChunk] | None = None, rows: int | None = None) -> Any:
    """A Ray Dataset of the table's work rows (streaming: nothing is collected on the driver).

    `part` adds a column with that value, so that several tables can be written in one pass
    partitioned by (part, shard). `chunks` are the ranges `count_rows` numbered (else line numbers
    of later jsonl ranges are given as byte offsets); `rows`, the parquet row count `count_rows` read
    from the footers (else they are read here).
    """
    import ray

    fs, paths = _paths(table, storage)
    if table.format == "parquet":
        # One block per READ_BLOCK_ROWS rows: Ray Data's default (two blocks per CPU of the cluster, for
        # any size) turned the 2,000 items of a small run into 14 read, validate and write tasks each,
        # most of a partition pass's 11 s on 2 cores. At least one per file: a block of two files
        # would give each file's rows the columns of the other (validated as the file never had them).
        rows = _parquet_rows(fs, paths) if rows is None else rows
        blocks = max(len(paths), math.ceil(rows / READ_BLOCK_ROWS))
        return _read_parquet(paths, fs, blocks).map_batches(
            normalize_arrow, batch_format="pyarrow", fn_kwargs={"rules": rules, "part": part})
    chunks = chunks or text_chunks(table, storage, rules.limits)
    ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks))
    return ds.map_batches(_read_chunks, batch_size=1, batch_format="pyarrow",
                          fn_kwargs={"fs": fs, "fmt": table.format, "rules": rules, "part": part})


def read_table_rows(table: InputTable, rules: RowRules, storage: Storage) -> pa.Table:
    """Every work row of a table, read in this process (Serve replicas, training tasks)."""
    fs, paths = _paths(table, storage)
    blocks = []
    for (uri, size), path in zip(table.files, paths, strict=True):
        if table.format == "parquet":
            with fs.open_input_file(path) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=_ROWS_PER_BLOCK):
                    blocks.append(normalize_arrow(pa.Table.from_batches([batch]), rules, None))
        else:
            chunk = TextChunk(uri, path, 0, size, first_line=1)  # one reader, in order: exact line numbers
            blocks += [work_table(rows) for rows in _chunk_work_rows(fs, chunk, table.format, rules)]
    return pa.concat_tables(blocks) if blocks else WORK_SCHEMA.empty_table()


def read_work_files(storage: Storage, uri: str) -> pa.Table:
    """The work rows under a directory written by Ray Data (empty when there is none)."""
    fs, _ = storage.filesystem(uri)
    files = [i.path for i in storage.files(uri) or [] if i.base_name.endswith(".parquet")]
    tables = [pq.read_table(f, filesystem=fs, schema=WORK_SCHEMA) for f in files]
    return pa.concat_tables(tables) if tables else WORK_SCHEMA.empty_table()


def work_dataset(storage: Storage, uri: str) -> Any:
    """The work rows under a directory written by Ray Data, as a Ray Dataset; None when there are none
    (Ray Data writes no directory for a part without rows)."""
    if not storage.exists(uri):
        return None
    fs, path = storage.filesystem(uri)
    return _read_parquet([path], fs).select_columns(list(PROFILE_COLUMNS))


class ProfileIndex:
    """A users or items table by id: features, or why the id cannot be used.

    The one rule every reader follows: a row that failed validation is rejected with its reason; an
    id that appears more than once is rejected in every copy (keeping the first would depend on file
    order, and the copies may disagree); rows without a usable id are rejected. `rejected()` lists
    them all, once each, for errors/ (the backfill) or a replica's log (Serve).
    """

    def __init__(self, table: pa.Table, side: str):
        self.side = side  # "user" or "item"
        self.table = table.select(list(PROFILE_COLUMNS))
        self.rows: dict[str, tuple[dict[str, Any] | None, str | None, int]] = {}
        for row in self.table.select(["key", "raw", "error"]).to_pylist():
            if row["key"] is None:
                continue
            seen = self.rows.get(row["key"])
            if seen:
                self.rows[row["key"]] = (seen[0], seen[1], seen[2] + 1)
            else:
                self.rows[row["key"]] = (json.loads(row["raw"]) if row["error"] is None else None, row["error"], 1)

    def get(self, key: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """(features, None) or (None, why the join fails)."""
        found = self.rows.get(key) if key is not None else None
        if found is None:
            return None, f"unknown {self.side} {key!r}: not in the {self.side}s table"
        features, error, count = found
        if count > 1:
            return None, f"{self.side}_id {key!r} appears {count} times in the {self.side}s table"
        if error is not None:
            return None, f"{self.side} {key!r} is invalid: {error}"
        return features, None

    def features(self) -> dict[str, dict[str, Any]]:
        """id -> features of every usable id."""
        return {key: features for key, (features, error, count) in self.rows.items()
                if error is None and count == 1 and features is not None}

    def rejected(self) -> list[dict[str, Any]]:
        """Every rejected row (work row columns, `error` set), in table order."""
        out = []
        for row in self.table.to_pylist():
            if row["error"] is None:
                count = self.rows[row["key"]][2]
                if count == 1:
                    continue
                row = {**row, "stage": "validate",
                       "error": f"{self.side}_id {row['key']!r} appears {count} times in the {self.side}s table"}
            out.append(row)
        return out

    def __len__(self) -> int:
        return len(self.rows)


def load_profiles(side: str, uri: str, fmt: str, storage: Storage, limits: ReadLimits) -> ProfileIndex:
    """A users (`side="user"`) or items table read in-process and indexed by the one rule."""
    kind = f"{side}s"
    table = resolve_input(kind, uri, fmt, storage)  # type: ignore[arg-type]
    return ProfileIndex(read_table_rows(table, RowRules(kind, limits=limits), storage), side)  # type: ignore[arg-type]
