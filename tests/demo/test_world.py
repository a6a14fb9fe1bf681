"""The synthetic recommendation world: deterministic, well-formed, biased, with checkable reference copy."""

from __future__ import annotations

import collections
import dataclasses
import re

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from aigc_dist.demo.world import (
    CATEGORY_NAMES,
    INTEREST_CATEGORY,
    SEGMENT_PHRASES,
    World,
    WorldConfig,
    copy_for,
    make_world,
    read_world,
    write_world,
)

SMALL = WorldConfig(num_users=400, num_items=150, candidates_per_user=8, seed=7)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(SMALL)


@pytest.fixture(scope="module")
def records(world: World) -> list[tuple[dict, dict, str]]:
    return world.training_records()


def test_same_config_gives_identical_tables_and_files(world: World, tmp_path) -> None:
    again = make_world(WorldConfig(**vars(SMALL)))
    for name in ("users", "items", "candidates"):
        assert getattr(again, name).equals(getattr(world, name), check_metadata=True), name
    assert again.training_examples().equals(world.training_examples())
    write_world(world, tmp_path / "a")
    write_world(again, tmp_path / "b")
    for name in ("users", "items", "candidates", "copy"):
        file = f"{name}.parquet"
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_another_seed_gives_another_world(world: World) -> None:
    other = make_world(dataclasses.replace(SMALL, seed=8))
    for name in ("users", "items", "candidates"):
        assert not getattr(other, name).equals(getattr(world, name)), name
    assert other.training_examples()["copy"] != world.training_examples()["copy"]


def test_sizes_and_unique_well_formed_ids(world: World) -> None:
    users, items = world.users.to_pylist(), world.items.to_pylist()
    assert len(users) == 400 and len(items) == 150 and world.candidates.num_rows == 400 * 8
    assert len({u["user_id"] for u in users}) == 400 and len({i["item_id"] for i in items}) == 150
    assert all(re.fullmatch(r"u\d{6}", u["user_id"]) for u in users)
    assert all(re.fullmatch(r"i\d{5}", i["item_id"]) for i in items)
    assert all(u["locale"] in ("en", "zh") and 1 <= len(u["interests"]) <= 3 for u in users)
    assert all(0.0 <= u["price_sensitivity"] <= 1.0 for u in users)
    assert all(i["price"] > 0 and 2 <= len(i["attributes"]) <= 3 and i["category"] in CATEGORY_NAMES["en"]
               for i in items)
    # Ids widen past the default width instead of wrapping or colliding.
    wide = make_world(WorldConfig(num_users=1, num_items=100_001, candidates_per_user=1)).items["item_id"]
    assert wide[0].as_py() == "i000000" and wide[-1].as_py() == "i100000"


def test_candidates_are_k_distinct_existing_items_per_user_ranked_by_score(world: World) -> None:
    user_ids = set(world.users["user_id"].to_pylist())
    item_ids = set(world.items["item_id"].to_pylist())
    per_user = collections.defaultdict(list)
    for row in world.candidates.to_pylist():
        assert row["user_id"] in user_ids and row["item_id"] in item_ids
        per_user[row["user_id"]].append(row)
    assert set(per_user) == user_ids
    for rows in per_user.values():
        assert [r["rank"] for r in rows] == list(range(1, 9))
        assert len({r["item_id"] for r in rows}) == 8
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True) and all(0.0 < s < 1.0 for s in scores)


def _interest_match_share(w: World) -> float:
    users = {u["user_id"]: u for u in w.users.to_pylist()}
    items = {i["item_id"]: i for i in w.items.to_pylist()}
    liked = {u: {INTEREST_CATEGORY[t] for t in user["interests"]} for u, user in users.items()}
    hits = [items[r["item_id"]]["category"] in liked[r["user_id"]] for r in w.candidates.to_pylist()]
    return sum(hits) / len(hits)


def test_candidates_prefer_the_users_interests(world: World) -> None:
    unbiased = make_world(dataclasses.replace(SMALL, interest_boost=0.0))
    assert _interest_match_share(world) > _interest_match_share(unbiased) + 0.2


