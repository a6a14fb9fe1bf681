"""A hostile input corpus: no input row can stop the backfill, and every row is accounted for.

Each bad record is read alone through the reader the backfill's read tasks run (records.py via
reading.py) and must become exactly one quarantined work row whose reason names its field; then all
of them together, in jsonl, csv and parquet tables of every kind, go through one real backfill
each (candidates + users + items, and a pre-joined requests table) that must complete with every
row in data/ or errors/ exactly once; then Serve loads the same users and items tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc_dist.batch.inputs import InputError, RowRules, resolve_input, stable_request_id
from aigc_dist.batch.layout import read_output
from aigc_dist.batch.pipeline import run_backfill
from aigc_dist.batch.reading import number_chunks, read_table_rows, text_chunks
from aigc_dist.batch.records import ReadLimits, count_text_chunk, read_text_chunk
from aigc_dist.config import DataConfig, StorageConfig
from aigc_dist.data.prompts import template_digest
from aigc_dist.demo.world import WorldConfig, make_world
from aigc_dist.serve.profiles import InvalidProfileError, ProfileTable
from aigc_dist.storage import Storage

# Small limits, so over-limit records stay small files: 8 KiB records, 1,000-character values, 64
# fields, 16 levels (parquet itself reads no schema past ~48 list levels), and jsonl read in 4 KiB
# ranges (the candidates file is cut into several, mid-line).
LIMITS = {"max_record_bytes": 8192, "max_value_chars": 1000, "max_fields": 64, "max_nesting_depth": 16,
          "read_chunk_bytes": 4096}
HEADERS = {"users": "user_id,segment,locale,interests", "requests": "request_id,user_id,item_id,segment,title"}
DEEP = b"[" * 300 + b"]" * 300  # a few hundred levels: json would recurse through every one


@dataclass(frozen=True)
class Bad:
    """One bad record: its table, format, bytes (a jsonl line, a csv line) or parquet row, and the
    stage and words its reason must have (the field it names)."""

    name: str
    table: str
    fmt: str
    record: bytes | dict[str, Any]
    stage: str
    reason: str


def _many_fields() -> bytes:
    return json.dumps({"user_id": "u000001", "item_id": "i00001", **{f"f{k}": k for k in range(70)}}).encode()


BAD_CANDIDATES = [
    Bad("key-invalid-utf8", "candidates", "jsonl", b'{"user_id": "u000001", "item_id": "i00001", "no\xfft": 1}',
        "validate", "field name 'no\\xfft': invalid UTF-8"),
    Bad("key-lone-surrogate", "candidates", "jsonl", b'{"user_id": "u000001", "item_id": "i00002", "\\udc00k": 1}',
        "validate", "field name '\\udc00k': invalid UTF-8"),
    Bad("value-lone-surrogate", "candidates", "jsonl",
        b'{"user_id": "u000001", "item_id": "i00003", "memo": "x\\ud800"}', "validate", "memo: invalid UTF-8"),
    Bad("value-invalid-utf8", "candidates", "jsonl", b'{"user_id": "u000001", "item_id": "i00004", "tag": "a\xfe"}',
        "validate", "tag: invalid UTF-8"),
    Bad("deep-value", "candidates", "jsonl", b'{"user_id": "u000002", "item_id": "i00001", "tree": ' + DEEP + b"}",
        "read", "tree: nested more than 16 levels"),
    Bad("over-long-line", "candidates", "jsonl",
        json.dumps({"user_id": "u000002", "item_id": "i00002", "blob": "x" * 9000}).encode(),
        "read", "over data.max_record_bytes=8,192"),
    Bad("duplicate-key", "candidates", "jsonl", b'{"user_id": "u000002", "user_id": "u000003", "item_id": "i00003"}',
        "read", "field 'user_id' appears twice"),
    Bad("too-many-fields", "candidates", "jsonl", _many_fields(), "validate", "72 fields, over the limit of 64"),
    Bad("id-not-text", "candidates", "jsonl", b'{"user_id": 17, "item_id": "i00001"}', "validate",
        "user_id must be text"),
    Bad("rank-not-int", "candidates", "jsonl", b'{"user_id": "u000003", "item_id": "i00001", "rank": "first"}',
        "validate", "rank must be an integer"),
    Bad("score-nan", "candidates", "jsonl", b'{"user_id": "u000003", "item_id": "i00002", "score": NaN}',
        "validate", "score must be a finite number"),
    Bad("null-ids", "candidates", "jsonl", b'{"user_id": null, "item_id": null}', "validate", "missing user_id"),
    Bad("id-over-long", "candidates", "jsonl", json.dumps({"user_id": "u" * 300, "item_id": "i00001"}).encode(),
        "validate", "user_id: 300 characters"),
    Bad("id-control-char", "candidates", "jsonl", b'{"user_id": "u0\\u0001", "item_id": "i00001"}', "validate",
        "control characters"),
    Bad("value-over-long", "candidates", "jsonl",
        json.dumps({"user_id": "u000003", "item_id": "i00003", "note": "y" * 1500}).encode(),
        "validate", "note: 1500 characters, over the limit of 1000"),
    Bad("broken-json", "candidates", "jsonl", b'{"user_id": "u000004", ', "read", "not valid JSON"),
    Bad("bom-mid-file", "candidates", "jsonl", b'\xef\xbb\xbf{"user_id": "u000004", "item_id": "i00001"}',
        "read", "not valid JSON"),
    Bad("not-an-object", "candidates", "jsonl", b"[1, 2]", "read", "not a JSON object"),
    Bad("huge-integer", "candidates", "jsonl", b'{"user_id": "u000004", "item_id": "i00002", "n": 1' + b"0" * 5000
        + b"}", "read", "Exceeds the limit (4300 digits)"),
]
BAD_USERS = [
    Bad("csv-missing-fields", "users", "csv", b"u_short,student", "read", "2 fields, the header has 4"),
    Bad("csv-invalid-utf8", "users", "csv", b"u_bad8,stu\xffdent,en,x", "validate", "segment: invalid UTF-8"),
    Bad("csv-null-id", "users", "csv", b",student,en,x", "validate", "missing user_id"),
    Bad("csv-field-over-limit", "users", "csv",  # one quoted field over 3 lines: over the field limit, not a line's
        b'u_multi,"' + b"a" * 3000 + b"\n" + b"b" * 3000 + b"\n" + b"c" * 3000 + b'",en,x', "read",
        "a field over data.max_record_bytes=8,192 characters"),
    Bad("csv-over-long-line", "users", "csv", b"u_wide,student,en," + b"z" * 9000, "read",
        "over data.max_record_bytes=8,192"),
    Bad("csv-value-over-long", "users", "csv", b"u_long,student,en," + b"w" * 1200, "validate",
        "interests: 1200 characters"),
]
BAD_ITEMS = [  # parquet rows; str values given as bytes are written as raw (unchecked) UTF-8 bytes
    Bad("parquet-invalid-utf8", "items", "parquet", {"item_id": b"i_bad8", "title": b"Trail \xff Pack"},
        "validate", "title: invalid UTF-8"),
    Bad("parquet-null-id", "items", "parquet", {"item_id": None, "title": b"No id"}, "validate", "missing item_id"),
    Bad("parquet-invalid-utf8-in-list", "items", "parquet",
        {"item_id": b"i_badlist", "title": b"Lamp", "attributes": [b"ok", b"\xc3("]}, "read",
        "attributes: cannot be read"),
    Bad("parquet-value-over-long", "items", "parquet", {"item_id": b"i_long", "title": b"t" * 1200}, "validate",
        "title: 1200 characters"),
]
BAD_REQUESTS = [
    Bad("requests-csv-over-long-id", "requests", "csv", b"r" * 300 + b",u1,i1,student,Tent", "validate",
        "request_id: 300 characters"),
    Bad("requests-csv-invalid-utf8", "requests", "csv", b"r_bad,u1,i1,student,Te\xffnt", "validate",
        "title: invalid UTF-8"),
    Bad("requests-csv-no-ids", "requests", "csv", b",,,student,Tent", "validate", "missing user_id"),
    Bad("requests-csv-ragged", "requests", "csv", b"r_short,u1", "read", "2 fields, the header has 5"),
]
ALONE = BAD_CANDIDATES + BAD_USERS + BAD_ITEMS + BAD_REQUESTS
ITEMS_SCHEMA = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("category", pa.string()),
                          ("attributes", pa.list_(pa.string()))])


def _string_array(values: list[Any]) -> pa.Array:
    """A string array from str or raw bytes, without Arrow's UTF-8 check (what a foreign writer can produce)."""
    return pa.array([v.encode() if isinstance(v, str) else v for v in values], pa.binary()).view(pa.string())


