"""Serve's profile tables: read by the backfill's reader, no row can fail a replica, bad rows are reported."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc_dist.serve.profiles import InvalidProfileError, ProfileTable, UnknownIdError, empty_table
from aigc_dist.storage import Storage

USERS_JSONL = b"\n".join([
    b'{"user_id": "u1", "segment": "student", "interests": ["hiking"]}',
    b'{"user_id": "u2", "segment": "parent"}',
    b'{"user_id": "u2", "segment": "retiree"}',  # repeated: which copy is right cannot be told
    b'{"user_id": "u3", "segment": "x\\ud800"}',  # a lone surrogate escape
    b'{"user_id": "u4", "k\xff": "v"}',  # invalid UTF-8 in a key
    b'{"user_id": "u5", "tree": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"not json",
    "{\"user_id\": \"用户\", \"segment\": \"学生 😀 סטודנט\"}".encode(),
]) + b"\n"


def test_hostile_users_never_fail_the_load_and_are_reported(tmp_path, caplog):
    (tmp_path / "users.jsonl").write_bytes(USERS_JSONL)
    caplog.set_level(logging.WARNING, logger="aigc_dist.serve.profiles")

    users = ProfileTable.load("user", str(tmp_path / "users.jsonl"), "auto", Storage())

    assert sorted(users.features) == ["u1", "用户"]
    assert users.resolve("用户", {"locale": "zh"}) == {"segment": "学生 😀 סטודנט", "locale": "zh"}
    assert users.resolve("u1", None) == {"segment": "student", "interests": ["hiking"]}
    reasons = {r["key"]: r["error"] for r in users.rejected if r["key"]}
    unparsed = [r["error"] for r in users.rejected if not r["key"]]  # no id can be read from these lines
    assert len(users.rejected) == 6  # both copies of u2, u3, u4, u5, and the line that is not JSON
    assert "appears 2 times" in reasons["u2"] and "segment: invalid UTF-8" in reasons["u3"]
    assert "field name 'k\\xff': invalid UTF-8" in reasons["u4"]
    assert "tree: nested more than 64 levels" in unparsed[0] and "not valid JSON" in unparsed[1]
    # A rejected row's id is refused with the row's reason (a 422 from the API); without a usable id
    # (u5: the nesting stopped the parse before its id was read) it is an unknown id.
    for rejected, reason in (("u2", "appears 2 times"), ("u3", "segment: invalid UTF-8")):
        with pytest.raises(InvalidProfileError,
                           match=f"user_id '{rejected}': its row in the users table cannot be used .*{reason}"):
            users.resolve(rejected, None)
    with pytest.raises(UnknownIdError, match="unknown user_id 'u5'"):
        users.resolve("u5", None)
    assert "users table: 6 rows rejected" in caplog.text and "appears 2 times" in caplog.text


def test_items_from_csv_and_parquet_follow_the_same_rule(tmp_path):
    (tmp_path / "items.csv").write_bytes(b"item_id,title\ni1,Tent\ni2,Lamp\ni2,Lamp again\ni3\n")
    titles = pa.array([b"Stove", b"Bad \xff"], pa.binary()).view(pa.string())  # bytes no UTF-8 check saw
    pq.write_table(pa.table({"item_id": ["i1", "i2"], "title": titles}), tmp_path / "items.parquet")

    from_csv = ProfileTable.load("item", str(tmp_path / "items.csv"), "auto", Storage())
    from_parquet = ProfileTable.load("item", str(tmp_path / "items.parquet"), "auto", Storage())

    assert from_csv.features == {"i1": {"title": "Tent"}}
    assert [json.loads(r["raw"])["item_id"] for r in from_csv.rejected if r["key"]] == ["i2", "i2"]
    assert [r["error"] for r in from_csv.rejected if not r["key"]] == [
        f"{tmp_path}/items.csv:5: 1 fields, the header has 2"]
    assert from_parquet.features == {"i1": {"title": "Stove"}}
    assert "title: invalid UTF-8" in from_parquet.rejected[0]["error"]


def test_no_table_means_features_come_from_the_request():
    users = empty_table("user")
    assert users.resolve(None, {"segment": "student"}) == {"segment": "student"}
    with pytest.raises(UnknownIdError, match="this server has no users table"):
        users.resolve("u1", None)
