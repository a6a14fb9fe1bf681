"""Reading and validating backfill input rows (no Ray): every row becomes a work row, bad ones with a reason."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from aigc_dist.batch.inputs import RowRules, resolve_input, shard_of, stable_request_id, work_row
from aigc_dist.batch.reading import normalize_arrow, read_table_rows
from aigc_dist.batch.records import raw_json
from aigc_dist.storage import Storage

CANDIDATES = RowRules("candidates", num_shards=4, id_salt="t1")


def test_request_ids_and_shards_are_stable_and_spread():
    assert stable_request_id("u1", "i1", "t1") == stable_request_id("u1", "i1", "t1")
    assert stable_request_id("u1", "i1", "t1") != stable_request_id("u1", "i1", "t2")  # template is part of it
    assert len({shard_of(f"u{k}", 8) for k in range(200)}) == 8
    assert shard_of("u1", 8) == shard_of("u1", 8)


def test_candidates_shard_by_user_so_each_shard_joins_one_slice_of_users():
    users = RowRules("users", num_shards=4)
    for k in range(20):
        candidate = work_row({"user_id": f"u{k}", "item_id": "i1"}, CANDIDATES)
        assert candidate["shard"] == work_row({"user_id": f"u{k}", "segment": "x"}, users)["shard"]
        assert candidate["key"] == stable_request_id(f"u{k}", "i1", "t1") and candidate["error"] is None


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"user_id": None, "item_id": "i1"}, "missing user_id"),
        ({"user_id": 7, "item_id": "i1"}, "user_id must be text"),
        ({"user_id": "u1", "item_id": "i1", "rank": 1.5}, "rank must be an integer"),
        ({"user_id": "u1", "item_id": "i1", "rank": True}, "rank must be an integer"),
        ({"user_id": "u1", "item_id": "i1", "score": float("nan")}, "score must be a finite number"),
        ({"user_id": " u1", "item_id": "i1"}, "surrounding spaces"),
        ({"user_id": "u1", "item_id": "i" * 257}, "over the limit of 256"),
        ({"user_id": "u1", "item_id": "i1", "tags": ["ok", "x" * 5000]}, "tags[1]: 5000 characters"),
        ({"user_id": "u1", "item_id": "i1", "blob": b"\x00\x01"}, "blob: binary value"),
        ({"user_id": "u\udcff", "item_id": "i1"}, "invalid UTF-8"),
    ],
)
def test_bad_candidate_rows_keep_a_reason_and_their_raw_row(row, reason):
    work = work_row(row, CANDIDATES)
    assert reason in work["error"] and work["stage"] == "validate"
    assert isinstance(json.loads(work["raw"]), dict)
    assert 0 <= work["shard"] < 4


def test_requests_keep_their_own_request_id_or_get_one():
    rules = RowRules("requests", num_shards=2, id_salt="t1")
    assert work_row({"request_id": "r1", "title": "x"}, rules)["key"] == "r1"
    assert work_row({"user_id": "u1", "item_id": "i1"}, rules)["key"] == stable_request_id("u1", "i1", "t1")
    assert "missing user_id" in work_row({"title": "x"}, rules)["error"]


def _read(tmp_path, name: str, data: bytes, rules: RowRules = CANDIDATES) -> list[dict]:
    (tmp_path / name).write_bytes(data)
    table = resolve_input(rules.kind, str(tmp_path / name), "auto", Storage())
    return read_table_rows(table, rules, Storage()).to_pylist()


def test_jsonl_parsing_isolates_bad_lines(tmp_path):
    data = b'{"user_id": "u1", "item_id": "i1"}\n\nnot json\n[1]\n{"user_id": "u\xff", "item_id": "i2"}\r\n' \
           b'{"user_id": "u3", "item_id": "i3", "title": "a\xe2\x80\xa8b"}\n'
    rows = _read(tmp_path, "c.jsonl", data)
    assert [r["error"] is None for r in rows] == [True, False, False, False, True]
    assert "c.jsonl:3: not valid JSON" in rows[1]["error"] and "c.jsonl:4: not a JSON object" in rows[2]["error"]
    assert [r["stage"] for r in rows[1:4]] == ["read", "read", "validate"]
    assert json.loads(rows[4]["raw"])["title"] == "a\u2028b"  # U+2028 inside a string is not a line break
    assert "invalid UTF-8" in rows[3]["error"]
    assert "\\xff" in json.loads(rows[3]["raw"])["user_id"]
    assert "\\xff" in json.loads(raw_json({"user_id": "u\udcff"}))["user_id"]


def test_csv_parsing_reads_text_and_flags_ragged_rows(tmp_path):
    rows = _read(tmp_path, "c.csv", b"user_id,item_id,rank\nu1,i1,\nu2,i2,3,extra\n")
    assert rows[0]["error"] is None and json.loads(rows[0]["raw"]) == {"user_id": "u1", "item_id": "i1", "rank": None}
    assert "c.csv:3: 4 fields, the header has 3" in rows[1]["error"]


def test_parquet_batches_become_work_rows_with_a_part_column():
    batch = pa.table({"user_id": ["u1", None], "item_id": ["i1", "i2"]})
    out = normalize_arrow(batch, CANDIDATES, part="requests")
    assert out.column_names[-1] == "part" and out["part"].to_pylist() == ["requests", "requests"]
    assert out["error"].to_pylist()[0] is None and "missing user_id" in out["error"].to_pylist()[1]


def test_resolve_input_finds_files_and_format(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("b.jsonl", "a.jsonl", "_SUCCESS", ".hidden.jsonl"):
        (tmp_path / "in" / name).write_text("{}\n")
    table = resolve_input("candidates", str(tmp_path / "in"), "auto", Storage())
    assert table.format == "jsonl" and [f.rsplit("/", 1)[-1] for f, _ in table.files] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ValueError, match="nothing at"):
        resolve_input("users", str(tmp_path / "missing"), "auto", Storage())
    (tmp_path / "in" / "c.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        resolve_input("candidates", str(tmp_path / "in"), "auto", Storage())