def _write_items_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = {name: [row.get(name) for row in rows] for name in ITEMS_SCHEMA.names}
    lists = columns["attributes"]
    flat = [v for values in lists if values for v in values]
    offsets, at = [], 0
    for values in lists:
        offsets.append(at)
        at += len(values or [])
    offsets.append(at)
    attributes = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _string_array(flat),
                                          mask=pa.array([v is None for v in lists]))
    table = pa.table([_string_array(columns["item_id"]), _string_array(columns["title"]),
                      _string_array(columns["category"]), attributes], schema=ITEMS_SCHEMA)
    pq.write_table(table, path)


def _write(path: Path, bad: list[Bad], good: list[bytes] | list[dict[str, Any]], header: str | None = None) -> None:
    """A table file: good records first, then the bad ones (parquet: rows; else lines)."""
    if bad and bad[0].fmt == "parquet" or good and isinstance(good[0], dict):
        _write_items_parquet(path, [*good, *(b.record for b in bad)])
        return
    lines = ([header.encode()] if header else []) + list(good) + [b.record for b in bad]
    path.write_bytes(b"\n".join(lines) + b"\n")


def _read_alone(tmp_path: Path, bad: Bad, limits: ReadLimits) -> list[dict[str, Any]]:
    kind = bad.table
    path = tmp_path / f"{kind}.{bad.fmt}"
    # jsonl: a blank first line (not a record), so no record is the file's first, where a BOM is an
    # encoding mark rather than part of the record.
    _write(path, [bad], [b""] if bad.fmt == "jsonl" else [], HEADERS.get(kind) if bad.fmt == "csv" else None)
    table = resolve_input(kind, str(path), "auto", Storage())  # type: ignore[arg-type]
    return read_table_rows(table, RowRules(kind, num_shards=3, id_salt="t", limits=limits), Storage()).to_pylist()


