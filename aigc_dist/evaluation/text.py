"""Text quality measures for generated recommendation copy.

Grounding and personalization are checkable because the synthetic world ties copy to features: the
reference copy of every (user, item) mentions the item and a phrase of the user's segment, so both
rates are 1.0 on the reference corpus and near 0 on copy written for another item or segment.
Distinct-n and repetition catch the usual failure of small generators: the same few phrases, loops.

Tokens for n-grams: each CJK character (and CJK / full-width punctuation) is one token, since Chinese
has no spaces; any other run of non-space characters is one token. So "Top pick: 极光背包" is
["Top", "pick:", "极", "光", "背", "包"].
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from aigc_dist.data.synthetic import CATEGORY_NAMES, SEGMENT_PHRASES

_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def text_tokens(text: str) -> list[str]:
    """Split text into n-gram tokens: CJK characters one by one, other text on whitespace."""
    return _TOKEN.findall(text)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    tokens = text_tokens(text)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _check_aligned(texts: Sequence[str], rows: Sequence[Mapping[str, Any]], what: str) -> None:
    if len(texts) != len(rows):
        raise ValueError(f"need one {what} per text (got {len(texts)} texts and {len(rows)} {what}s)")


def _rate(hits: Sequence[bool]) -> float:
    # An empty batch scores 0.0 rather than NaN: metrics are exported and compared, NaN breaks both.
    return sum(hits) / len(hits) if hits else 0.0


def is_grounded(text: str, item: Mapping[str, Any],
                category_names: Mapping[str, Mapping[str, str]] = CATEGORY_NAMES) -> bool:
    """Whether `text` mentions the item's title or its category (key or any localized name), ignoring case."""
    folded = text.casefold()
    category = item.get("category")
    names = [item.get("title"), category, *(table.get(category) for table in category_names.values())]
    # Empty names are skipped: "" is in every string.
    return any(isinstance(n, str) and n and n.casefold() in folded for n in names)


def grounding_rate(texts: Sequence[str], items: Sequence[Mapping[str, Any]],
                   category_names: Mapping[str, Mapping[str, str]] = CATEGORY_NAMES) -> float:
    """Share of texts that mention their item's title or category (see is_grounded)."""
    _check_aligned(texts, items, "item")
    return _rate([is_grounded(t, i, category_names) for t, i in zip(texts, items, strict=True)])


def is_personalized(text: str, user: Mapping[str, Any],
                    phrases: Mapping[str, Mapping[str, Sequence[str]]] = SEGMENT_PHRASES) -> bool:
    """Whether `text` has a phrase of the user's segment in the user's locale (ignoring case).

    A user whose locale or segment has no phrases counts as not personalized.
    """
    folded = text.casefold()
    candidates = phrases.get(user.get("locale"), {}).get(user.get("segment"), ())
    return any(p and p.casefold() in folded for p in candidates)


def personalization_rate(texts: Sequence[str], users: Sequence[Mapping[str, Any]],
                         phrases: Mapping[str, Mapping[str, Sequence[str]]] = SEGMENT_PHRASES) -> float:
    """Share of texts carrying a phrase tied to their user's segment, in the user's locale."""
    _check_aligned(texts, users, "user")
    return _rate([is_personalized(t, u, phrases) for t, u in zip(texts, users, strict=True)])


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the corpus (n-grams do not cross texts); 0.0 if none."""
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1 (got {n})")
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_repetition(text: str, n: int = 4) -> bool:
    """Whether some n-gram occurs twice in `text` (a generator stuck in a loop)."""
    grams = _ngrams(text, n)
    return len(set(grams)) < len(grams)


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Share of texts with a repeated n-gram (4-grams by default; CJK characters count as tokens)."""
    if n < 1:
        raise ValueError(f"repetition_rate needs n >= 1 (got {n})")
    return _rate([has_repetition(t, n) for t in texts])


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf where exp overflows."""
    if math.isnan(loss) or loss < 0:
        raise ValueError(f"loss must be a non-negative mean cross-entropy (got {loss})")
    return math.exp(loss) if loss < 700 else math.inf


def evaluate_text(texts: Sequence[str], users: Sequence[Mapping[str, Any]],
                  items: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """All text measures for aligned texts, users and items, against the synthetic world's tables."""
    return {
        "grounding_rate": grounding_rate(texts, items),
        "personalization_rate": personalization_rate(texts, users),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition_rate": repetition_rate(texts),
        "empty_rate": _rate([not t.strip() for t in texts]),
        "mean_chars": sum(len(t) for t in texts) / len(texts) if texts else 0.0,
    }
