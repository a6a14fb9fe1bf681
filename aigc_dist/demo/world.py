"""A deterministic synthetic recommendation world: users, items, recommender candidates, reference copy.

Demos, tests and benchmarks need data with the shape of the real thing (millions of user x item
pairs) and with a ground truth that a metric can check. Here every reference copy mentions the
item (title, category) and carries a phrase tied to the user's segment, in the user's locale, so a
model that learned the task scores 1.0 on grounding and personalization and one that did not, ~0.

Same config -> byte-identical tables. Generation is vectorised (numpy + pyarrow compute); the only
per-row Python is one crc32 per distinct user and item id.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from string import Formatter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aigc_dist.config import QualityConfig
from aigc_dist.demo.world_vocabulary import (  # noqa: F401  (SEGMENT_PHRASES, CATEGORY_NAMES re-exported)
    AGE_BANDS,
    ATTRIBUTE_NAMES,
    BRANDS,
    CATEGORIES,
    CATEGORY_NAMES,
    CATEGORY_SPECS,
    COPY_FORMATS,
    INTEREST_CATEGORY,
    INTERESTS,
    SEGMENT_PHRASES,
    SEGMENT_PROFILES,
    SEGMENTS,
)

SUPPORTED_LOCALES = ("en", "zh")
CONFIG_METADATA_KEY = b"aigc_dist.world_config"


_BLOCK_ROWS = 16384  # users per vectorised block: bounds memory at millions of users


@dataclass
class WorldConfig:
    """Size and shape of a synthetic world; every table is a pure function of this config."""

    num_users: int = 1000  # ids u000000.., zero-padded to at least 6 digits
    num_items: int = 500  # ids i00000.., zero-padded to at least 5 digits
    candidates_per_user: int = 10  # top-k the recommender returns per user; <= num_items
    seed: int = 0  # seeds the generators and the copy template chosen per (user, item)
    languages: tuple[str, ...] = ("en", "zh")  # user locales, from SUPPORTED_LOCALES
    language_shares: tuple[float, ...] = (0.7, 0.3)  # share of users per entry of `languages`; sums to 1
    zh_title_share: float = 0.2  # share of items with a Chinese title (one title language per item)
    max_interests: int = 3  # users get 1..max_interests interest tags
    interest_boost: float = 4.0  # extra weight of a category matching an interest in candidates (0: none)

    def __post_init__(self) -> None:
        self.languages = tuple(self.languages)
        self.language_shares = tuple(float(x) for x in self.language_shares)
        langs, shares = self.languages, self.language_shares
        checks = [(name, getattr(self, name) >= 1, ">= 1")
                  for name in ("num_users", "num_items", "candidates_per_user", "max_interests")]
        checks += [
            ("candidates_per_user", self.candidates_per_user <= self.num_items,
             f"<= num_items={self.num_items}"),
            ("max_interests", self.max_interests <= len(INTERESTS), f"<= {len(INTERESTS)}"),
            ("seed", self.seed >= 0, ">= 0"),
            ("languages", bool(langs) and len(set(langs)) == len(langs)
             and set(langs) <= set(SUPPORTED_LOCALES), f"distinct values from {SUPPORTED_LOCALES}"),
            ("language_shares", len(shares) == len(langs) and min(shares, default=-1) >= 0
             and abs(sum(shares) - 1.0) < 1e-6, f"{len(langs)} non-negative numbers summing to 1"),
            ("zh_title_share", 0.0 <= self.zh_title_share <= 1.0, "in [0, 1]"),
            ("interest_boost", self.interest_boost >= 0, ">= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"WorldConfig.{name} must be {rule} (got {getattr(self, name)!r})")


def _rng(config: WorldConfig, stream: int) -> np.random.Generator:
    # One stream per table: resizing the items does not reshuffle the users.
    return np.random.default_rng([config.seed, stream])


def _ids(prefix: str, n: int, min_width: int) -> pa.Array:
    digits = pa.array(np.arange(n)).cast(pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(digits, max(min_width, len(str(n - 1))), "0"), "")


def _codes(values: pa.Array, vocabulary: tuple[str, ...]) -> np.ndarray:
    return pc.fill_null(pc.index_in(values, value_set=pa.array(vocabulary)), -1).to_numpy()


def _sample_rows(rng: np.random.Generator, weights: np.ndarray, draws: int) -> np.ndarray:
    """Draw `draws` indices per row of `weights` [n, C] (with replacement) -> [n, draws]."""
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]  # last column is exactly 1.0, so u < 1 always lands in range
    u = rng.random((weights.shape[0], draws))
    return (u[:, :, None] >= cdf[:, None, :]).sum(axis=2)  # first column whose cdf exceeds u


def _list_array(rows: np.ndarray, counts: np.ndarray, vocabulary: tuple[str, ...]) -> pa.Array:
    """rows [n, m] of vocabulary indices, keeping the first counts[i] of row i -> list<string>."""
    keep = np.arange(rows.shape[1])[None, :] < counts[:, None]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(vocabulary).take(pa.array(rows[keep])))


_TAG_CATEGORY = np.array([CATEGORIES.index(INTEREST_CATEGORY[t]) for t in INTERESTS])
_LOG_TAG_WEIGHTS = np.log([[6.0 if t in SEGMENT_PROFILES[s].interests else 1.0 for t in INTERESTS]
                           for s in SEGMENTS])
_AGE_WEIGHTS = np.array([SEGMENT_PROFILES[s].age_weights for s in SEGMENTS], dtype=np.float64)


def _make_users(config: WorldConfig) -> tuple[pa.Table, np.ndarray]:
    """Users table and has_interest [num_users, len(CATEGORIES)] for candidate sampling."""
    rng, n = _rng(config, 1), config.num_users
    segment = rng.integers(0, len(SEGMENTS), n)
    locale = rng.choice(len(config.languages), size=n, p=np.array(config.language_shares))
    age = _sample_rows(rng, _AGE_WEIGHTS[segment], 1)[:, 0]
    tags = np.empty((n, config.max_interests), dtype=np.int64)
    for s in range(0, n, _BLOCK_ROWS):  # Gumbel top-k: weighted sampling without replacement
        logits = _LOG_TAG_WEIGHTS[segment[s : s + _BLOCK_ROWS]]
        logits = logits + rng.gumbel(size=logits.shape)
        tags[s : s + _BLOCK_ROWS] = np.argsort(-logits, axis=1, kind="stable")[:, : config.max_interests]
    counts = rng.integers(1, config.max_interests + 1, n)
    mean_sensitivity = np.array([SEGMENT_PROFILES[s].price_sensitivity for s in SEGMENTS])
    sensitivity = np.clip(mean_sensitivity[segment] + rng.normal(0.0, 0.12, n), 0.0, 1.0).round(2)
    has_interest = np.zeros((n, len(CATEGORIES)), dtype=bool)
    keep = np.arange(config.max_interests)[None, :] < counts[:, None]
    has_interest[np.nonzero(keep)[0], _TAG_CATEGORY[tags[keep]]] = True
    table = pa.table({
        "user_id": _ids("u", n, 6),
        "segment": pa.array(SEGMENTS).take(pa.array(segment)),
        "locale": pa.array(config.languages).take(pa.array(locale)),
        "age_band": pa.array(AGE_BANDS).take(pa.array(age)),
        "interests": _list_array(tags, counts, INTERESTS),
        "price_sensitivity": pa.array(sensitivity),
    })
    return table, has_interest


def _flat(per_category: list[tuple[Any, ...]]) -> tuple[tuple[Any, ...], np.ndarray, np.ndarray]:
    """Concatenate per-category vocabularies -> (flat values, offset per category, count per category)."""
    counts = np.array([len(v) for v in per_category])
    return tuple(x for v in per_category for x in v), np.cumsum(counts) - counts, counts


_DESCRIPTORS = _flat([c.descriptors for c in CATEGORY_SPECS.values()])
_NOUNS = _flat([c.nouns for c in CATEGORY_SPECS.values()])
_ATTRIBUTES = _flat([c.attributes for c in CATEGORY_SPECS.values()])


def _make_items(config: WorldConfig) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Items table, category code per item and a latent popularity per item (drives scores)."""
    rng, m = _rng(config, 2), config.num_items
    cat = rng.integers(0, len(CATEGORIES), m)
    brand = rng.integers(0, len(BRANDS), m)

    def pick(flat: tuple[tuple[Any, ...], np.ndarray, np.ndarray]) -> np.ndarray:
        return flat[1][cat] + (rng.random(m) * flat[2][cat]).astype(np.int64)

    desc, noun = pick(_DESCRIPTORS), pick(_NOUNS)
    zh_title = rng.random(m) < config.zh_title_share
    en = pc.binary_join_element_wise(pa.array([b[0] for b in BRANDS]).take(pa.array(brand)),
                                     pa.array(_DESCRIPTORS[0]).take(pa.array(desc)),
                                     pa.array([n[0] for n in _NOUNS[0]]).take(pa.array(noun)), " ")
    zh = pc.binary_join_element_wise(pa.array([b[1] for b in BRANDS]).take(pa.array(brand)),
                                     pa.array([n[1] for n in _NOUNS[0]]).take(pa.array(noun)), "")
    # 2..3 distinct attributes of the item's category; slots past the category's count sort last.
    width = int(_ATTRIBUTES[2].max())
    keys = rng.random((m, width)) + (np.arange(width)[None, :] >= _ATTRIBUTES[2][cat][:, None])
    attrs = _ATTRIBUTES[1][cat][:, None] + np.argsort(keys, axis=1, kind="stable")
    n_attrs = np.minimum(rng.integers(2, 4, m), _ATTRIBUTES[2][cat])
    median = np.array([c.median_price for c in CATEGORY_SPECS.values()])
    price = np.maximum(np.round(median[cat] * np.exp(rng.normal(0.0, 0.45, m))), 3.0) - 0.01
    popularity = rng.normal(0.0, 0.5, m)
    table = pa.table({
        "item_id": _ids("i", m, 5),
        "title": pc.if_else(pa.array(zh_title), zh, en),
        "title_locale": pc.if_else(pa.array(zh_title), "zh", "en"),
        "category": pa.array(CATEGORIES).take(pa.array(cat)),
        "attributes": _list_array(attrs, n_attrs, _ATTRIBUTES[0]),
        "price": pa.array(price.round(2)),
    })
    return table, cat, popularity