@pytest.mark.parametrize("bad", ALONE, ids=[b.name for b in ALONE])
def test_each_bad_record_alone_is_one_quarantined_row_naming_its_field(tmp_path, bad):
    rows = _read_alone(tmp_path, bad, ReadLimits.of(DataConfig(**LIMITS)))

    assert len(rows) == 1
    assert bad.reason in rows[0]["error"] and rows[0]["stage"] == bad.stage
    assert isinstance(json.loads(rows[0]["raw"]), dict)  # errors/ can always show the row, as valid JSON


@pytest.mark.parametrize(
    ("name", "record", "reason"),
    [  # the records that stopped the whole job before, at the default limits
        ("nested-100000-levels", b'{"user_id": "u1", "item_id": "i1", "tree": ' + b"[" * 100_000 + b"]" * 100_000
         + b"}", "tree: nested more than 64 levels"),
        ("csv-field-over-csv-module-default", b"user_id,item_id,note\nu1,i1," + b"n" * 140_000,
         "note: 140000 characters, over the limit of 4096"),
    ],
)
def test_records_that_used_to_crash_the_job_are_quarantined_at_default_limits(tmp_path, name, record, reason):
    path = tmp_path / ("c.csv" if b"user_id,item_id,note" in record else "c.jsonl")
    path.write_bytes(record + b"\n")
    table = resolve_input("candidates", str(path), "auto", Storage())
    rows = read_table_rows(table, RowRules("candidates"), Storage()).to_pylist()
    assert len(rows) == 1 and reason in rows[0]["error"]


