"""The one place where URIs become filesystems and S3 clients.

Accepted locations: a local path (`./out`, `/data/x`), `file:///data/x`, `s3://bucket/prefix`.
S3 endpoint, region and credentials come from `StorageConfig` or, when unset there, from the
standard AWS environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...),
so the same code talks to AWS, to MinIO or to a test server on 127.0.0.1. Secrets live only in
the filesystem/client objects: `repr(Storage)` and log lines never show them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions
import pyarrow.fs as pafs

from aigc_dist.config import StorageConfig


class StorageError(OSError):
    """A location that cannot be parsed or an object that cannot be read or written."""


class ConditionFailedError(StorageError):
    """A conditional write found the object other than the condition asked (there, absent, or changed)."""


class AlreadyExistsError(ConditionFailedError):
    """`write_bytes(..., if_absent=True)` found the object already there."""


# S3 answers 409 ConditionalRequestConflict when another conditional write of the same key is in
# flight; AWS says to retry it. It is not an answer to the condition, so it must not read as one.
_CONFLICT_CODES = ("ConditionalRequestConflict", "409")
_PRECONDITION_CODES = ("PreconditionFailed", "412")
_HASH_CHUNK_BYTES = 1 << 20


def content_token(data: bytes) -> str:
    """The version token of a local object: what `if_match` compares (S3 uses its ETag)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on a directory: makes a local compare-and-swap atomic between processes.

    The directory itself is locked, not a side file, so nothing is left behind to clean up (and a
    side file deleted while locked would let two processes hold "the" lock on different inodes).
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@dataclass(frozen=True)
class Location:
    """A parsed URI. `path` is what pyarrow wants: an absolute local path or `bucket/key`."""

    scheme: str  # "file" or "s3"
    path: str

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.scheme == "s3" else ""

    @property
    def key(self) -> str:
        return self.path.split("/", 1)[1] if self.scheme == "s3" and "/" in self.path else ""

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path