def _score_top_k(rng: np.random.Generator, picks: np.ndarray, match: np.ndarray, popularity: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score drawn items [b, d] and keep the k best distinct per row -> (items, scores, ok rows)."""
    logit = 1.5 * match + popularity[picks] + rng.normal(0.0, 0.5, picks.shape)
    score = np.round(1.0 / (1.0 + np.exp(-logit)), 4)
    order = np.argsort(picks, axis=1, kind="stable")
    dup_sorted = np.zeros(picks.shape, dtype=bool)
    dup_sorted[:, 1:] = np.diff(np.take_along_axis(picks, order, axis=1), axis=1) == 0
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    score[dup] = -np.inf
    top = np.argsort(-score, axis=1, kind="stable")[:, :k]
    ok = (~dup).sum(axis=1) >= k
    return np.take_along_axis(picks, top, axis=1), np.take_along_axis(score, top, axis=1), ok


def _make_candidates(config: WorldConfig, users: pa.Table, has_interest: np.ndarray, items: pa.Table,
                     item_cat: np.ndarray, popularity: np.ndarray) -> pa.Table:
    """Top-k per user: draw categories biased to the user's interests, then items within them."""
    rng, n, k = _rng(config, 3), config.num_users, config.candidates_per_user
    draws = 2 * k + 8  # oversample so that, after removing repeats, k distinct items nearly always remain
    by_category = np.argsort(item_cat, kind="stable")
    counts = np.bincount(item_cat, minlength=len(CATEGORIES))
    starts = np.cumsum(counts) - counts
    chosen, scores = np.empty((n, k), dtype=np.int64), np.empty((n, k))
    for s in range(0, n, _BLOCK_ROWS):
        interest = has_interest[s : s + _BLOCK_ROWS]
        rows = np.arange(interest.shape[0])[:, None]
        weights = (counts > 0) * (1.0 + config.interest_boost * interest)  # [b, C]; empty categories: 0
        cats = _sample_rows(rng, weights, draws)  # [b, draws]
        picks = by_category[starts[cats] + (rng.random(cats.shape) * counts[cats]).astype(np.int64)]
        top, top_score, ok = _score_top_k(rng, picks, interest[rows, item_cat[picks]], popularity, k)
        # Rows left with < k distinct items (k close to num_items): sample exactly, without replacement,
        # over all items (Gumbel top-k), a few rows at a time to bound memory.
        bad, step = np.flatnonzero(~ok), max(1, 2**22 // len(item_cat))
        for b in range(0, len(bad), step):
            r = bad[b : b + step]
            keys = np.log(weights[r][:, item_cat]) + rng.gumbel(size=(len(r), len(item_cat)))
            exact = np.argsort(-keys, axis=1, kind="stable")[:, : min(draws, len(item_cat))]
            match = interest[r[:, None], item_cat[exact]]
            top[r], top_score[r], _ = _score_top_k(rng, exact, match, popularity, k)
        chosen[s : s + _BLOCK_ROWS], scores[s : s + _BLOCK_ROWS] = top, top_score
    return pa.table({
        "user_id": users["user_id"].take(pa.array(np.repeat(np.arange(n), k))),
        "item_id": items["item_id"].take(pa.array(chosen.ravel())),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)),
        "score": pa.array(scores.ravel()),
    })


