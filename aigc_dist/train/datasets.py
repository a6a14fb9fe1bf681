"""Training examples as Ray Datasets (parquet, local or S3), and batches of them as tensors.

Text: `train.dataset` holds (user_id, item_id, copy) rows, e.g. the `copy.parquet` that
`aigc_dist.demo.world.write_world` writes. When `data.users` / `data.items` are set, features
are looked up there by id (a broadcast join: the feature tables are small next to the examples);
otherwise the feature columns are read from the example rows themselves. Ray Data tasks render and
tokenize each row with `encode_example`, so tokenization runs beside training, not inside it, and
the workers receive `input_ids` / `loss_mask` lists through `ray.train.get_dataset_shard`. This
module is what those tasks import: it stays free of torch, which would cost each task process
seconds to import.

Images: `train.dataset` holds `pixels` (C*H*W floats in [0, 1], row-major) and `label` rows;
`write_digits_parquet` writes scikit-learn's digits in that layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from aigc_dist.batch.inputs import RowRules, check_row
from aigc_dist.batch.reading import load_profiles
from aigc_dist.batch.records import ReadLimits, arrow_records
from aigc_dist.config import ConfigError, DataConfig, StorageConfig
from aigc_dist.data.prompts import PromptError, PromptTemplate, encode_example, layout_overhead
from aigc_dist.models.tokenizer import TextTokenizer
from aigc_dist.storage import Storage

log = logging.getLogger(__name__)

# Required fields of the prompt, when the data config renders them at all (see PromptTemplate).
_REQUIRED_USER_FIELDS = ("segment",)
_REQUIRED_ITEM_FIELDS = ("title",)
# Feature tables already read by this process, by URI: Ray Data reuses its worker processes, so a
# table is read once per process rather than once per batch.
_FEATURE_TABLES: dict[str, dict[Any, dict[str, Any]]] = {}


def prompt_template(data: DataConfig, tokenizer: TextTokenizer | None = None) -> PromptTemplate:
    """The prompt template the `data` section describes (stored in the LM artifact). Layout "auto":
    the project's markers when the tokenizer has them, plain text for a checkpoint's own vocabulary."""
    has_markers = tokenizer is None or tokenizer.token_id("<user>") is not None
    layout = data.prompt_layout
    if layout == "auto":
        layout = "markers" if has_markers else "text"
    elif layout == "markers" and not has_markers:  # every example would fail to encode, one by one
        raise ConfigError(f"data.prompt_layout: 'markers' needs the project's special tokens (<user>, <item>, ...), "
                          f"which {tokenizer.source} lacks; use 'text' or 'auto'")
    elif layout == "chat" and tokenizer is not None:
        try:
            layout_overhead(tokenizer, layout)  # renders the checkpoint's chat template once
        except PromptError as exc:
            raise ConfigError(f"data.prompt_layout: {exc}") from None
    try:
        return PromptTemplate(
            layout=layout,
            user_fields=tuple(data.user_fields),
            item_fields=tuple(data.item_fields),
            required_user_fields=tuple(f for f in _REQUIRED_USER_FIELDS if f in data.user_fields),
            required_item_fields=tuple(f for f in _REQUIRED_ITEM_FIELDS if f in data.item_fields),
            max_field_chars=data.max_field_chars,
            max_prompt_tokens=data.max_prompt_tokens,
        )
    except ValueError as exc:  # e.g. a budget that the text layout's longer skeleton does not fit
        raise ConfigError(f"{str(exc).replace('PromptTemplate.', 'data.')} (prompt layout {layout!r})") from None


@dataclass(frozen=True)
class LMEncoding:
    """Everything a Ray Data task needs to turn example rows into token ids."""

    template: PromptTemplate
    max_seq_len: int
    tokenizer_files: tuple[bytes, bytes]  # tokenizer.json, tokenizer_config.json: plain bytes travel to tasks
    users_uri: str | None
    items_uri: str | None
    storage: StorageConfig


def _feature_table(uri: str, key: str, storage: StorageConfig) -> dict[Any, dict[str, Any]]:
    """id -> row of a users or items table (parquet, jsonl or csv), read by the backfill's reader with its
    one rule: invalid rows and every copy of a repeated id are rejected (logged), and examples that name
    them are dropped like unknown ids."""
    if uri not in _FEATURE_TABLES:
        index = load_profiles(key.removesuffix("_id"), uri, "auto", Storage(storage), ReadLimits.default())
        if rejected := index.rejected():
            log.warning("%s: %d feature rows rejected, e.g. %s", uri, len(rejected), rejected[0]["error"])
        _FEATURE_TABLES[uri] = index.features()
    return _FEATURE_TABLES[uri]


_TOKENIZERS: dict[tuple[bytes, bytes], TextTokenizer] = {}


def _tokenizer(files: tuple[bytes, bytes]) -> TextTokenizer:
    if files not in _TOKENIZERS:  # once per task process, as the feature tables
        _TOKENIZERS[files] = TextTokenizer.from_files(*files, source="train.tokenizer")
    return _TOKENIZERS[files]


def encode_lm_batch(batch: pa.Table, encoding: LMEncoding) -> pa.Table:
    """Example rows -> `input_ids` (list<int32>), `loss_mask` (list<bool>), `num_tokens`.

    Rows that cannot become an example (an id missing from the feature tables, a missing required
    feature) are dropped with a warning: one bad row must not stop a training run.
    """
    tokenizer = _tokenizer(encoding.tokenizer_files)
    users = _feature_table(encoding.users_uri, "user_id", encoding.storage) if encoding.users_uri else None
    items = _feature_table(encoding.items_uri, "item_id", encoding.storage) if encoding.items_uri else None
    ids_out: list[list[int]] = []
    mask_out: list[list[bool]] = []
    dropped = 0
    for row in batch.to_pylist():
        user = users.get(row.get("user_id")) if users is not None else row
        item = items.get(row.get("item_id")) if items is not None else row
        copy = row.get("copy")
        if user is None or item is None or not isinstance(copy, str):
            dropped += 1
            continue
        try:
            ids, mask = encode_example(user, item, copy, encoding.template, tokenizer, encoding.max_seq_len)
        except (PromptError, ValueError):
            dropped += 1
            continue
        ids_out.append(ids)
        mask_out.append(mask)
    if dropped:
        log.warning("dropped %d of %d training rows that cannot be encoded", dropped, batch.num_rows)
    return pa.table(
        {
            "input_ids": pa.array(ids_out, pa.list_(pa.int32())),
            "loss_mask": pa.array(mask_out, pa.list_(pa.bool_())),
            "num_tokens": pa.array([len(ids) for ids in ids_out], pa.int32()),
        }
    )


def readable_examples(batch: pa.Table, limits: ReadLimits) -> pa.Table:
    """The example rows the backfill's reader accepts (cells Arrow can convert, valid UTF-8, bounded
    nesting, fields and sizes); the others are dropped with a warning naming the first reason, so no
    row can stop a training run (a string column is not checked for UTF-8 when parquet is read)."""
    problems = [error or check_row(row, RowRules("examples", limits=limits)) for row, error in
                arrow_records(batch, limits)]
    bad = [problem for problem in problems if problem is not None]
    if not bad:
        return batch
    log.warning("dropped %d of %d training rows the reader rejects, e.g. %s", len(bad), batch.num_rows, bad[0])
    return batch.filter(pa.array([problem is None for problem in problems]))


def _read_parquet(uri: str, storage: Storage) -> Any:
    import ray.data

    fs, path = storage.filesystem(uri)
    try:
        return ray.data.read_parquet(path, filesystem=fs)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"train.dataset: cannot read parquet at {uri!r}: {exc}") from exc


def lm_dataset(dataset_uri: str, data: DataConfig, max_seq_len: int, storage_config: StorageConfig,
               tokenizer: TextTokenizer, template: PromptTemplate) -> Any:  # fmt: skip
    """The text training examples as a Ray Dataset of token ids (lazy: nothing runs yet)."""
    files = tokenizer.files()
    encoding = LMEncoding(template, max_seq_len, (files["tokenizer.json"], files["tokenizer_config.json"]),
                          data.users, data.items, storage_config)
    ds = _read_parquet(dataset_uri, Storage(storage_config)).map_batches(
        readable_examples, batch_format="pyarrow", batch_size=None, fn_kwargs={"limits": ReadLimits.of(data)})
    return ds.map_batches(partial(encode_lm_batch, encoding=encoding), batch_format="pyarrow", batch_size=None)


def image_dataset(dataset_uri: str, storage_config: StorageConfig) -> Any:
    """The image training rows (`pixels`, `label`) as a Ray Dataset."""
    return _read_parquet(dataset_uri, Storage(storage_config)).select_columns(["pixels", "label"])


def write_digits_parquet(
    uri: str, storage: Storage, image_size: int = 16, channels: int = 1, seed: int = 0
) -> int:
    """Write the training split of scikit-learn's digits as `pixels` + `label` parquet; returns rows."""
    from aigc_dist.data.digits import load_digits_split

    split = load_digits_split(image_size=image_size, channels=channels, seed=seed)
    flat = split.train_images.reshape(split.train_images.shape[0], -1).numpy()  # [N, C*H*W]
    table = pa.table(
        {
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), flat.shape[1]),
            "label": pa.array(split.train_labels.numpy(), pa.int64()),
        }
    )
    fs, path = storage.filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    pq.write_table(table, path, filesystem=fs)
    return table.num_rows