def parse_uri(uri: str | os.PathLike[str]) -> Location:
    """Parse a local path, `file://` or `s3://` URI; anything else is a `StorageError`."""
    text = os.fspath(uri)
    if not text:
        raise StorageError("empty storage location")
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{text!r}: an s3:// URI needs a bucket, like s3://bucket/prefix")
        return Location("s3", (parsed.netloc + "/" + parsed.path.lstrip("/")).rstrip("/"))
    if parsed.scheme == "file":
        return Location("file", str(Path(parsed.path).resolve()))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise StorageError(f"{text!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")
    return Location("file", str(Path(text).expanduser().resolve()))


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a location, keeping its scheme: join_uri("s3://b/x", "y") -> "s3://b/x/y"."""
    tail = "/".join(p.strip("/") for p in parts if p)
    if not tail:
        return base
    return base.rstrip("/") + "/" + tail


class Storage:
    """Reads and writes bytes, JSON and listings at any supported location.

    One instance caches one S3 filesystem and one boto3 client; create it once per process
    (or per actor) and pass it around rather than re-resolving credentials per call.
    """

    def __init__(self, config: StorageConfig | None = None):
        self.config = config or StorageConfig()

    def __repr__(self) -> str:
        return f"Storage(endpoint={self._endpoint_url!r}, region={self._region!r})"

    # -- resolution -------------------------------------------------------------------------
    @property
    def _endpoint_url(self) -> str | None:
        return self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )

    @property
    def _region(self) -> str:
        return (
            self.config.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )

    def _credentials(self) -> dict[str, str]:
        """Explicit credentials from the config, else the environment; empty = default chain."""

        def pick(field: Any, env: str) -> str | None:
            return field.get_secret_value() if field is not None else os.environ.get(env)

        creds = {
            "access_key": pick(self.config.access_key_id, "AWS_ACCESS_KEY_ID"),
            "secret_key": pick(self.config.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
            "session_token": pick(self.config.session_token, "AWS_SESSION_TOKEN"),
        }
        return {k: v for k, v in creds.items() if v}

    @cached_property
    def s3_filesystem(self) -> pafs.S3FileSystem:
        """pyarrow's S3 filesystem with our endpoint, region, credentials and retry budget."""
        kwargs: dict[str, Any] = {
            "region": self._region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.config.retries + 1),
            **self._credentials(),
        }
        if self._endpoint_url:
            endpoint = urlparse(self._endpoint_url)
            kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
            kwargs["scheme"] = endpoint.scheme or "https"
        return pafs.S3FileSystem(**kwargs)

    @cached_property
    def s3_client(self) -> Any:
        """A boto3 S3 client configured like `s3_filesystem` (path-style for custom endpoints)."""
        creds = self._credentials()
        return boto3.client(
            "s3",
            endpoint_url=self._endpoint_url,
            region_name=self._region,
            aws_access_key_id=creds.get("access_key"),
            aws_secret_access_key=creds.get("secret_key"),
            aws_session_token=creds.get("session_token"),
            config=botocore.config.Config(
                retries={"max_attempts": self.config.retries + 1, "mode": "standard"},
                s3={"addressing_style": "path" if self._endpoint_url else "auto"},
            ),
        )

    def filesystem(self, uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and in-filesystem path for `uri` (for Ray Data and pyarrow I/O)."""
        loc = parse_uri(uri)
        if loc.scheme == "s3":
            return self.s3_filesystem, loc.path
        return pafs.LocalFileSystem(), loc.path

    # -- objects ----------------------------------------------------------------------------
    def _s3_read(self, loc: Location, call: Any) -> Any:
        """`call()` against S3 with its errors as ours: `FileNotFoundError` for an absent key."""
        try:
            return call()
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(loc.uri) from None
            raise StorageError(f"reading {loc.uri}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:  # unreachable endpoint, bad credentials
            raise StorageError(f"reading {loc.uri}: {exc}") from exc

    def read_bytes(self, uri: str) -> bytes:
        """The whole object; `FileNotFoundError` when it is absent."""
        loc = parse_uri(uri)
        if loc.scheme == "s3":
            return self.read_versioned(uri)[0]
        return Path(loc.path).read_bytes()

    def read_versioned(self, uri: str) -> tuple[bytes, str]:
        """The whole object and its version token (the S3 ETag; a content hash locally), for `if_match`."""
        loc = parse_uri(uri)
        if loc.scheme == "s3":
            def get() -> tuple[bytes, str]:
                response = self.s3_client.get_object(Bucket=loc.bucket, Key=loc.key)
                return response["Body"].read(), response["ETag"]

            return self._s3_read(loc, get)
        data = Path(loc.path).read_bytes()
        return data, content_token(data)

    def content_identity(self, uri: str) -> str:
        """What identifies an object's content, not just its size: the S3 ETag (and VersionId on a
        versioned bucket), or the sha256 of a local file, read in 1 MiB pieces so any size fits in memory."""
        loc = parse_uri(uri)
        if loc.scheme == "s3":
            head = self._s3_read(loc, lambda: self.s3_client.head_object(Bucket=loc.bucket, Key=loc.key))
            version = head.get("VersionId")
            return f"etag:{head['ETag'].strip(chr(34))}" + (f" version:{version}" if version else "")
        digest = hashlib.sha256()
        with open(loc.path, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        return "sha256:" + digest.hexdigest()

    def write_bytes(self, uri: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Write an object so that readers see either nothing or all of it; returns its version token.

        S3 PUTs are atomic by nature; locally the bytes go to a temporary file in the same
        directory, are fsynced, then renamed into place. With `if_absent=True` the write fails
        with `AlreadyExistsError` when the object exists (S3 `If-None-Match: *`, a hard link
        locally), which makes it usable as a lock or a commit marker. With `if_match=TOKEN` (from
        `read_versioned` or an earlier write) it fails with `ConditionFailedError` unless the object
        is still that version (S3 `If-Match`; locally a compare and rename under a flock of the
        directory): of several writers holding one token, exactly one wins.
        """
        if if_absent and if_match is not None:
            raise ValueError("if_absent and if_match exclude each other")
        loc = parse_uri(uri)
        if loc.scheme == "s3":
            return self._put_s3(loc, data, if_absent, if_match)
        target = Path(loc.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if if_absent:
                try:
                    os.link(tmp, target)  # fails atomically if target exists, unlike rename
                except FileExistsError:
                    raise AlreadyExistsError(f"{loc.uri} already exists") from None
            elif if_match is not None:
                with _directory_lock(target.parent):
                    try:
                        current = content_token(target.read_bytes())
                    except FileNotFoundError:
                        raise ConditionFailedError(f"{loc.uri} is gone (expected version {if_match})") from None
                    if current != if_match:
                        raise ConditionFailedError(f"{loc.uri} changed (expected version {if_match})")
                    os.replace(tmp, target)
            else:
                os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return content_token(data)

    def _put_s3(self, loc: Location, data: bytes, if_absent: bool, if_match: str | None) -> str:
        extra = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match} if if_match is not None else {}
        for attempt in range(self.config.retries + 1):
            try:
                return self.s3_client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **extra)["ETag"]
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in _CONFLICT_CODES and attempt < self.config.retries:
                    time.sleep(min(0.05 * 2**attempt, 2.0))  # the other write settles within milliseconds
                    continue
                if code in _PRECONDITION_CODES:
                    raise (AlreadyExistsError(f"{loc.uri} already exists") if if_absent else
                           ConditionFailedError(f"{loc.uri} changed (expected version {if_match})")) from None
                if if_match is not None and code in ("NoSuchKey", "404"):
                    raise ConditionFailedError(f"{loc.uri} is gone (expected version {if_match})") from None
                raise StorageError(f"writing {loc.uri}: {exc}") from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise StorageError(f"writing {loc.uri}: {exc}") from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def write_json(self, uri: str, value: Any, *, if_absent: bool = False, if_match: str | None = None) -> str:
        data = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        return self.write_bytes(uri, data, if_absent=if_absent, if_match=if_match)

    def exists(self, uri: str) -> bool:
        """True when an object (or, locally, a file or directory) is at `uri`."""
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def list(self, prefix: str) -> list[str]:
        """URIs of every file under `prefix` (recursive, sorted); empty when there is none."""
        fs, path = self.filesystem(prefix)
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        files = [info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]
        scheme = "s3://" if isinstance(fs, pafs.S3FileSystem) else ""
        return sorted(scheme + f for f in files)

    def files(self, uri: str) -> list[pafs.FileInfo] | None:
        """What is at `uri` as files: [the file] for a file, every file under a directory (recursive, sorted
        by path), None when nothing is there (an empty directory is [])."""
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [info]
        if info.type != pafs.FileType.Directory:
            return None
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted((i for i in found if i.type == pafs.FileType.File), key=lambda i: i.path)

    def subdirectories(self, uri: str) -> list[str]:
        """Names of the directories (S3: common prefixes) right under `uri`, sorted; [] when there is none."""
        fs, path = self.filesystem(uri)
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in found if i.type == pafs.FileType.Directory)

    def delete_tree(self, uri: str, *, keep_root: bool = False) -> None:
        """Remove everything under `uri` (and the directory itself unless keep_root); absent is not an error."""
        fs, path = self.filesystem(uri)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return
        if keep_root:
            fs.delete_dir_contents(path, missing_dir_ok=True)
        else:
            fs.delete_dir(path)

    def delete(self, uri: str) -> None:
        """Remove one object; absent objects are not an error."""
        fs, path = self.filesystem(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass
