"""Input records from bytes, whatever the bytes: jsonl and csv as bounded streams, parquet cell by cell.

A record comes out as `(where, row, read_error)`: `where` names the file and line ("users.csv:12"),
`row` is a dict (what could be parsed; `{"line": ...}` when nothing could), `read_error` says why
the record cannot be read, or is None. Nothing here raises on the content of a record: invalid
UTF-8 anywhere (kept as surrogates, so validation can name the field), lone surrogate escapes,
deep nesting, duplicate keys, a line or csv field over `max_record_bytes`, ragged csv rows, a
parquet cell that Arrow cannot convert. Work per record is bounded by `ReadLimits`:

- a line (jsonl) or field (csv) over `max_record_bytes` is skipped unparsed, with memory bounded too
  (lines are read in 1 MiB blocks, never whole);
- a jsonl line is only parsed when its brackets cannot nest deeper than `max_nesting_depth` (found
  by a scan that needs no recursion), so `json.loads` never recurses on a hostile line;
- jsonl files are read in byte ranges (`TextChunk`); a line belongs to the range holding its first
  byte, so ranges split a file exactly. csv cannot be split that way (quoted fields may hold line
  ends) and is streamed whole by one reader.

Validation of the parsed rows (types, ids, field names, sizes) is validation.py's: the same rules
apply to rows from every format.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from aigc_dist.config import DataConfig

_BLOCK_BYTES = 1 << 20
_SHOWN_CHARS = 1024  # how much of an unparsed record errors/ keeps
_BOM = "\ufeff"
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:]')
Record = tuple[str, dict[str, Any], str | None]


@dataclass(frozen=True)
class ReadLimits:
    """What bounds the work spent on one record; the `data` section's fields of the same names."""

    max_id_chars: int
    max_value_chars: int
    max_record_bytes: int
    max_nesting_depth: int
    max_fields: int
    read_chunk_bytes: int

    @classmethod
    def of(cls, data: DataConfig) -> ReadLimits:
        return cls(data.max_id_chars, data.max_value_chars, data.max_record_bytes, data.max_nesting_depth,
                   data.max_fields, data.read_chunk_bytes)

    @classmethod
    def default(cls) -> ReadLimits:
        return cls.of(DataConfig())


@dataclass(frozen=True)
class TextChunk:
    """A byte range of a jsonl or csv file: the lines whose first byte lies in [start, end)."""

    uri: str
    path: str  # in the filesystem (what pyarrow opens)
    start: int
    end: int
    first_line: int | None = None  # number of its first line, once known (the count pass finds it)


# -- text that can always be shown ---------------------------------------------------------------

