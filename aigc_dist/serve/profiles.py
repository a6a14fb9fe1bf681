"""Users and items tables held in memory by each replica, so callers may send ids only.

The tables are the backfill's inputs (`data.users`, `data.items`: parquet, jsonl or csv, local or
S3), read once when a replica starts with the backfill's own reader (aigc_dist.batch.reading) and
its one rule for bad and repeated ids. Whatever the bytes of a row, it never fails the replica:
a rejected row is counted and reported in the log with its reason (the first few of them), and its
id, if it has one, answers 422 with that reason (`InvalidProfileError`) before any work is queued,
so a value no prompt can hold (an unpaired surrogate, invalid UTF-8) fails its own call only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aigc_dist.batch.reading import load_profiles
from aigc_dist.batch.records import ReadLimits
from aigc_dist.storage import Storage

log = logging.getLogger(__name__)
REPORTED_ROWS = 10  # rejected rows named one by one in the log; the rest are counted


class UnknownIdError(KeyError):
    """An id the profile table does not hold (the API answers 404 naming it)."""

    def __init__(self, side: str, key: str, table_size: int):
        hint = "" if table_size else f" (this server has no {side}s table: send {side} features instead)"
        super().__init__(f"unknown {side}_id {key!r}{hint}")
        self.side = side
        self.key = key

    def __str__(self) -> str:
        return self.args[0]


class InvalidProfileError(ValueError):
    """An id whose row the table rejected when it was read (the API answers 422 with the reason)."""

    def __init__(self, side: str, key: str, reason: str):
        super().__init__(f"{side}_id {key!r}: its row in the {side}s table cannot be used ({reason})")
        self.side = side
        self.key = key


class ProfileTable:
    """id -> features of one side (users or items), and the rows that were rejected."""

    def __init__(self, side: str, features: dict[str, dict[str, Any]], rejected: list[dict[str, Any]] | None = None):
        key = f"{side}_id"
        self.side = side
        self.features = {identifier: {k: v for k, v in row.items() if k != key} for identifier, row in features.items()}
        self.rejected = rejected or []  # work rows: key (the id, when usable), raw, error
        self.invalid = {row["key"]: row["error"] for row in self.rejected if row["key"]}  # id -> why
        if self.rejected:
            shown = "; ".join(f"{json.dumps(r['key']) if r['key'] else 'no usable id'}: {r['error']}"
                              for r in self.rejected[:REPORTED_ROWS])
            more = f" (and {len(self.rejected) - REPORTED_ROWS} more)" if len(self.rejected) > REPORTED_ROWS else ""
            log.warning("%ss table: %d rows rejected, requests for their ids get 422: %s%s", side, len(self.rejected),
                        shown, more)

    @classmethod
    def load(cls, side: str, uri: str, fmt: str, storage: Storage, limits: ReadLimits | None = None) -> ProfileTable:
        """Read a users (`side="user"`) or items table; `limits` are the data section's (`ReadLimits.of`)."""
        index = load_profiles(side, uri, fmt, storage, limits or ReadLimits.default())
        return cls(side, index.features(), index.rejected())

    def __len__(self) -> int:
        return len(self.features)

    def resolve(self, identifier: str | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """The features of `identifier` updated with the caller's own; features alone need no table."""
        if identifier is None:
            return dict(overrides or {})
        try:
            base = self.features[identifier]
        except KeyError:
            if identifier in self.invalid:
                raise InvalidProfileError(self.side, identifier, self.invalid[identifier]) from None
            raise UnknownIdError(self.side, identifier, len(self.features)) from None
        return {**base, **(overrides or {})}


def empty_table(side: str) -> ProfileTable:
    return ProfileTable(side, {})
