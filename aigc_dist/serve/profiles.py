"""Users and items tables held in memory by each replica, so callers may send ids only.

The tables are the backfill's inputs (`data.users`, `data.items`: parquet, jsonl or csv, local or
S3), read once when a replica starts. A row whose id is missing or repeated is skipped with a count
in the log rather than failing the replica: the online path serves what it can, the backfill is
where bad rows get quarantined with their reasons.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.parquet as pq

from aigc_dist.batch.inputs import InputTable, parse_text_file, resolve_input
from aigc_dist.storage import Storage

log = logging.getLogger(__name__)


class UnknownIdError(KeyError):
    """An id the profile table does not hold (the API answers 404 naming it)."""

    def __init__(self, side: str, key: str, table_size: int):
        hint = "" if table_size else f" (this server has no {side}s table: send {side} features instead)"
        super().__init__(f"unknown {side}_id {key!r}{hint}")
        self.side = side
        self.key = key

    def __str__(self) -> str:
        return self.args[0]


def _rows(table: InputTable, storage: Storage) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for uri, _ in table.files:
        fs, path = storage.filesystem(uri)
        if table.format == "parquet":
            rows += pq.read_table(path, filesystem=fs).to_pylist()
        else:
            rows += [row for row, error in parse_text_file(storage.read_bytes(uri), table.format, uri) if not error]
    return rows


class ProfileTable:
    """id -> features of one side (users or items)."""

    def __init__(self, side: str, rows: list[dict[str, Any]]):
        self.side = side
        self.features: dict[str, dict[str, Any]] = {}
        skipped = 0
        key = f"{side}_id"
        for row in rows:
            identifier = row.get(key)
            if not isinstance(identifier, str) or not identifier or identifier in self.features:
                skipped += 1
                continue
            self.features[identifier] = {k: v for k, v in row.items() if k != key}
        if skipped:
            log.warning("%ss table: skipped %d rows with a missing, non-text or repeated %s", side, skipped, key)

    @classmethod
    def load(cls, side: str, uri: str, fmt: str, storage: Storage) -> ProfileTable:
        return cls(side, _rows(resolve_input(f"{side}s", uri, fmt, storage), storage))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.features)

    def resolve(self, identifier: str | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """The features of `identifier` updated with the caller's own; features alone need no table."""
        if identifier is None:
            return dict(overrides or {})
        try:
            base = self.features[identifier]
        except KeyError:
            raise UnknownIdError(self.side, identifier, len(self.features)) from None
        return {**base, **(overrides or {})}


def empty_table(side: str) -> ProfileTable:
    return ProfileTable(side, [])