def printable(text: str) -> str:
    """`text` as valid UTF-8: undecodable bytes (kept as surrogates by the reader) as \\xNN, lone
    surrogate escapes (JSON's "\\ud800") as \\uXXXX."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def _jsonable(value: Any, levels_left: int) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict | list | tuple) and levels_left <= 0:
        return "<nested deeper than data.max_nesting_depth>"
    if isinstance(value, dict):
        return {printable(str(k)): _jsonable(v, levels_left - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, levels_left - 1) for v in value]
    if isinstance(value, datetime.date | datetime.time | datetime.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | datetime.timedelta):
        return str(value)
    return value


def raw_json(row: Any, max_depth: int = 64) -> str:
    """The row as JSON for errors/ and for the joins: bytes and invalid UTF-8 as escapes, NaN as null,
    values nested deeper than `max_depth` replaced by a note (so no row can make this recurse deeply)."""
    return json.dumps(_jsonable(row, max_depth + 1), ensure_ascii=False, separators=(",", ":"), default=str)


def _shown(text: str) -> dict[str, Any]:
    """An unparsed record as errors/ keeps it: its start, valid UTF-8."""
    return {"line": printable(text[:_SHOWN_CHARS]) + ("..." if len(text) > _SHOWN_CHARS else "")}


# -- nesting ---------------------------------------------------------------------------------------

def nesting_depth(value: Any, limit: int) -> int:
    """Levels of lists/objects in `value` (a scalar 0, a list of scalars 1), counted without recursion
    and stopping once over `limit`."""
    if not isinstance(value, dict | list | tuple):
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
    return deepest


def _too_deep_field(text: str, limit: int) -> str | None:
    """The top-level field of a JSON object text whose value nests deeper than `limit`, else None.

    A token scan (strings skipped whole), so a line of 100,000 "[" costs a pass, not a recursion.
    """
    depth, key, last = 0, "?", ""
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token[0] == '"':
            last = token
        elif token in "[{":
            depth += 1
            if depth - 1 > limit:  # the row's own object is depth 1, its values' levels start there
                return key
        elif token in "]}":
            depth -= 1
        elif depth == 1:  # ":" after a top-level key
            key = printable(last[1:-1])
    return None


def arrow_type_depth(dtype: pa.DataType) -> int:
    """Levels of nesting of an Arrow type, as `nesting_depth` counts them for its values."""
    if pa.types.is_struct(dtype):
        return 1 + max((arrow_type_depth(dtype.field(i).type) for i in range(dtype.num_fields)), default=0)
    if pa.types.is_map(dtype):
        return 2 + max(arrow_type_depth(dtype.key_type), arrow_type_depth(dtype.item_type))
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype) \
            or pa.types.is_list_view(dtype) or pa.types.is_large_list_view(dtype):
        return 1 + arrow_type_depth(dtype.value_type)
    return 0


# -- jsonl -----------------------------------------------------------------------------------------

class _DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice would silently keep one value; make it a reason instead."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def parse_json_record(text: str, where: str, limits: ReadLimits) -> tuple[dict[str, Any], str | None]:
    """(row, None) for a JSON object line, else (what errors/ shows, why it cannot be read)."""
    if text.count("[") + text.count("{") > limits.max_nesting_depth + 1:
        field = _too_deep_field(text, limits.max_nesting_depth)
        if field is not None:
            return _shown(text), (f"{where}: {field}: nested more than {limits.max_nesting_depth} levels deep "
                                  "(data.max_nesting_depth); not parsed")
    try:
        row = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as exc:
        return _shown(text), f"{where}: field {printable(exc.key)!r} appears twice in one object"
    except RecursionError:  # the scan above makes this unreachable for valid JSON; kept as a floor
        return _shown(text), f"{where}: nested too deeply to parse (data.max_nesting_depth)"
    except ValueError as exc:  # includes ints over Python's 4,300-digit limit
        return _shown(text), f"{where}: not valid JSON ({printable(getattr(exc, 'msg', str(exc)))})"
    if not isinstance(row, dict):
        return _shown(text), f"{where}: not a JSON object"
    return row, None


# -- lines of a byte range -----------------------------------------------------------------------

def _lines(stream: Any, origin: int, end: int, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, line, length) of each line starting in [origin, end) of a stream positioned at `origin`;
    `line` is None for a line over `limit` bytes, its line end included (skipped block by block, never
    held whole)."""
    buf, base, eof = b"", origin, False  # base: file offset of buf[0]
    while True:
        newline = buf.find(b"\n")
        if newline == -1 and not eof and len(buf) <= limit:
            block = stream.read(_BLOCK_BYTES)
            buf, eof = buf + block, not block
            continue
        if base >= end or not buf:
            return
        if newline != -1:
            length = newline + 1
            yield base, buf[:length] if length <= limit else None, length
            buf, base = buf[length:], base + length
        elif eof:
            yield base, buf if len(buf) <= limit else None, len(buf)  # the last line, without a line end
            return
        else:  # over the limit and no line end in sight: skip to it
            length = len(buf)
            while True:
                block = stream.read(_BLOCK_BYTES)
                cut = block.find(b"\n")
                if cut != -1 or not block:
                    length += cut + 1 if cut != -1 else 0
                    yield base, None, length
                    buf, base, eof = block[cut + 1:] if cut != -1 else b"", base + length, not block
                    break
                length += len(block)


