"""The evaluate stage: quality fields for every generated copy, the optional filters, the run's summary.

Quality fields are written next to the copy (so they can be queried without re-scoring); a filter
that rejects a copy moves its row to errors/ with stage "filter" and the copy kept for inspection.
The rules (which item fields name the item, which user feature the copy must reflect) are the
user's, from `backfill.quality`; nothing here knows the demo's vocabulary.

Each shard's commit marker holds sums over its generated copy (`shard_quality`), which add up over
shards into the manifest's `quality` (`sum_quality`, `quality_report`). Distinct-n across users is
computed over the copies of one item within a shard: candidates are sharded by user, so an item's
copies for different users are spread over shards, and a shard holds rows_per_file of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aigc_dist.batch.run_state import CommitMarker
from aigc_dist.config import BackfillConfig, QualityConfig
from aigc_dist.evaluation.text import distinct_n, has_repetition, is_grounded, is_personalized


def text_quality(content: str, user: Mapping[str, Any], item: Mapping[str, Any],
                 rules: QualityConfig) -> dict[str, Any]:
    """grounded (names the item), personalized (reflects the user's feature; None without a rule),
    num_chars, repetitive."""
    return {
        "grounded": is_grounded(content, item, rules),
        "personalized": is_personalized(content, user, rules),
        "num_chars": len(content),
        "repetitive": has_repetition(content),
    }


def _length_reason(content: str, config: BackfillConfig) -> str | None:
    if len(content.strip()) < config.min_chars:
        return f"shorter than min_chars={config.min_chars} ({len(content.strip())} characters)"
    if config.max_chars is not None and len(content) > config.max_chars:
        return f"longer than max_chars={config.max_chars} ({len(content)} characters)"
    return None


def _banned_term(content: str, config: BackfillConfig) -> str | None:
    folded = content.casefold()
    return next((term for term in config.banned_terms if term and term.casefold() in folded), None)


def copy_checks(content: str, config: BackfillConfig) -> tuple[str | None, str | None]:
    """(why the copy breaks min_chars/max_chars, the first banned term it holds), each None when it does not:
    computed once per copy for the filters and for the shard's quality sums."""
    return _length_reason(content, config), _banned_term(content, config)


def filter_reason(quality: Mapping[str, Any], checks: tuple[str | None, str | None],
                  config: BackfillConfig) -> str | None:
    """Why the configured filters reject this copy (its `copy_checks` and quality fields), or None."""
    length, banned = checks
    if length is not None:
        return length
    if banned is not None:
        return f"contains banned term {banned!r}"
    if config.require_item_mention and not quality["grounded"]:
        return "does not mention the item (require_item_mention)"
    return None


def shard_quality(scored: Sequence[tuple[str, str, str, Mapping[str, Any], tuple[str | None, str | None]]],
                  config: BackfillConfig) -> dict:
    """Sums over one shard's generated copy, before the filters: (user_id, item_id, content, quality fields,
    copy_checks) per row. Counts of grounded / personalized / repetitive copy, copy within
    min_chars..max_chars, copy with a banned term; per item with copies for two users or more, distinct-n
    of those copies."""
    by_item: dict[str, list[str]] = defaultdict(list)
    users: dict[str, set[str]] = defaultdict(set)
    sums = {"scored": 0, "grounded": 0, "personalized": 0, "repetitive": 0, "length_ok": 0, "banned": 0,
            "item_groups": 0, "item_groups_distinct_sum": 0.0, "item_groups_same_copy": 0}
    for user_id, item_id, content, quality, (length, banned) in scored:
        sums["scored"] += 1
        sums["grounded"] += bool(quality["grounded"])
        sums["personalized"] += bool(quality["personalized"])
        sums["repetitive"] += bool(quality["repetitive"])
        sums["length_ok"] += length is None
        sums["banned"] += banned is not None
        by_item[item_id].append(content)
        users[item_id].add(user_id)
    for item_id, copies in by_item.items():
        if len(users[item_id]) >= 2:
            sums["item_groups"] += 1
            sums["item_groups_distinct_sum"] += distinct_n(copies, config.quality.distinct_n)
            sums["item_groups_same_copy"] += len(set(copies)) == 1
    return sums


def sum_quality(markers: Iterable[CommitMarker]) -> dict[str, Any]:
    """The shards' quality sums added up (markers of runs older than these sums hold none)."""
    total: dict[str, Any] = {}
    for marker in markers:
        for key, value in (marker.stats.quality or {}).items():
            total[key] = total.get(key, 0) + value
    return total


def quality_report(sums: Mapping[str, Any], config: BackfillConfig) -> dict[str, Any] | None:
    """The manifest's `quality`: rates over every generated copy (filtered ones included, since the
    filters are what they measure); None when no shard scored copy (an image run, or shards that predate
    these sums)."""
    if not sums:
        return None
    scored = sums["scored"]

    def rate(key: str) -> float | None:
        return sums[key] / scored if scored else None

    groups = sums["item_groups"]
    return {
        "scored": scored,
        "grounded_rate": rate("grounded"),
        "personalized_rate": rate("personalized") if config.quality.personalization_feature else None,
        "repetitive_rate": rate("repetitive"),
        "length_compliance_rate": rate("length_ok"),
        "banned_term_rate": rate("banned"),
        # item_groups: (shard, item) pairs with copies for two users or more
        "distinct_across_users": {
            "n": config.quality.distinct_n, "item_groups": groups,
            "mean": sums["item_groups_distinct_sum"] / groups if groups else None,
            "same_copy_for_all": sums["item_groups_same_copy"],
        },
        "rules": config.quality.model_dump(mode="json", include={"mention_fields", "personalization_feature"}),
    }