def test_jsonl_ranges_split_a_file_exactly_with_true_line_numbers(tmp_path):
    """The Ray read tasks each take one range; together they must see every record once, numbered."""
    lines = [json.dumps({"user_id": f"u{k}", "item_id": "i1", "pad": "p" * (k * 37 % 900)}).encode()
             for k in range(60)]
    lines[17] = b"not json"
    lines[40] = b""  # blank: not a record, but a line
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    limits = ReadLimits.of(DataConfig(**LIMITS))
    table = resolve_input("candidates", str(path), "auto", Storage())
    chunks = text_chunks(table, Storage(), limits)
    fs = Storage().filesystem(str(path))[0]
    counts = [count_text_chunk(fs, chunk, "jsonl", limits) for chunk in chunks]
    numbered = number_chunks(chunks, [lines for _, lines in counts])

    records = [record for chunk in numbered for record in read_text_chunk(fs, chunk, "jsonl", limits)]

    assert len(chunks) > 3 and sum(n for n, _ in counts) == len(records) == 59
    assert [row["user_id"] for _, row, error in records if error is None] == [
        f"u{k}" for k in range(60) if k not in (17, 40)]
    assert [error for _, _, error in records if error] == [f"{path}:18: not valid JSON (Expecting value)"]


# -- all together, through real backfills -----------------------------------------------------------

WORLD = WorldConfig(num_users=6, num_items=8, candidates_per_user=5, seed=3)  # 30 good candidates
GOOD_USER = {"user_id": "用户-1", "segment": "学生", "locale": "zh", "interests": "旅行|摄影"}
GOOD_ITEM = {"item_id": "商品-😀", "title": "טיול 😀 旅行 Pack", "category": "outdoor", "attributes": ["轻"]}


def _users_csv_line(user: dict[str, Any]) -> bytes:
    interests = user["interests"] if isinstance(user["interests"], str) else "|".join(user["interests"])
    return f"{user['user_id']},{user['segment']},{user['locale']},{interests}".encode()


@pytest.fixture(scope="module")
def hostile_tables(tmp_path_factory) -> dict[str, Any]:
    """candidates.jsonl, users.csv, items/ (two parquet files): the good world plus every bad record."""
    root = tmp_path_factory.mktemp("hostile")
    world = make_world(WORLD)
    users, items, candidates = world.users.to_pylist(), world.items.to_pylist(), world.candidates.to_pylist()
    good_candidates = candidates + [{"user_id": GOOD_USER["user_id"], "item_id": GOOD_ITEM["item_id"]},
                                    {"user_id": GOOD_USER["user_id"], "item_id": items[0]["item_id"]}]
    # Rows that are fine in themselves but join against bad or repeated profile rows.
    joins = [
        Bad("unknown-user", "candidates", "jsonl", b'{"user_id": "u999999", "item_id": "i00001"}', "join",
            "unknown user 'u999999'"),
        Bad("unknown-item", "candidates", "jsonl", b'{"user_id": "u000001", "item_id": "i99999"}', "join",
            "unknown item 'i99999'"),
        Bad("user-repeated", "candidates", "jsonl", b'{"user_id": "u_twice", "item_id": "i00001"}', "join",
            "user_id 'u_twice' appears 2 times"),
        Bad("user-invalid", "candidates", "jsonl", b'{"user_id": "u_bad8", "item_id": "i00001"}', "join",
            "user 'u_bad8' is invalid: segment: invalid UTF-8"),
        Bad("item-invalid", "candidates", "jsonl", b'{"user_id": "u000001", "item_id": "i_long"}', "join",
            "item 'i_long' is invalid: title: 1200 characters"),
        Bad("duplicate-candidate", "candidates", "jsonl", json.dumps(candidates[0]).encode(), "validate",
            "duplicate request_id"),
    ]
    # The BOM of the file's first line is an encoding mark: that first row stays good.
    lines = [b"\xef\xbb\xbf" + json.dumps(good_candidates[0], ensure_ascii=False).encode()]
    lines += [json.dumps(c, ensure_ascii=False).encode() for c in good_candidates[1:]]
    _write(root / "candidates.jsonl", BAD_CANDIDATES + joins, lines)
    twice = {**users[0], "user_id": "u_twice"}  # both copies are rejected, and the candidates naming it
    _write(root / "users.csv", BAD_USERS, [_users_csv_line(u) for u in [*users, twice, GOOD_USER, twice]],
           HEADERS["users"])
    (root / "items").mkdir()
    _write(root / "items" / "a.parquet", BAD_ITEMS, [*({k: i[k] for k in ITEMS_SCHEMA.names} for i in items),
                                                     GOOD_ITEM])
    deep = pa.array([[[[1]]]] * 2)  # 3 levels; 17 more make 20
    for _ in range(17):
        deep = pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()), deep)
    pq.write_table(pa.table({"item_id": ["i_deep1", "i_deep2"], "tree": deep}), root / "items" / "b.parquet")
    return {"root": root, "good": good_candidates, "bad": BAD_CANDIDATES + joins,
            "bad_users": [*BAD_USERS, "repeated", "repeated"], "bad_items": [*BAD_ITEMS, "deep", "deep"]}