def _chunk_lines(fs: pafs.FileSystem, chunk: TextChunk, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    with fs.open_input_file(chunk.path) as stream:
        if chunk.start == 0:
            yield from _lines(stream, 0, chunk.end, limit)
            return
        # The line holding byte start-1 began in the previous range (if that byte is a line end, the
        # skipped "line" is just it): whatever it is, the previous range reads it.
        stream.seek(chunk.start - 1)
        lines = _lines(stream, chunk.start - 1, chunk.end, limit)
        next(lines, None)
        yield from lines


def _text(line: bytes, offset: int) -> str:
    text = line.decode("utf-8", "surrogateescape")
    return text[1:] if offset == 0 and text.startswith(_BOM) else text  # a BOM is an encoding mark, not data


def _blank(line: bytes, offset: int) -> bool:
    """A jsonl line holding only white space is not a record (the count and the read agree on it)."""
    return not _text(line, offset).strip()


def _over_long(where: str, length: int, limit: int) -> str:
    return f"{where}: a record of {length:,} bytes, over data.max_record_bytes={limit:,}; not parsed"


def _jsonl_records(lines: Iterator[tuple[int, bytes | None, int]], chunk: TextChunk, limits: ReadLimits,
                   parse: bool) -> Iterator[Record]:
    for number, (offset, line, length) in enumerate(lines, chunk.first_line or 1):
        where = f"{chunk.uri}:{number}" if chunk.first_line is not None else f"{chunk.uri}@{offset}"
        if line is None:
            yield where, {"line": f"<{length:,} bytes not shown>"}, _over_long(where, length, limits.max_record_bytes)
            continue
        if _blank(line, offset):
            continue
        if not parse:
            yield where, {}, None
            continue
        row, error = parse_json_record(_text(line, offset).rstrip("\n").rstrip("\r"), where, limits)
        yield where, row, error


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """The csv module's field limit is process-wide state; ours holds only while a file is parsed."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv_records(lines: Iterator[tuple[int, bytes | None, int]], chunk: TextChunk, limits: ReadLimits,
                 parse: bool) -> Iterator[Record]:
    over_long: list[int] = []

    def feed() -> Iterator[str]:
        for offset, line, length in lines:
            if line is None:
                over_long.append(length)
                yield "\n"  # keeps csv's line count; the record is reported from over_long
            else:
                yield _text(line, offset)

    def unreadable(where: str) -> Iterator[Record]:
        for length in over_long:
            yield where, {"line": f"<{length:,} bytes not shown>"}, _over_long(where, length, limits.max_record_bytes)
        over_long.clear()

    first = (chunk.first_line or 1) - 1
    reader = csv.reader(feed())
    header: list[str] | None = None
    header_problem: str | None = None
    with _csv_field_limit(limits.max_record_bytes):
        while True:
            where = f"{chunk.uri}:{first + reader.line_num + 1}"
            try:
                fields = next(reader)
            except StopIteration:
                yield from unreadable(where)
                return
            except csv.Error as exc:  # the reader goes on with the next line
                reason = (f"a field over data.max_record_bytes={limits.max_record_bytes:,} characters; not parsed"
                          if "field limit" in str(exc) else f"not valid csv ({exc})")
                yield where, {"line": "<not parsed>"}, f"{where}: {reason}"
                continue
            yield from unreadable(where)
            if not any(fields):
                continue
            if header is None:
                header = fields
                repeated = sorted({name for name in fields if fields.count(name) > 1})
                if repeated:
                    header_problem = f"column {printable(repeated[0])!r} appears twice in the header"
                continue
            if not parse:
                yield where, {}, None
            elif len(fields) != len(header):
                yield where, _shown(",".join(fields)), f"{where}: {len(fields)} fields, the header has {len(header)}"
            else:
                row = {k: (v if v != "" else None) for k, v in zip(header, fields, strict=True)}
                yield where, row, f"{where}: {header_problem}" if header_problem else None


def read_text_chunk(fs: pafs.FileSystem, chunk: TextChunk, fmt: str, limits: ReadLimits,
                    parse: bool = True) -> Iterator[Record]:
    """The records of one range of a jsonl or csv file (`parse=False`: their places only, for counting)."""
    lines = _chunk_lines(fs, chunk, limits.max_record_bytes)
    if fmt == "jsonl":
        return _jsonl_records(lines, chunk, limits, parse)
    return _csv_records(lines, chunk, limits, parse)


def count_text_chunk(fs: pafs.FileSystem, chunk: TextChunk, fmt: str, limits: ReadLimits) -> tuple[int, int]:
    """(records, physical lines) of one range, in one pass; the lines tell the next range its first line
    number. Records are counted by the very code that reads them, so the counts cannot disagree."""
    if fmt != "jsonl":
        return sum(1 for _ in read_text_chunk(fs, chunk, fmt, limits, parse=False)), 0
    records = lines = 0
    for offset, line, _ in _chunk_lines(fs, chunk, limits.max_record_bytes):
        lines += 1
        records += line is None or not _blank(line, offset)
    return records, lines


# -- parquet (Arrow batches) ----------------------------------------------------------------------

def _column_values(column: pa.ChunkedArray | pa.Array, name: str) -> tuple[list[Any], dict[int, str]]:
    """Python values of a column and, by row, why a cell could not be converted."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # Arrow does not check UTF-8 when reading parquet; decoding it here keeps bad bytes as
        # surrogates, so validation names the field as it does for jsonl and csv.
        as_bytes = column.cast(pa.large_binary()).to_pylist()
        return [None if b is None else b.decode("utf-8", "surrogateescape") for b in as_bytes], {}
    try:
        return column.to_pylist(), {}
    except Exception:  # noqa: BLE001 - any cell Arrow cannot convert costs that cell's row only
        values: list[Any] = []
        problems: dict[int, str] = {}
        for index in range(len(column)):
            try:
                values.append(column[index].as_py())
            except Exception as exc:  # noqa: BLE001
                values.append(None)
                problems[index] = f"{name}: cannot be read ({printable(type(exc).__name__)})"
        return values, problems


def arrow_records(batch: pa.Table, limits: ReadLimits) -> list[tuple[dict[str, Any], str | None]]:
    """(row, read error) per row of an Arrow batch, converted column by column within the limits."""
    rows: list[dict[str, Any]] = [{} for _ in range(batch.num_rows)]
    errors: list[str | None] = [None] * batch.num_rows
    names = batch.column_names
    if len(names) > limits.max_fields:
        errors = [f"{len(names)} fields, over the limit of {limits.max_fields} (data.max_fields)"] * batch.num_rows
    for name in names[:limits.max_fields]:
        column, shown = batch.column(name), printable(name)
        depth = arrow_type_depth(column.type)
        if depth > limits.max_nesting_depth:
            problem = f"{shown}: nested {depth} levels deep, over the limit of {limits.max_nesting_depth} " \
                      "(data.max_nesting_depth)"
            values, problems = ["<nested deeper than data.max_nesting_depth>"] * batch.num_rows, {}
            errors = [e or problem for e in errors]
        else:
            values, problems = _column_values(column, shown)
        for index, value in enumerate(values):
            rows[index][name] = value
        for index, problem in problems.items():
            errors[index] = errors[index] or problem
    return list(zip(rows, errors, strict=True))
