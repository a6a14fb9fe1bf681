"""storage.py against the local filesystem and the real S3 server over HTTP."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc_dist.config import StorageConfig
from aigc_dist.storage import AlreadyExistsError, Storage, StorageError, join_uri, parse_uri


@pytest.mark.parametrize(
    ("uri", "scheme", "path"),
    [
        ("s3://bucket/a/b/", "s3", "bucket/a/b"),
        ("s3://bucket", "s3", "bucket"),
        ("file:///tmp/x", "file", "/tmp/x"),
        ("/tmp/x/../y", "file", "/tmp/y"),
    ],
)
def test_parse_uri(uri, scheme, path):
    loc = parse_uri(uri)
    assert (loc.scheme, loc.path) == (scheme, path)


def test_parse_uri_rejects_what_it_cannot_serve():
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        parse_uri("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        parse_uri("s3:///key")
    with pytest.raises(StorageError, match="empty"):
        parse_uri("")


def test_join_uri_keeps_scheme():
    assert join_uri("s3://b/runs/", "r1", "/data/") == "s3://b/runs/r1/data"
    assert join_uri("./out", "x") == "./out/x"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """Every object test runs on a local directory and on a fresh bucket of the S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_bytes_json_list_exists_delete(root):
    storage = Storage()
    a, b = join_uri(root, "a.bin"), join_uri(root, "sub", "b.json")
    assert not storage.exists(a) and storage.list(root) == []
    storage.write_bytes(a, b"\x00\xffbytes")
    storage.write_json(b, {"rows": 3, "text": "为您推荐"})
    assert storage.read_bytes(a) == b"\x00\xffbytes"
    assert storage.read_json(b) == {"rows": 3, "text": "为您推荐"}
    assert storage.exists(a) and storage.exists(b)
    listed = storage.list(root)
    assert [parse_uri(u).path for u in listed] == sorted([parse_uri(a).path, parse_uri(b).path])
    storage.write_bytes(a, b"replaced")  # plain writes overwrite
    assert storage.read_bytes(a) == b"replaced"
    storage.delete(a)
    storage.delete(a)  # absent is fine
    assert not storage.exists(a)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)


def test_files_subdirectories_and_delete_tree(root):
    """What callers list and delete through, the same on a local directory and on S3 prefixes."""
    storage = Storage()
    assert storage.files(root) is None and storage.subdirectories(root) == []
    storage.delete_tree(root)  # absent is fine
    for name in ("checkpoint_000002/state.json", "checkpoint_000010/model/rank0.pt", "checkpoint_000010/state.json",
                 "notes.txt"):
        storage.write_bytes(join_uri(root, name), name.encode())
    assert storage.subdirectories(root) == ["checkpoint_000002", "checkpoint_000010"]
    found = storage.files(root)
    assert [parse_uri(i.path).path.split("/root/", 1)[1] for i in found] == [
        "checkpoint_000002/state.json", "checkpoint_000010/model/rank0.pt", "checkpoint_000010/state.json",
        "notes.txt"]
    assert [i.size for i in found] == [len(b"checkpoint_000002/state.json"), len(b"checkpoint_000010/model/rank0.pt"),
                                       len(b"checkpoint_000010/state.json"), len(b"notes.txt")]
    assert [i.base_name for i in storage.files(join_uri(root, "notes.txt"))] == ["notes.txt"]  # a file: itself
    storage.delete_tree(join_uri(root, "checkpoint_000010"))
    assert storage.subdirectories(root) == ["checkpoint_000002"] and storage.exists(join_uri(root, "notes.txt"))
    storage.delete_tree(root, keep_root=True)
    assert storage.list(root) == []
    storage.write_bytes(join_uri(root, "x/y.bin"), b"1")
    storage.delete_tree(root)
    assert storage.files(root) is None


def test_if_absent_write_admits_exactly_one_writer(root):
    """The primitive behind run locks: of many concurrent claimants, exactly one wins."""
    storage = Storage()
    lock = join_uri(root, "_lock")
    winners, losers = [], []

    def claim(i: int) -> None:
        try:
            storage.write_bytes(lock, f"owner-{i}".encode(), if_absent=True)
            winners.append(i)
        except AlreadyExistsError:
            losers.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7
    assert storage.read_bytes(lock) == f"owner-{winners[0]}".encode()


def test_local_write_leaves_no_partial_or_temp_files(tmp_path):
    storage = Storage()
    target = tmp_path / "out" / "manifest.json"
    storage.write_json(str(target), {"ok": True})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.json"]


def test_pyarrow_filesystem_reads_what_boto3_wrote(s3_bucket):
    storage = Storage()
    table = pa.table({"request_id": ["r1", "r2"], "content": ["hello", "你好"]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    uri = join_uri(s3_bucket, "t", "part-0.parquet")
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    fs, path = storage.filesystem(uri)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_endpoint_and_credentials_from_config_override_environment(s3_server, monkeypatch):
    """With the environment pointing nowhere, the storage config alone reaches the server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # a port nothing listens on
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    cfg = StorageConfig(
        endpoint_url=s3_server.endpoint_url,
        access_key_id="aigc-test-key",
        secret_access_key="aigc-test-secret",
        retries=0,
    )
    storage = Storage(cfg)
    storage.s3_client.create_bucket(Bucket="cfg-bucket")
    storage.write_bytes("s3://cfg-bucket/x", b"1")
    assert storage.read_bytes("s3://cfg-bucket/x") == b"1"
    assert storage.exists("s3://cfg-bucket/x")  # pyarrow path uses the same endpoint
    assert "aigc-test-secret" not in repr(storage)


def test_unreachable_endpoint_is_a_storage_error_not_a_hang(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage = Storage(StorageConfig(retries=0))
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://nowhere/x")
    assert "127.0.0.1:9" in str(err.value)


def test_local_paths_and_file_uris_are_the_same_place(tmp_path):
    storage = Storage()
    storage.write_bytes(str(tmp_path / "x.txt"), b"same")
    assert storage.read_bytes(f"file://{tmp_path}/x.txt") == b"same"
    assert Path(tmp_path / "x.txt").read_bytes() == b"same"