def _assert_each_reason_once(errors: list[dict[str, Any]], bad: list[Bad]) -> None:
    """Bad rows and error rows pair up one to one, each pair with the bad row's stage and reason."""
    assert len(errors) == len(bad), sorted(e["error"] for e in errors)
    unmatched = list(errors)
    for b in sorted(bad, key=lambda b: -len(b.reason)):  # the most specific reasons choose first
        match = next((e for e in unmatched if b.reason in e["error"] and e["stage"] == b.stage), None)
        assert match is not None, (b.name, b.reason, sorted(e["error"] for e in unmatched))
        assert isinstance(json.loads(match["raw"]), dict)
        unmatched.remove(match)


def test_all_bad_rows_together_the_backfill_completes_and_accounts_for_every_row(ray_local, tmp_path, kit,
                                                                                   hostile_tables, lm_artifact):
    root = hostile_tables["root"]
    data_config = DataConfig(users=str(root / "users.csv"), items=str(root / "items"),
                             candidates=str(root / "candidates.jsonl"), **LIMITS)
    backfill = kit.config(str(tmp_path / "out"), lm_artifact, run_id="hostile", rows_per_file=20, min_chars=0)

    manifest = run_backfill(backfill, data_config, StorageConfig())

    data, errors = read_output(str(tmp_path / "out" / "hostile"))
    good, bad = hostile_tables["good"], hostile_tables["bad"]
    salt = template_digest(kit.template)
    assert sorted(data["request_id"].to_pylist()) == sorted(
        stable_request_id(c["user_id"], c["item_id"], salt) for c in good)  # good rows all present, once
    rows = errors.to_pylist()
    _assert_each_reason_once([e for e in rows if e["table"] == "candidates"], bad)
    assert manifest["counts"]["total"] == len(good) + len(bad) == data.num_rows + manifest["counts"]["quarantined"]
    # The bad rows of the users and items tables are in errors/ once each too, under their table.
    users = [e for e in rows if e["table"] == "users"]
    _assert_each_reason_once([e for e in users if "appears 2 times" not in e["error"]], BAD_USERS)
    assert sorted(e["user_id"] for e in users if "appears 2 times" in e["error"]) == ["u_twice", "u_twice"]
    items = [e for e in rows if e["table"] == "items"]
    _assert_each_reason_once([e for e in items if "tree: nested 20 levels" not in e["error"]], BAD_ITEMS)
    assert sorted(e["item_id"] for e in items if "tree: nested 20 levels" in e["error"]) == ["i_deep1", "i_deep2"]
    assert manifest["counts"]["profiles"] == {"users": len(users), "items": len(items)} == {
        "users": len(hostile_tables["bad_users"]), "items": len(hostile_tables["bad_items"])}
    chinese = [r for r in data.to_pylist() if r["user_id"] == GOOD_USER["user_id"]]
    assert {r["item_id"] for r in chinese} == {GOOD_ITEM["item_id"], "i00000"}


