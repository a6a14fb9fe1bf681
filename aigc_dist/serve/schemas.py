"""Request and response bodies of the online API, and the limits a request must respect.

The pydantic models carry the hard ceilings (what the OpenAPI schema shows and no config can raise);
`check_limits` applies the deployment's own, tighter limits from `ServeConfig` and reports a
violation exactly as FastAPI reports a schema violation: a 422 whose `detail` names the field.
Unknown fields are rejected everywhere (`extra="forbid"`), so a misspelt parameter is an error, not
a silently ignored default.
"""

from __future__ import annotations

import calendar
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, model_validator

from aigc_dist.config import ServeConfig
from aigc_dist.models.artifact import Artifact

# Hard ceilings; ServeConfig's limits sit below them (its fields have the same upper bounds).
MAX_REQUESTS_CEILING = 10_000
MAX_NEW_TOKENS_CEILING = 8192
MAX_VALUE_CHARS_CEILING = 65_536
MAX_FEATURES_CEILING = 1024
MAX_SEED = 2**63 - 1


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"); they have no UTF-8 form, so no prompt can hold them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text (lone surrogate at position {exc.start})") from None
    return text


Text = Annotated[str, StringConstraints(max_length=MAX_VALUE_CHARS_CEILING), AfterValidator(_encodable)]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=MAX_VALUE_CHARS_CEILING),
                       AfterValidator(_encodable)]
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_encodable)]


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SEED:
            raise ValueError(f"integers are limited to +-{MAX_SEED}")
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("numbers must be finite")
        return value
    if isinstance(value, str):
        return _encodable(value)
    raise ValueError("a feature value is text, a number, a boolean, null, or a list of those")


def _feature_value(value: Any) -> Any:
    """One check instead of a union of types, so a bad value gets one error that says what is allowed."""
    if isinstance(value, list):
        if len(value) > MAX_FEATURES_CEILING:
            raise ValueError(f"at most {MAX_FEATURES_CEILING} values in a list")
        return [_scalar(v) for v in value]
    return _scalar(value)


_SCALAR_SCHEMA = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
FeatureValue = Annotated[Any, AfterValidator(_feature_value), WithJsonSchema(
    {"anyOf": [*_SCALAR_SCHEMA, {"type": "array", "items": {"anyOf": _SCALAR_SCHEMA}}]})]
Features = Annotated[dict[FeatureName, FeatureValue], Field(max_length=MAX_FEATURES_CEILING)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Personalization(Body):
    """A user and an item, each by id (profile lookup) or by features: what the prompt is rendered from."""

    user_id: Identifier | None = Field(None, description="Looked up in the users table; `user` features override.")
    user: Features | None = Field(None, description="User features, e.g. {\"segment\": \"runner\"}.")
    item_id: Identifier | None = Field(None, description="Looked up in the items table; `item` features override.")
    item: Features | None = Field(None, description="Item features, e.g. {\"title\": \"Trail shoe\"}.")

    @model_validator(mode="after")
    def _who_and_what(self) -> Personalization:
        if self.user_id is None and self.user is None:
            raise ValueError("give user_id or user features")
        if self.item_id is None and self.item is None:
            raise ValueError("give item_id or item features")
        return self


class GenerateItem(Personalization):
    """One personalized request: a user and an item, each by id (profile lookup) or by features."""

    seed: int = Field(0, ge=0, le=MAX_SEED, description="Same features + sampling + seed -> same copy.")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CEILING, description="Default: the server's.")
    temperature: float = Field(0.8, ge=0, le=5, allow_inf_nan=False, description="0 = greedy.")
    top_k: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_CEILING)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)


class GenerateBody(Body):
    requests: list[GenerateItem] = Field(min_length=1, max_length=MAX_REQUESTS_CEILING)


class GenerateResult(BaseModel):
    content: str
    num_tokens: int
    finished: bool = Field(description="True when the model ended the copy, false when cut at max_new_tokens.")
    seed: int
    user_id: str | None = None
    item_id: str | None = None


class ModelInfo(BaseModel):
    kind: str
    name: str
    version: str
    digest: str


class GenerateResponse(BaseModel):
    model: ModelInfo
    results: list[GenerateResult]


class ImageItem(Body):
    """One image: the class (an id, or a label name the artifact knows) and optional numeric features."""

    label: Annotated[int, Field(ge=0, le=MAX_FEATURES_CEILING)] | Identifier
    features: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(None, max_length=MAX_FEATURES_CEILING)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class ImagesBody(Body):
    requests: list[ImageItem] = Field(min_length=1, max_length=MAX_REQUESTS_CEILING)


class ImageResult(BaseModel):
    png_base64: str
    width: int
    height: int
    label: int
    seed: int


class ImagesResponse(BaseModel):
    model: ModelInfo
    results: list[ImageResult]


