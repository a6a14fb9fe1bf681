"""Text measures: perfect on the reference corpus (by the world's rules), ~0 on mismatched or random text,
exact on hand cases; grounding and personalization follow the rules given, none built in."""

from __future__ import annotations

import math
import random

import pytest

from aigc_dist.config import QualityConfig
from aigc_dist.demo.world import WorldConfig, make_world, world_quality
from aigc_dist.evaluation.text import (
    distinct_n,
    evaluate_text,
    grounding_rate,
    perplexity,
    personalization_rate,
    repetition_rate,
    text_tokens,
)

WORLD = world_quality()


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[dict], list[dict]]:
    world = make_world(WorldConfig(num_users=300, num_items=120, candidates_per_user=5, seed=11))
    records = world.training_records()
    return [c for _, _, c in records], [u for u, _, _ in records], [i for _, i, _ in records]


def test_reference_corpus_is_fully_grounded_and_personalized(corpus) -> None:
    texts, users, items = corpus
    scores = evaluate_text(texts, users, items, WORLD)
    assert scores["grounding_rate"] == 1.0 and scores["personalization_rate"] == 1.0
    assert scores["repetition_rate"] == 0.0 and scores["empty_rate"] == 0.0
    assert 0.0 < scores["distinct_1"] < scores["distinct_2"] < 1.0


def _shuffled(texts: list[str], rows: list[dict], eligible) -> list[str]:
    """For each row, the text of a random other row for which eligible(row, other) holds (fixed seed)."""
    rng = random.Random(0)
    out = []
    for row in rows:
        while not eligible(row, rows[j := rng.randrange(len(rows))]):
            pass
        out.append(texts[j])
    return out


def test_copy_written_for_another_segment_is_not_personalized(corpus) -> None:
    texts, users, _ = corpus
    # Same locale, other segment: only the segment phrase can tell them apart.
    shuffled = _shuffled(texts, users,
                         lambda u, v: u["locale"] == v["locale"] and u["segment"] != v["segment"])
    assert personalization_rate(shuffled, users, WORLD) < 0.02


def test_copy_written_for_another_category_is_not_grounded(corpus) -> None:
    texts, _, items = corpus
    assert grounding_rate(_shuffled(texts, items, lambda i, j: i["category"] != j["category"]), items, WORLD) < 0.02


def test_random_strings_score_zero(corpus) -> None:
    _, users, items = corpus
    rng = random.Random(1)
    alphabet = "abcdefghij klmnop 你好世界背包 "
    noise = ["".join(rng.choice(alphabet) for _ in range(60)) for _ in users]
    assert grounding_rate(noise, items, WORLD) == 0.0 and personalization_rate(noise, users, WORLD) == 0.0


def test_matching_ignores_case_and_accepts_chinese_category_names() -> None:
    item = {"title": "Aurora Trail Backpack", "category": "outdoor"}
    texts = ["THE AURORA TRAIL BACKPACK!", "户外精选", "Outdoor gear", "a backpack"]
    assert grounding_rate(texts, [item] * 4, WORLD) == 0.75
    user = {"segment": "student", "locale": "en"}
    assert personalization_rate(["Perfect For Campus Life.", "perfect for the office"], [user] * 2, WORLD) == 0.5
    assert personalization_rate(["perfect for campus life"], [{"segment": "student", "locale": "fr"}], WORLD) == 0.0
    assert grounding_rate(["anything"], [{"title": "", "category": None}], WORLD) == 0.0


def test_without_rules_nothing_of_the_demo_world_counts() -> None:
    """The default rules know no vocabulary: the item's own title and category name it, a Chinese category
    name is not a mention, and personalization is not measured (None, not a false 0)."""
    item = {"title": "Aurora Trail Backpack", "category": "outdoor"}
    texts = ["THE AURORA TRAIL BACKPACK!", "户外精选", "Outdoor gear"]
    assert grounding_rate(texts, [item] * 3) == pytest.approx(2 / 3)
    user = {"segment": "student", "locale": "en"}
    assert personalization_rate(["perfect for campus life"], [user]) is None
    assert evaluate_text(["perfect for campus life"], [user], [item])["personalization_rate"] is None


def test_rules_of_a_users_own_catalog() -> None:
    """A catalog the demo does not know: the brand names the item, the user's interest (its own value, or a
    phrase listed for it in the user's locale or under "*") personalizes the copy."""
    rules = QualityConfig(mention_fields=["brand", "tags"], mention_aliases={"brand": {"Nordlys": ["北极光"]}},
                          personalization_feature="interest",
                          phrases={"*": {"climbing": ["on the wall"]}, "de": {"climbing": ["am Fels"]}})
    item = {"title": "X-200", "brand": "Nordlys", "tags": ["rope", "harness"], "category": "outdoor"}
    assert grounding_rate(["Nordlys rope", "北极光 新品", "a new HARNESS", "X-200 outdoor"], [item] * 4,
                          rules) == 0.75  # title and category are not mention fields here
    climber = {"interest": "climbing", "locale": "de"}
    texts = ["for climbing days", "stark am Fels", "great on the wall", "for runners"]
    assert personalization_rate(texts, [climber] * 4, rules) == 0.75
    # another locale does not get the German phrase; without match_feature_value the bare value does not count
    english = {"interest": "climbing", "locale": "en"}
    assert personalization_rate(["stark am Fels"], [english], rules) == 0.0
    strict = rules.model_copy(update={"match_feature_value": False})
    assert personalization_rate(["for climbing days", "great on the wall"], [climber] * 2, strict) == 0.5
    assert personalization_rate(["anything"], [{"locale": "de"}], rules) == 0.0  # the user lacks the feature


def test_bad_quality_rules_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="personalization_feature"):
        QualityConfig(phrases={"en": {"student": ["campus life"]}})
    with pytest.raises(ValueError, match="phrases"):
        QualityConfig(personalization_feature="segment", phrases={"en": {"student": [""]}})
    with pytest.raises(ValueError, match="mention_fields"):
        QualityConfig(mention_fields=["item title"])


def test_distinct_n_on_hand_made_examples() -> None:
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # ab bc ab bd
    assert distinct_n(["你好你好"], 1) == pytest.approx(2 / 4)  # Chinese counts characters
    assert distinct_n(["one"], 2) == 0.0 and distinct_n([], 1) == 0.0
    tokens = ["Top", "pick:", "极", "光", "背", "包", "，", "好", "！"]
    assert text_tokens("Top pick: 极光背包，好！") == tokens
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(["a"], 0)


def test_repetition_rate_flags_loops() -> None:
    looping = "the cat sat on the mat and the cat sat on it"
    assert repetition_rate([looping]) == 1.0
    assert repetition_rate(["the cat sat on the mat", looping, "好吃好吃好吃", "好吃的背包"]) == 0.5
    assert repetition_rate([looping], n=5) == 0.0 and repetition_rate([]) == 0.0


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="loss"):
        perplexity(-0.1)


def test_misaligned_inputs_are_rejected(corpus) -> None:
    texts, users, items = corpus
    with pytest.raises(ValueError, match="one item per text"):
        grounding_rate(texts, items[:-1], WORLD)
    with pytest.raises(ValueError, match="one user per text"):
        evaluate_text(texts[:-1], users, items[:-1])