def test_a_hostile_prejoined_requests_table_completes_with_every_row_once(ray_local, tmp_path, kit, lm_artifact):
    good = [f"r{k:02d},u{k % 3},i{k % 4},student,Trail Pack {k}".encode() for k in range(12)]
    good.append("r_rtl,u1,i1,סטודנט,אוהל 😀 帐篷".encode())
    _write(tmp_path / "requests.csv", BAD_REQUESTS, good, HEADERS["requests"])
    backfill = kit.config(str(tmp_path / "out"), lm_artifact, run_id="hostile-requests", rows_per_file=5,
                          min_chars=0)

    manifest = run_backfill(backfill, DataConfig(requests=str(tmp_path / "requests.csv"), **LIMITS),
                            StorageConfig())

    data, errors = read_output(str(tmp_path / "out" / "hostile-requests"))
    assert sorted(data["request_id"].to_pylist()) == sorted([f"r{k:02d}" for k in range(12)] + ["r_rtl"])
    _assert_each_reason_once(errors.to_pylist(), BAD_REQUESTS)
    assert set(errors["table"].to_pylist()) == {"requests"}
    assert manifest["counts"]["total"] == len(good) + len(BAD_REQUESTS)


def test_serve_loads_the_same_hostile_profile_tables_and_reports_the_bad_rows(hostile_tables, caplog):
    root = hostile_tables["root"]
    limits = ReadLimits.of(DataConfig(**LIMITS))

    users = ProfileTable.load("user", str(root / "users.csv"), "auto", Storage(), limits)
    items = ProfileTable.load("item", str(root / "items"), "auto", Storage(), limits)

    assert users.resolve(GOOD_USER["user_id"], None)["segment"] == "学生"
    assert items.resolve(GOOD_ITEM["item_id"], None)["title"] == GOOD_ITEM["title"]
    assert len(users) == WORLD.num_users + 1  # the world's and the Chinese user; u_twice is rejected
    assert len(users.rejected) == len(hostile_tables["bad_users"])
    assert len(items.rejected) == len(hostile_tables["bad_items"])
    for side, table, bad in (("user", users, BAD_USERS), ("item", items, BAD_ITEMS)):
        _assert_each_reason_once([r for r in table.rejected if "appears 2" not in r["error"]
                                  and "tree: nested" not in r["error"]], bad)
        # A rejected id answers with its row's reason (a 422 from the API), not as unknown.
        with pytest.raises(InvalidProfileError, match="cannot be used") as rejected:
            table.resolve("u_twice" if side == "user" else "i_long", None)
        assert rejected.value.key == ("u_twice" if side == "user" else "i_long")
    assert "users table: 8 rows rejected" in caplog.text and "items table: 6 rows rejected" in caplog.text


def test_training_keeps_the_example_rows_the_reader_accepts_and_drops_the_others(caplog):
    """Training reads its examples (parquet) with the same cell-by-cell conversion and rules."""
    from aigc_dist.train.datasets import readable_examples

    copies = _string_array(["Pack light.", "Bad \udcff".encode("utf-8", "surrogateescape"), "好 😀", "x" * 5000])
    batch = pa.table({"user_id": ["u1", "u2", "u3", "u4"], "item_id": ["i1"] * 4, "copy": copies})

    kept = readable_examples(batch, ReadLimits.default())

    assert kept["user_id"].to_pylist() == ["u1", "u3"] and kept["copy"].to_pylist() == ["Pack light.", "好 😀"]
    assert "dropped 2 of 4 training rows" in caplog.text and "copy: invalid UTF-8" in caplog.text


def test_a_parquet_file_no_reader_can_open_fails_the_run_at_once_naming_it(tmp_path, kit, world_dir, lm_artifact):
    """Not a record to quarantine: a file that is not parquet at all stops the run before any work."""
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "a.parquet").write_bytes((Path(world_dir) / "items.parquet").read_bytes())
    (tmp_path / "items" / "b.parquet").write_bytes(b"PAR1 cut short by a failed upload")
    data = DataConfig(users=str(Path(world_dir) / "users.parquet"), items=str(tmp_path / "items"),
                      candidates=str(Path(world_dir) / "candidates.parquet"))

    with pytest.raises(InputError, match=rf"data\.items: {tmp_path}/items/b\.parquet cannot be read as parquet"):
        run_backfill(kit.config(str(tmp_path / "out"), lm_artifact, run_id="torn"), data, StorageConfig())
    assert not (tmp_path / "out" / "torn").exists()

