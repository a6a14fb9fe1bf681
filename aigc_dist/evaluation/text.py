"""Text quality measures for generated recommendation copy.

Grounding (the copy names its item) and personalization (it reflects a feature of its user) follow
rules of the user's data (`QualityConfig`: which item fields are a mention, which user feature and
phrases count), never a built-in vocabulary; the demo's synthetic world supplies its own rules
(`aigc_dist.demo.world.world_quality`), under which its reference copy scores 1.0 on both.
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

from aigc_dist.config import QualityConfig

_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
# No rules of anyone's data: names are the item's title and category, personalization is not measured.
NO_RULES = QualityConfig()


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


def _strings(value: Any) -> list[str]:
    """A feature value as the strings it can be named by: a string, or the strings of a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


def _contains_any(folded: str, names: Sequence[str]) -> bool:
    # Empty names are skipped: "" is in every string.
    return any(n and n.casefold() in folded for n in names)


def is_grounded(text: str, item: Mapping[str, Any], rules: QualityConfig = NO_RULES) -> bool:
    """Whether `text` names the item: the value of one of `rules.mention_fields`, or an alias of that value
    (`rules.mention_aliases`), ignoring case."""
    names: list[str] = []
    for field in rules.mention_fields:
        values = _strings(item.get(field))
        aliases = rules.mention_aliases.get(field, {})
        names += values + [alias for v in values for alias in aliases.get(v, ())]
    return _contains_any(text.casefold(), names)


def grounding_rate(texts: Sequence[str], items: Sequence[Mapping[str, Any]],
                   rules: QualityConfig = NO_RULES) -> float:
    """Share of texts that name their item (see is_grounded)."""
    _check_aligned(texts, items, "item")
    return _rate([is_grounded(t, i, rules) for t, i in zip(texts, items, strict=True)])


def is_personalized(text: str, user: Mapping[str, Any], rules: QualityConfig = NO_RULES) -> bool | None:
    """Whether `text` reflects the user's `rules.personalization_feature`: a phrase listed for its value in the
    user's locale (or under "*"), or the value itself when `match_feature_value`; None without a rule.

    A user whose feature has no phrases (and whose value is not matched) counts as not personalized.
    """
    feature = rules.personalization_feature
    if feature is None:
        return None
    values = _strings(user.get(feature))
    by_locale = [rules.phrases.get(locale, {}) for locale in ("*", user.get(rules.locale_feature))
                 if isinstance(locale, str)]
    candidates = [p for table in by_locale for v in values for p in table.get(v, ())]
    if rules.match_feature_value:
        candidates += values
    return _contains_any(text.casefold(), candidates)


def personalization_rate(texts: Sequence[str], users: Sequence[Mapping[str, Any]],
                         rules: QualityConfig = NO_RULES) -> float | None:
    """Share of texts that reflect their user's personalization feature (see is_personalized); None without
    a rule."""
    _check_aligned(texts, users, "user")
    if rules.personalization_feature is None:
        return None
    return _rate([bool(is_personalized(t, u, rules)) for t, u in zip(texts, users, strict=True)])


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
                  items: Sequence[Mapping[str, Any]], rules: QualityConfig = NO_RULES) -> dict[str, float | None]:
    """All text measures for aligned texts, users and items, by the given rules of their data."""
    return {
        "grounding_rate": grounding_rate(texts, items, rules),
        "personalization_rate": personalization_rate(texts, users, rules),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition_rate": repetition_rate(texts),
        "empty_rate": _rate([not t.strip() for t in texts]),
        "mean_chars": sum(len(t) for t in texts) / len(texts) if texts else 0.0,
    }