def test_locale_shares_follow_the_config() -> None:
    users = make_world(WorldConfig(num_users=5000, num_items=20, candidates_per_user=1)).users
    zh = users["locale"].to_pylist().count("zh") / 5000
    assert 0.27 < zh < 0.33
    only_en = make_world(WorldConfig(num_users=200, num_items=20, languages=("en",), language_shares=(1.0,)))
    assert set(only_en.users["locale"].to_pylist()) == {"en"}


def test_every_reference_copy_mentions_the_item_and_the_segment_phrase(records) -> None:
    for user, item, copy in records:
        names = (item["title"], CATEGORY_NAMES[user["locale"]][item["category"]])
        assert any(n in copy for n in names), (item, copy)
        assert any(p in copy for p in SEGMENT_PHRASES[user["locale"]][user["segment"]]), (user, copy)
        assert len(copy.encode("utf-8")) < 160
        # The copy is in the user's locale (the title may be in the other language).
        chinese = re.search(r"[\u4e00-\u9fff]", copy.replace(item["title"], ""))
        assert bool(chinese) == (user["locale"] == "zh")
    assert len({c for _, _, c in records}) > 0.9 * len(records)


def test_copy_for_agrees_with_the_vectorised_corpus(world: World, records) -> None:
    for user, item, copy in records[::37]:
        assert world.copy_for(user, item) == copy == copy_for(user, item, seed=SMALL.seed)
    user, item, copy = records[0]
    assert any(copy_for(user, item, seed=SMALL.seed + s) != copy for s in (1, 2, 3))
    with pytest.raises(ValueError, match="segment"):
        copy_for({**user, "segment": "astronaut"}, item)


def test_phrases_never_overlap_across_segments_or_mention_a_category() -> None:
    for locale, table in SEGMENT_PHRASES.items():
        for segment, phrases in table.items():
            for phrase in phrases:
                assert not any(n.casefold() in phrase.casefold() for t in CATEGORY_NAMES.values()
                               for n in t.values()), phrase
                others = [p for s, ps in table.items() if s != segment for p in ps]
                assert not any(phrase in o or o in phrase for o in others), (locale, phrase)


def test_200k_candidate_rows_with_copy() -> None:
    big = make_world(WorldConfig(num_users=20_000, num_items=2_000, candidates_per_user=10, seed=3))
    examples = big.training_examples()
    assert big.candidates.num_rows == examples.num_rows == 200_000
    assert examples["user_id"].equals(big.candidates["user_id"])
    assert examples["copy"].null_count == 0
    assert big.users["user_id"].to_pylist() == [f"u{i:06d}" for i in range(20_000)]


def test_tiny_catalogue_gives_every_user_every_item() -> None:
    w = make_world(WorldConfig(num_users=50, num_items=6, candidates_per_user=6))
    pairs = {(r["user_id"], r["item_id"]) for r in w.candidates.to_pylist()}
    assert len(pairs) == 300


def test_parquet_round_trip(world: World, tmp_path) -> None:
    counts = write_world(world, tmp_path / "world")
    assert counts == {"users": 400, "items": 150, "candidates": 3200, "copy": 3200}
    loaded = read_world(tmp_path / "world")
    assert loaded.config == SMALL
    for name in ("users", "items", "candidates"):
        assert getattr(loaded, name).equals(getattr(world, name)), name
    assert pq.read_table(tmp_path / "world" / "copy.parquet").equals(world.training_examples())
    # Through an explicit pyarrow filesystem and a path inside it.
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    write_world(SMALL, "via-fs/run1", filesystem=fs)
    assert read_world("via-fs/run1", filesystem=fs).candidates.equals(world.candidates)


@pytest.mark.parametrize(("field", "value"), [
    ("num_users", 0), ("candidates_per_user", 151), ("languages", ("en", "fr")),
    ("language_shares", (0.5, 0.2)), ("zh_title_share", 1.5), ("interest_boost", -1.0), ("max_interests", 0),
])
def test_config_errors_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=rf"WorldConfig\.{field} .*\(got "):
        dataclasses.replace(SMALL, **{field: value})
