"""What a backfill does differently by modality: the part of each stage that a row's kind decides.

The stages (shards.py: prepare and generate; finish.py: evaluate, filter, write) are written once;
at each point where text and images differ they ask the run's task, which the artifact's ModelSpec
names (models/spec.py: lm -> TextTask, cgan and cvae -> ImageTask):

    check / id_salt   the driver: can this artifact run this backfill; the "template" of default ids
    condition         the preparer: a row's prompt fits the model (text) or its label is a class (image)
    open_engine       the generator: the kind's engine on the artifact, once per actor
    generate, record  the generator: one engine call over a task's rows; its metrics
    finish_row        finish: a generated row's data/ columns, its quality and the filter's verdict
    shard_quality     finish: the shard's quality sums its commit marker holds (text)

Each task is built per actor from the `ShardContext` (small and picklable), so the stages carry no
engine, tokenizer or template across Ray.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from aigc_dist.batch.layout import IMAGE_SCHEMA, TEXT_SCHEMA
from aigc_dist.batch.quality import copy_checks, filter_reason, shard_quality, text_quality
from aigc_dist.config import BackfillConfig
from aigc_dist.metrics import ActorMetrics
from aigc_dist.models.spec import model_spec
from aigc_dist.storage import Storage, join_uri

if TYPE_CHECKING:
    from aigc_dist.batch.shards import ShardContext

# One engine result per request, in order: (its output columns, None) or (None, why it failed).
Results = list[tuple[dict[str, Any] | None, str | None]]

_KEY_COLUMNS = [("request_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string())]
# A request as generated rows carry it to finish. `request`: what an OpenAI Batch line asks for
# (openai_batch.parse_batch_line, the run's defaults filled in), as JSON; null for the rows of a
# candidates or requests table, which the run's sampling serves. `label`: an image's class.
_REQUEST_SCHEMA = pa.schema([*_KEY_COLUMNS, ("seed", pa.int64()), ("user", pa.large_string()),
                             ("item", pa.large_string()), ("raw", pa.large_string()), ("label", pa.int32()),
                             ("request", pa.large_string())])
# ... and as the preparer hands it to a generator: plus the features' prompt as token ids (text), encoded
# once, where the preparer checks that it fits the context, and not again by the engine.
PREPARED_SCHEMA = _REQUEST_SCHEMA.append(pa.field("prompt_ids", pa.list_(pa.int32())))


def backfill_task(context: ShardContext, storage: Storage) -> BackfillTask:
    """The task the run's artifact kind names (its ModelSpec's `backfill`)."""
    return model_spec(context.model["kind"]).part("backfill")(context, storage)


class BackfillTask:
    """The stages' modality-specific part; see the module docstring for who calls what."""

    modality: ClassVar[str]
    generated_schema: ClassVar[pa.Schema]  # a generated row under `_work/`: the request (no prompt_ids) + its output
    data_schema: ClassVar[pa.Schema]  # a row of data/

    def __init__(self, context: ShardContext, storage: Storage):
        self.context, self.storage = context, storage
        self.backfill: BackfillConfig = context.backfill

    @staticmethod
    def check(backfill: BackfillConfig, model: dict[str, Any]) -> str | None:
        """Why this artifact (pipeline.describe_artifact's record) cannot run this backfill, or None."""
        return None

    @staticmethod
    def id_salt(backfill: BackfillConfig, model: dict[str, Any]) -> str:
        raise NotImplementedError

    def condition(self, user: dict[str, Any], item: dict[str, Any],
                  max_new_tokens: int | None = None) -> tuple[dict[str, Any], str | None]:
        """(the prepared row's condition columns: `prompt_ids` or `label`, None), or ({}, why no prompt or
        condition can be built for the pair)."""
        raise NotImplementedError

    def open_engine(self, device: str) -> Any:
        spec = model_spec(self.context.model["kind"])
        return spec.part("engine")(self.backfill.artifact, self.storage, device=device,
                                   max_batch_size=self.backfill.batch_size, **self.backfill.engine.options())

    def generate(self, engine: Any, rows: list[dict[str, Any]]) -> Results:
        raise NotImplementedError

    def record(self, metrics: ActorMetrics, ok: list[dict[str, Any]]) -> None:
        """Count what the generated rows (their output columns) made."""
        raise NotImplementedError

    def finish_row(self, row: dict[str, Any]) -> tuple[dict[str, Any], tuple | None, str | None]:
        """(the row's data/ columns beyond keys, model and seed; its entry of the shard's quality sums, or
        None; why the filters drop it, or None)."""
        raise NotImplementedError

    def shard_quality(self, scored: list[tuple]) -> dict[str, Any] | None:
        return None