_MIX_1, _MIX_2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), 0x9E3779B97F4A7C15


def _id_hashes(ids: list[str]) -> np.ndarray:
    return np.fromiter((zlib.crc32(i.encode("utf-8")) for i in ids), dtype=np.uint64, count=len(ids))


def _pair_hash(user_hash: np.ndarray, item_hash: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (user crc32, item crc32, seed): stable across processes, unlike hash()."""
    x = ((user_hash << np.uint64(32)) | item_hash) + np.uint64(seed * _GOLDEN % 2**64)  # wraps mod 2**64
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    return x ^ (x >> np.uint64(31))


def _is_null(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return values.is_null().to_numpy(zero_copy_only=False)


def _localized(table: Mapping[str, Mapping[str, str]], keys: tuple[str, ...]) -> pa.Array:
    return pa.array([table[loc][key] for loc in SUPPORTED_LOCALES for key in keys])  # [locale, key] flat


def _copy_column(users: pa.Table, items: pa.Table, user_idx: np.ndarray, item_idx: np.ndarray,
                 seed: int) -> pa.Array:
    """Reference copy for (users[user_idx[j]], items[item_idx[j]]): one string join per (locale, format)."""
    loc = _codes(users["locale"], SUPPORTED_LOCALES)[user_idx]
    seg = _codes(users["segment"], SEGMENTS)[user_idx]
    cat = _codes(items["category"], CATEGORIES)[item_idx]
    titles, attributes = items["title"].combine_chunks(), items["attributes"].combine_chunks()
    n_attrs = pc.fill_null(pc.list_value_length(attributes), 0).to_numpy()[item_idx]
    for name, bad in (("user locale", loc < 0), ("user segment", seg < 0), ("item category", cat < 0),
                      ("item attributes", n_attrs == 0), ("item title", _is_null(titles)[item_idx]),
                      ("user_id", _is_null(users["user_id"])[user_idx]),
                      ("item_id", _is_null(items["item_id"])[item_idx])):
        if bad.any():
            raise ValueError(f"synthetic copy needs a valid {name} in every row")
    ls = loc * len(SEGMENTS) + seg
    phrase_flat, phrase_start, phrase_count = _flat([SEGMENT_PHRASES[lo][s] for lo in SUPPORTED_LOCALES
                                                     for s in SEGMENTS])
    h = _pair_hash(_id_hashes(users["user_id"].to_pylist())[user_idx],
                   _id_hashes(items["item_id"].to_pylist())[item_idx], seed)
    # Different bits of one hash pick the format, the phrase and the attribute, so they vary independently.
    # All uint64: numpy would promote uint64 % int64 to float64 and lose the low bits.
    fmt = (h % np.array([len(COPY_FORMATS[lo]) for lo in SUPPORTED_LOCALES], np.uint64)[loc]).astype(np.int64)
    phrase = ((h >> np.uint64(20)) % phrase_count[ls].astype(np.uint64)).astype(np.int64)
    attr = ((h >> np.uint64(40)) % n_attrs.astype(np.uint64)).astype(np.int64)
    attr_keys = tuple(ATTRIBUTE_NAMES["en"])
    # .values and .offsets are both unsliced, so they index each other even for a sliced table.
    attr_code = _codes(attributes.values.take(pa.array(attributes.offsets.to_numpy()[item_idx] + attr)),
                       attr_keys)
    if (attr_code < 0).any():
        raise ValueError(f"synthetic copy needs item attributes from {attr_keys}")
    slots = {  # slot -> (values, index of each row's value); taken per format group, each row once
        "title": (titles, item_idx),
        "category": (_localized(CATEGORY_NAMES, CATEGORIES), loc * len(CATEGORIES) + cat),
        "attribute": (_localized(ATTRIBUTE_NAMES, attr_keys), loc * len(attr_keys) + attr_code),
        "phrase": (pa.array(phrase_flat), phrase_start[ls] + phrase),
    }
    pieces, positions = [pa.array([], pa.string())], [np.zeros(0, np.int64)]
    for li, locale in enumerate(SUPPORTED_LOCALES):
        for fi, template in enumerate(COPY_FORMATS[locale]):
            rows = np.flatnonzero((loc == li) & (fmt == fi))
            parts: list[Any] = []
            for literal, slot, _, _ in Formatter().parse(template):
                parts += [literal] if literal else []
                parts += [slots[slot][0].take(pa.array(slots[slot][1][rows]))] if slot else []
            pieces.append(pc.binary_join_element_wise(*parts, ""))
            positions.append(rows)
    order = np.empty(len(user_idx), dtype=np.int64)
    order[np.concatenate(positions)] = np.arange(len(user_idx))
    return pa.concat_arrays(pieces).take(pa.array(order))


def world_quality() -> QualityConfig:
    """The synthetic world's quality rules, given like any user's: an item is named by its title or its
    category in either language; personalization is a phrase of the user's segment in the user's locale."""
    return QualityConfig(
        mention_fields=["title", "category"],
        mention_aliases={"category": {c: sorted({t[c] for t in CATEGORY_NAMES.values()} - {c})
                                      for c in CATEGORIES}},
        personalization_feature="segment", phrases=SEGMENT_PHRASES, match_feature_value=False,
    )


def copy_for(user: Mapping[str, Any], item: Mapping[str, Any], seed: int = 0) -> str:
    """Reference copy for one (user, item): user_id, segment, locale; item_id, title, category, attributes.

    Deterministic in (seed, user_id, item_id), in the user's locale; mentions the item's title (and
    some formats its category) and one SEGMENT_PHRASES phrase of the user's segment. The same code
    path as `World.training_examples`, so the two always agree.
    """
    users = pa.table({"user_id": [user.get("user_id")], "segment": [user.get("segment")],
                      "locale": [user.get("locale")]})
    items = pa.table({"item_id": [item.get("item_id")], "title": [item.get("title")],
                      "category": [item.get("category")],
                      "attributes": pa.array([list(item.get("attributes") or [])], pa.list_(pa.string()))})
    return _copy_column(users, items, np.zeros(1, np.int64), np.zeros(1, np.int64), seed)[0].as_py()


@dataclass(frozen=True)
class World:
    """A generated (or loaded) world: pyarrow tables plus the config that produced them."""

    config: WorldConfig
    users: pa.Table  # user_id, segment, locale, age_band, interests list<string>, price_sensitivity
    items: pa.Table  # item_id, title, title_locale, category, attributes list<string>, price
    candidates: pa.Table  # user_id, item_id, rank (1..k), score; k rows per user, best first

    def copy_for(self, user: Mapping[str, Any], item: Mapping[str, Any]) -> str:
        """Reference copy for one (user, item) under this world's seed."""
        return copy_for(user, item, self.config.seed)

    def training_examples(self, max_rows: int | None = None) -> pa.Table:
        """(user_id, item_id, copy) for the first `max_rows` candidates (all by default)."""
        cands = self.candidates if max_rows is None else self.candidates.slice(0, max_rows)
        user_idx = pc.index_in(cands["user_id"], value_set=self.users["user_id"])
        item_idx = pc.index_in(cands["item_id"], value_set=self.items["item_id"])
        if user_idx.null_count or item_idx.null_count:
            raise ValueError("candidates reference user_id or item_id values missing from users/items")
        copy = _copy_column(self.users, self.items, user_idx.to_numpy(), item_idx.to_numpy(),
                            self.config.seed)
        return pa.table({"user_id": cands["user_id"], "item_id": cands["item_id"], "copy": copy})

    def training_records(self, max_rows: int | None = None
                         ) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
        """(user features, item features, copy) triples, ready for `prompts.encode_example`."""
        users = {u["user_id"]: u for u in self.users.to_pylist()}
        items = {i["item_id"]: i for i in self.items.to_pylist()}
        return [(users[row["user_id"]], items[row["item_id"]], row["copy"])
                for row in self.training_examples(max_rows).to_pylist()]


def make_world(config: WorldConfig) -> World:
    """Generate users, items and candidates for `config` (deterministic, vectorised)."""
    users, has_interest = _make_users(config)
    items, item_cat, popularity = _make_items(config)
    candidates = _make_candidates(config, users, has_interest, items, item_cat, popularity)
    metadata = {CONFIG_METADATA_KEY: json.dumps(asdict(config), sort_keys=True).encode()}
    users, items, candidates = (t.replace_schema_metadata(metadata) for t in (users, items, candidates))
    return World(config, users, items, candidates)


WORLD_FILES = ("users", "items", "candidates", "copy")


def _location(directory: str | os.PathLike[str], filesystem: pafs.FileSystem | None
              ) -> tuple[pafs.FileSystem, str]:
    if filesystem is None:  # a plain local path; URIs and S3 are storage.py's business
        return pafs.LocalFileSystem(), os.path.abspath(os.fspath(directory))
    return filesystem, os.fspath(directory).rstrip("/")


def write_world(world: World | WorldConfig, directory: str | os.PathLike[str],
                filesystem: pafs.FileSystem | None = None) -> dict[str, int]:
    """Write users, items, candidates and copy (training examples) as `<directory>/<name>.parquet`.

    Takes a World or a WorldConfig (generated first). `filesystem` + path for non-local storage.
    Returns the row count per file. The same world always writes byte-identical files.
    """
    if isinstance(world, WorldConfig):
        world = make_world(world)
    fs, root = _location(directory, filesystem)
    fs.create_dir(root, recursive=True)
    copy = world.training_examples().replace_schema_metadata(world.users.schema.metadata)
    tables = dict(zip(WORLD_FILES, (world.users, world.items, world.candidates, copy), strict=True))
    for name, table in tables.items():
        pq.write_table(table, f"{root}/{name}.parquet", filesystem=fs)
    return {name: table.num_rows for name, table in tables.items()}


def read_world(directory: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> World:
    """Load a world written by `write_world` (its config comes from the parquet metadata)."""
    fs, root = _location(directory, filesystem)
    users, items, candidates = (pq.read_table(f"{root}/{name}.parquet", filesystem=fs)
                                for name in WORLD_FILES[:3])
    raw = (users.schema.metadata or {}).get(CONFIG_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{root}/users.parquet has no {CONFIG_METADATA_KEY.decode()} metadata; "
                         "was it written by write_world?")
    return World(WorldConfig(**json.loads(raw)), users, items, candidates)
