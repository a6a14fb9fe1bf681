"""The evaluate stage: quality fields for every generated copy, and the optional filters.

Quality fields are written next to the copy (so they can be queried without re-scoring); a filter
that rejects a copy moves its row to errors/ with stage "filter" and the copy kept for inspection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aigc_dist.config import BackfillConfig
from aigc_dist.evaluation.text import has_repetition, is_grounded, is_personalized


def text_quality(content: str, user: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
    """grounded (names the item), personalized (a phrase of the user's segment), num_chars, repetitive."""
    return {
        "grounded": is_grounded(content, item),
        "personalized": is_personalized(content, user),
        "num_chars": len(content),
        "repetitive": has_repetition(content),
    }


def filter_reason(content: str, quality: Mapping[str, Any], config: BackfillConfig) -> str | None:
    """Why the configured filters reject this copy, or None when it passes."""
    if len(content.strip()) < config.min_chars:
        return f"shorter than min_chars={config.min_chars} ({len(content.strip())} characters)"
    if config.max_chars is not None and len(content) > config.max_chars:
        return f"longer than max_chars={config.max_chars} ({len(content)} characters)"
    folded = content.casefold()
    banned = [term for term in config.banned_terms if term and term.casefold() in folded]
    if banned:
        return f"contains banned term {banned[0]!r}"
    if config.require_item_mention and not quality["grounded"]:
        return "does not mention the item (require_item_mention)"
    return None