class TextTask(BackfillTask):
    """Copy from a prompt: rendered from the user and item with the artifact's template and tokenizer."""

    modality = "text"
    generated_schema = (_REQUEST_SCHEMA.append(pa.field("content", pa.string()))
                        .append(pa.field("num_tokens", pa.int32())).append(pa.field("prompt_tokens", pa.int32()))
                        .append(pa.field("finished", pa.bool_())).append(pa.field("finish_reason", pa.string())))
    data_schema = TEXT_SCHEMA

    def __init__(self, context: ShardContext, storage: Storage):
        super().__init__(context, storage)
        self._prompts: tuple[Any, Any] | None = None  # (template, tokenizer), read on the first condition

    @staticmethod
    def check(backfill: BackfillConfig, model: dict[str, Any]) -> str | None:
        if not (model["template"] and model["tokenizer"]):
            return f"{backfill.artifact} has no tokenizer or no conditioning.prompt_template to render prompts with"
        return None

    @staticmethod
    def id_salt(backfill: BackfillConfig, model: dict[str, Any]) -> str:
        from aigc_dist.data.prompts import PromptTemplate, template_digest

        return template_digest(PromptTemplate(**model["template"]))

    def _template_and_tokenizer(self) -> tuple[Any, Any]:
        if self._prompts is None:
            from aigc_dist.data.prompts import PromptTemplate
            from aigc_dist.models.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TextTokenizer

            uri = self.context.model["tokenizer"]["uri"]  # the artifact's own files: prompts as its engine encodes them
            tokenizer = TextTokenizer.from_files(self.storage.read_bytes(join_uri(uri, TOKENIZER_FILE)),
                                                 self.storage.read_bytes(join_uri(uri, TOKENIZER_CONFIG_FILE)), uri)
            self._prompts = PromptTemplate(**self.context.model["template"]), tokenizer
        return self._prompts

    def condition(self, user: dict[str, Any], item: dict[str, Any],
                  max_new_tokens: int | None = None) -> tuple[dict[str, Any], str | None]:
        from aigc_dist.data.prompts import encode_prompt

        max_new_tokens = max_new_tokens or self.backfill.max_new_tokens
        max_seq_len = self.context.model["max_seq_len"]
        try:
            prompt = encode_prompt(user, item, *self._template_and_tokenizer())
        except ValueError as exc:  # PromptError, or text that cannot be encoded
            return {}, str(exc)
        if len(prompt) + max_new_tokens > max_seq_len:
            return {}, (f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds "
                        f"the model's context of {max_seq_len}")
        return {"prompt_ids": prompt}, None

    def generate(self, engine: Any, rows: list[dict[str, Any]]) -> Results:
        results = engine.generate([self._request(r) for r in rows])
        return [(None, res.error) if res.error else
                ({"content": res.text, "num_tokens": res.num_tokens, "prompt_tokens": res.prompt_tokens,
                  "finished": res.finished, "finish_reason": res.finish_reason}, None) for res in results]

    def _request(self, row: dict[str, Any]) -> Any:
        """The engine's request for a prepared row: the run's sampling, or a batch line's own (and its raw
        prompt or chat messages, when it gives them instead of an aigc user and item)."""
        from aigc_dist.engine.text import SamplingParams, TextRequest

        if row.get("request") is None:
            backfill = self.backfill
            sampling = SamplingParams(backfill.max_new_tokens, backfill.temperature, backfill.top_k, backfill.top_p)
            return TextRequest(seed=row["seed"], sampling=sampling, prompt_ids=row["prompt_ids"])
        request = json.loads(row["request"])
        sampling = SamplingParams(request["max_new_tokens"], request["temperature"], request["top_k"],
                                  request["top_p"])
        # A batch line's aigc user and item were rendered by the preparer; its raw prompt or messages are not.
        return TextRequest(seed=row["seed"], sampling=sampling, prompt=request.get("prompt"),
                           messages=request.get("messages"), stop=tuple(request["stop"]),
                           prompt_ids=row["prompt_ids"])

    def record(self, metrics: ActorMetrics, ok: list[dict[str, Any]]) -> None:
        metrics.inc("aigc_generated_tokens_total", sum(columns["num_tokens"] for columns in ok))

    def finish_row(self, row: dict[str, Any]) -> tuple[dict[str, Any], tuple | None, str | None]:
        backfill = self.backfill
        # A batch file's line samples as its body says (the run's values where it says nothing).
        sampling = json.loads(row["request"]) if row.get("request") else backfill.model_dump(
            include={"temperature", "top_k", "top_p", "max_new_tokens"})
        out = {"content": row["content"], "num_tokens": row["num_tokens"], "prompt_tokens": row["prompt_tokens"],
               "finished": row["finished"],
               **{k: sampling[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens")},
               **text_quality(row["content"], json.loads(row["user"]), json.loads(row["item"]), backfill.quality)}
        checks = copy_checks(row["content"], backfill)
        return out, (row["user_id"], row["item_id"], row["content"], out, checks), filter_reason(out, checks, backfill)

    def shard_quality(self, scored: list[tuple]) -> dict[str, Any] | None:
        return shard_quality(scored, self.backfill)


class ImageTask(BackfillTask):
    """An image per row, conditioned on a class: `backfill.image_label_field` (an id or a label name)."""

    modality = "image"
    generated_schema = (_REQUEST_SCHEMA.append(pa.field("image", pa.binary())).append(pa.field("width", pa.int32()))
                        .append(pa.field("height", pa.int32())))
    data_schema = IMAGE_SCHEMA

    @staticmethod
    def check(backfill: BackfillConfig, model: dict[str, Any]) -> str | None:
        if backfill.output_format != "parquet":
            return (f"backfill.output_format={backfill.output_format} writes text completions; image backfills "
                    "write parquet only")
        return None

    @staticmethod
    def id_salt(backfill: BackfillConfig, model: dict[str, Any]) -> str:
        return hashlib.sha256(f"image:{backfill.image_label_field}".encode()).hexdigest()[:16]

    def condition(self, user: dict[str, Any], item: dict[str, Any],
                  max_new_tokens: int | None = None) -> tuple[dict[str, Any], str | None]:
        field, model, labels = self.backfill.image_label_field, self.context.model, self.context.model["labels"]
        side, name = field.split(".", 1)
        value = (user if side == "user" else item).get(name)
        if isinstance(value, str) and value in labels:
            value = labels.index(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < model["num_classes"]:
            return {}, (f"{field}={value!r} is not a class of the model (an id in [0, {model['num_classes']}) "
                        f"or one of its {len(labels)} label names)")
        return {"label": value}, None

    def generate(self, engine: Any, rows: list[dict[str, Any]]) -> Results:
        from aigc_dist.engine.images import ImageRequest

        results = engine.generate([ImageRequest(r["label"], None, r["seed"]) for r in rows])
        return [(None, res.error) if res.error else
                ({"image": res.png, "width": res.width, "height": res.height}, None) for res in results]

    def record(self, metrics: ActorMetrics, ok: list[dict[str, Any]]) -> None:
        metrics.inc("aigc_generated_images_total", len(ok))

    def finish_row(self, row: dict[str, Any]) -> tuple[dict[str, Any], tuple | None, str | None]:
        return ({"image": row["image"], "label": row["label"], "width": row["width"], "height": row["height"],
                 "num_bytes": len(row["image"])}, None, None)