class OpenAIModel(BaseModel):
    """A served model as OpenAI's `GET /v1/models` lists it; `id` is what the `model` field names."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When the artifact was written (Unix seconds; 0 when it does not say).")
    owned_by: str = "aigc-dist"


def model_info(artifact: Artifact) -> ModelInfo:
    meta = artifact.metadata
    return ModelInfo(kind=artifact.kind, name=str(meta.get("name", "?")), version=str(meta.get("version", "?")),
                     digest=artifact.digest)


def openai_model(artifact: Artifact) -> OpenAIModel:
    try:
        created = calendar.timegm(time.strptime(str(artifact.metadata.get("created_at")), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        created = 0
    return OpenAIModel(id=model_info(artifact).name, created=created)


class ModelsResponse(BaseModel):
    """Today's list (`models`, `stats`) and OpenAI's (`object`, `data`) in one answer, so either kind of
    client reads it unchanged."""

    models: list[ModelInfo]
    stats: dict[str, int] = Field(description="This replica's counters: batches decoded and requests in them.")
    object: Literal["list"] = "list"
    data: list[OpenAIModel] = Field(default_factory=list)


def violation(loc: list[str | int], message: str, value: Any, kind: str = "value_error") -> dict[str, Any]:
    """One entry of a 422 `detail`, shaped like FastAPI's own."""
    return {"type": kind, "loc": ["body", *loc], "msg": message, "input": value}


ECHO_CHARS = 200  # how much of an offending input a 422 repeats


def printable(value: Any) -> Any:
    if isinstance(value, str):
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"... ({len(value)} characters)"
    if value is None or isinstance(value, bool | int | float):
        return value if not isinstance(value, float) or value == value and abs(value) != float("inf") else str(value)
    return printable(repr(value))


def describe_problems(errors: Any) -> list[dict[str, Any]]:
    """Validation errors as JSON-safe dicts: type, loc, msg and a printable, shortened input."""
    return [{"type": str(error.get("type", "value_error")),
             "loc": [part if isinstance(part, int) else printable(str(part)) for part in error.get("loc", ())],
             "msg": printable(str(error.get("msg", ""))),
             "input": printable(error.get("input"))} for error in errors]


def check_features(features: dict[str, Any] | None, loc: list[str | int], limits: ServeConfig
                    ) -> list[dict[str, Any]]:
    if not features:
        return []
    found = []
    if len(features) > limits.max_features:
        found.append(violation(loc, f"at most {limits.max_features} features (got {len(features)})",
                               len(features), "too_long"))
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > limits.max_features:
            found.append(violation([*loc, name], f"at most {limits.max_features} values (got {len(value)})",
                                   len(value), "too_long"))
        for v in values:
            if isinstance(v, str) and len(v) > limits.max_value_chars:
                found.append(violation([*loc, name], f"at most {limits.max_value_chars} characters "
                                       f"(got {len(v)})", len(v), "string_too_long"))
                break
    return found


def check_generate_limits(body: GenerateBody, limits: ServeConfig) -> list[dict[str, Any]]:
    """Violations of this deployment's limits (empty when the body is within them)."""
    found = []
    if len(body.requests) > limits.max_requests_per_call:
        found.append(violation(["requests"], f"at most {limits.max_requests_per_call} requests per call "
                               f"(got {len(body.requests)})", len(body.requests), "too_long"))
        return found
    for index, request in enumerate(body.requests):
        loc: list[str | int] = ["requests", index]
        if request.max_new_tokens is not None and request.max_new_tokens > limits.max_new_tokens_cap:
            found.append(violation([*loc, "max_new_tokens"], f"must be <= {limits.max_new_tokens_cap}",
                                   request.max_new_tokens, "less_than_equal"))
        for name in ("user_id", "item_id"):
            value = getattr(request, name)
            if value is not None and len(value) > limits.max_value_chars:
                found.append(violation([*loc, name], f"at most {limits.max_value_chars} characters "
                                       f"(got {len(value)})", len(value), "string_too_long"))
        found += check_features(request.user, [*loc, "user"], limits)
        found += check_features(request.item, [*loc, "item"], limits)
    tokens = call_tokens(body, limits)
    if tokens > limits.max_tokens_per_call:
        found.append(violation(["requests"], f"this call asks for up to {tokens} new tokens (max_new_tokens summed "
                               f"over its {len(body.requests)} requests); the budget is {limits.max_tokens_per_call} "
                               "per call: send fewer requests or smaller max_new_tokens", tokens, "too_long"))
    return found


def effective_max_new_tokens(request: GenerateItem, limits: ServeConfig) -> int:
    """What a request may generate: its own max_new_tokens, else the deployment's default (within the cap)."""
    return request.max_new_tokens or min(limits.default_max_new_tokens, limits.max_new_tokens_cap)


def call_tokens(body: GenerateBody, limits: ServeConfig) -> int:
    """The call's figure against `serve.max_tokens_per_call`: the most new tokens it can ask the replica for."""
    return sum(effective_max_new_tokens(request, limits) for request in body.requests)


def check_images_limits(body: ImagesBody, limits: ServeConfig) -> list[dict[str, Any]]:
    if len(body.requests) > limits.max_requests_per_call:
        return [violation(["requests"], f"at most {limits.max_requests_per_call} requests per call "
                          f"(got {len(body.requests)})", len(body.requests), "too_long")]
    return []
