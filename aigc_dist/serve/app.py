"""The Ray Serve application: a FastAPI ingress around the same engines the backfill uses.

    POST /v1/generate   personalized copy for one or many (user, item) requests
    POST /v1/images     class (+ features) -> base64 PNG
    GET  /v1/models     what this replica serves, and its batching counters (also in OpenAI's shape)
    GET  /healthz       200 when the replica has a model loaded
    POST /v1/completions, /v1/chat/completions   OpenAI-compatible, streaming too (openai_api.py)

Every route but /healthz needs `Authorization: Bearer <key>` when `serve.api_keys_env` is set (auth.py);
a body must arrive within `serve.body_read_timeout_s` (408) and a call's tokens fit
`serve.max_tokens_per_call` (422), checked before any work is queued.

Concurrent requests share forward passes through `@serve.batch` (size and wait from `user_config`,
changeable at run time with `reconfigure`, which also swaps artifacts without dropping in-flight
requests: a batch keeps the engine it started with); streams share one live decode that each joins at
its next step (streams.py), the old one finishing its streams after a swap. Overload is Serve's own admission control:
past `max_ongoing_requests` per replica requests queue, past `max_queued_requests` the caller gets
503 with Retry-After.

Entry points: `aigc-dist serve` (local), `serve run|deploy` and KubeRay's `serveConfigV2` with
`import_path: aigc_dist.serve.app:build_app` and `args: {config: <file>, serve: {...}}`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time, and
# Serve's ingress rewrites them, so annotations must be real objects, not strings.
import asyncio
import base64
import logging
import time
from collections import Counter
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_dist import __version__
from aigc_dist.batch.records import ReadLimits
from aigc_dist.config import AigcConfig, DataConfig, ServeConfig, StorageConfig, parse_overrides, read_config_file
from aigc_dist.config.loader import merge, validate_config
from aigc_dist.engine.images import ImageEngine, ImageRequest
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest, TextResult
from aigc_dist.metrics import ActorMetrics
from aigc_dist.models.artifact import ArtifactError, artifact_kind
from aigc_dist.models.spec import model_spec
from aigc_dist.serve.auth import BearerAuthMiddleware, load_api_keys
from aigc_dist.serve.http import (
    OPENAI_ROUTES,
    BodyLimitMiddleware,
    ProxyControlHeaderMiddleware,
    RequestMetricsMiddleware,
    route_of,
)
from aigc_dist.serve.openai_api import OpenAIRoutes, router
from aigc_dist.serve.openai_schemas import OpenAIError, validation_error
from aigc_dist.serve.profiles import InvalidProfileError, ProfileTable, UnknownIdError, empty_table
from aigc_dist.serve.schemas import (
    GenerateBody,
    GenerateResponse,
    GenerateResult,
    ImageResult,
    ImagesBody,
    ImagesResponse,
    ModelInfo,
    ModelsResponse,
    check_generate_limits,
    check_images_limits,
    describe_problems,
    effective_max_new_tokens,
    model_info,
    openai_model,
    violation,
)
from aigc_dist.storage import Storage

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "AigcServe"
# What `reconfigure` accepts: swapping models and tuning batching needs no restart.
USER_CONFIG_KEYS = ("artifact", "image_artifact", "max_batch_size", "batch_wait_timeout_s")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "A header this server does not accept (Ray Serve's proxy-control headers)."},
    401: {"description": "Missing or wrong API key (when serve.api_keys_env is set); OpenAI's error shape."},
    404: {"description": "Unknown user_id or item_id, or no model of that kind is served."},
    408: {"description": "The request body did not arrive within serve.body_read_timeout_s."},
    413: {"description": "Request body over the server's limit."},
    422: {"description": "A field is invalid, or the call is over serve.max_tokens_per_call; `detail` names it."},
    503: {"description": "Over capacity; retry after the Retry-After header's seconds."},
}

api = FastAPI(
    title="aigc-dist",
    version=__version__,
    description="Personalized content generation: copy for (user, item) pairs, and conditional images.",
)
# Each added one wraps those before it: metrics see every answer, the key is checked before anything
# else, and the body is read (within its size and time limits) only for an authenticated caller.
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(ProxyControlHeaderMiddleware)
api.add_middleware(BearerAuthMiddleware)
api.add_middleware(RequestMetricsMiddleware)
api.include_router(router)  # before @serve.ingress below, which collects the routes of AigcServe's classes


@api.exception_handler(RequestValidationError)
async def _unprocessable_entity(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, with the offending inputs made printable and short: an input that is not valid
    Unicode must not turn the error answer itself into a 500, and a 1 MB value is not echoed back.
    On the OpenAI routes: OpenAI's 400 (`validation_error`), as OpenAI answers a bad parameter."""
    problems = describe_problems(exc.errors())
    if route_of(request.scope) in OPENAI_ROUTES:
        return await _openai_error(request, validation_error(problems))
    return JSONResponse(status_code=422, content={"detail": problems})


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own HTTP errors (a body it cannot decode, a wrong method) in OpenAI's shape on its routes."""
    if route_of(request.scope) in OPENAI_ROUTES:
        return await _openai_error(request, OpenAIError(exc.status_code, str(exc.detail), headers=exc.headers))
    return await http_exception_handler(request, exc)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class AigcServe(OpenAIRoutes):
    """One replica: loads the artifacts and profile tables once, then answers requests."""

    def __init__(self, serve_config: dict[str, Any], data_config: dict[str, Any], storage_config: dict[str, Any]):
        """Loads the profile tables; Serve then calls `reconfigure` with the user_config, which loads the
        models. Keeping artifacts out of the init args is what lets a new artifact be swapped in place
        (a change of init args would replace the replicas instead)."""
        import torch

        self.limits = ServeConfig.model_validate(serve_config)
        # First, so a replica whose keys are missing stops before it loads anything (and never serves open).
        api.state.api_keys = load_api_keys(self.limits.api_keys_env) if self.limits.api_keys_env else None
        data = DataConfig.model_validate(data_config)
        self.storage = Storage(StorageConfig.model_validate(storage_config))
        # The replica's CPU share decides torch's threads, so co-located replicas don't oversubscribe.
        torch.set_num_threads(max(1, int(self.limits.cpus_per_replica)))
        limits = ReadLimits.of(data)  # the backfill's reader and limits: one rule for every reader of a table
        self.users = ProfileTable.load("user", data.users, data.format, self.storage, limits) if data.users \
            else empty_table("user")
        self.items = ProfileTable.load("item", data.items, data.format, self.storage, limits) if data.items \
            else empty_table("item")
        self.text: TextEngine | None = None
        self.image: ImageEngine | None = None
        self.text_uri: str | None = None
        self.image_uri: str | None = None
        self.stats: Counter[str] = Counter()
        self.live = None  # the streams' live decode (openai_api.py), started by the first stream
        self.metrics = ActorMetrics("serve", {"run": serve.get_replica_context().app_name})
        api.state.max_body_bytes = self.limits.max_body_bytes
        api.state.body_read_timeout_s = self.limits.body_read_timeout_s
        api.state.metrics = self.metrics
        log.info("replica started: %d users, %d items; models come with user_config", len(self.users),
                 len(self.items))

    def _load(self, text_uri: str | None, image_uri: str | None) -> None:
        """Load what changed; the swap is one assignment, so a running batch keeps its engine."""
        if text_uri is None and image_uri is None:
            raise ValueError("serve.artifact or serve.image_artifact must name an artifact to serve")
        if text_uri != self.text_uri:
            self.text = self._engine(text_uri, "text") if text_uri else None
            self.text_uri = text_uri
        if image_uri != self.image_uri:
            self.image = self._engine(image_uri, "image") if image_uri else None
            self.image_uri = image_uri

    def _engine(self, uri: str, route: str) -> Any:
        """The engine its kind's ModelSpec opens on the artifact, for the text or the image routes."""
        import torch

        spec = model_spec(artifact_kind(uri, self.storage))
        if spec.modality != route:
            field = "serve.artifact" if route == "text" else "serve.image_artifact"
            raise ArtifactError(f"{field}: {uri} is a {spec.kind} artifact (a {spec.modality} model), not a "
                                f"{route} model")
        device = "cuda" if self.limits.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        return spec.part("engine")(uri, self.storage, device=device, max_batch_size=self.limits.max_batch_size,
                                   **self.limits.engine.options())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"user_config keys {unknown} are not reconfigurable; allowed: {list(USER_CONFIG_KEYS)}")
        self.limits = ServeConfig.model_validate({**self.limits.model_dump(), **user_config})
        await asyncio.to_thread(self._load, self.limits.artifact, self.limits.image_artifact)
        for engine in (self.text, self.image):
            if engine is not None:
                engine.max_batch_size = self.limits.max_batch_size
        if self.live is not None:  # its streams end on the engine they started with; the next ones get a new loop,
            self.live.close()  # with the new engine and max_batch_size
            self.live = None
        for batched in (self._generate_batch, self._images_batch):
            batched.set_max_batch_size(self.limits.max_batch_size)
            batched.set_batch_wait_timeout_s(self.limits.batch_wait_timeout_s)
        log.info("reconfigured: text=%s image=%s, max_batch_size=%d, batch_wait_timeout_s=%s", self.text_uri,
                 self.image_uri, self.limits.max_batch_size, self.limits.batch_wait_timeout_s)

    # -- batched generation ---------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, requests: list[TextRequest]) -> list[tuple[TextResult, ModelInfo]]:
        assert self.text is not None  # checked by the route before it enqueues
        return self._decode("text", self.text, requests)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _images_batch(self, requests: list[ImageRequest]) -> list[tuple[Any, ModelInfo]]:
        assert self.image is not None
        return self._decode("image", self.image, requests)

    def _decode(self, kind: str, engine: TextEngine | ImageEngine, requests: list[Any]) -> list[tuple[Any, ModelInfo]]:
        """One forward-pass batch, with its counters; each result is paired with the model that made it.

        Decoded on the event loop, not in a worker thread: the small model's decode is Python-bound,
        and a thread holding the GIL starves the loop that parses incoming requests, so the next batch
        never fills (measured: mean batch 1.1 and no gain over max_batch_size 1 at 32 concurrent
        clients, against 9.6 and 3x inline). Serve runs this loop on its own thread, so health checks
        and admission control (the 503s) go on during a batch.
        """
        started = time.perf_counter()
        results = engine.generate(requests)
        info = model_info(engine.artifact)
        self._count_batch(kind, info, results, time.perf_counter() - started)
        return [(result, info) for result in results]

    def _count_batch(self, kind: str, info: ModelInfo, results: list[Any], seconds: float) -> None:
        """A decoded batch's counters (`stats`, shown by GET /v1/models) and metrics; streamed ones too."""
        self.stats[f"{kind}_batches"] += 1
        self.stats[f"{kind}_requests"] += len(results)
        self.metrics.observe("aigc_generate_batch_size_rows", len(results), model=info.name)
        self.metrics.observe("aigc_generate_batch_seconds", seconds, model=info.name)
        if kind == "text":
            self.metrics.inc("aigc_generated_tokens_total", sum(r.num_tokens for r in results), model=info.name)
            self.stats.update(f"text_finish_{r.finish_reason}" for r in results if r.finish_reason)
        else:
            self.metrics.inc("aigc_generated_images_total", sum(r.error is None for r in results), model=info.name)

    # -- routes ---------------------------------------------------------------------------------

    @api.post("/v1/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
    async def generate(self, body: GenerateBody) -> GenerateResponse:
        """Copy for each request, in order. Same features + sampling + seed -> the backfill's copy."""
        if self.text is None:
            raise HTTPException(404, "no text model is served here (serve.artifact is not set)")
        problems = check_generate_limits(body, self.limits)
        if problems:
            raise RequestValidationError(problems)
        requests = []
        for index, item in enumerate(body.requests):
            try:
                user = self.users.resolve(item.user_id, item.user)
                features = self.items.resolve(item.item_id, item.item)
            except UnknownIdError as exc:
                raise HTTPException(404, f"requests[{index}]: {exc}") from None
            except InvalidProfileError as exc:
                raise RequestValidationError([violation(["requests", index, f"{exc.side}_id"], str(exc),
                                                        exc.key)]) from None
            sampling = SamplingParams(max_new_tokens=effective_max_new_tokens(item, self.limits),
                                      temperature=item.temperature, top_k=item.top_k, top_p=item.top_p)
            requests.append(TextRequest(user=user, item=features, seed=item.seed, sampling=sampling))
        # A refusal names the ids too: a prompt that cannot be built from a table's row says whose row it is.
        names = [", ".join(f"{key} {value!r}" for key, value in (("user_id", item.user_id), ("item_id", item.item_id))
                           if value is not None) for item in body.requests]
        results, model = await self._answer("text", self._generate_batch, requests, names)
        return GenerateResponse(model=model, results=[
            GenerateResult(content=result.text, num_tokens=result.num_tokens, finished=result.finished,
                           seed=item.seed, user_id=item.user_id, item_id=item.item_id)
            for result, item in zip(results, body.requests, strict=True)])

    @api.post("/v1/images", response_model=ImagesResponse, responses=ERROR_RESPONSES)
    async def images(self, body: ImagesBody) -> ImagesResponse:
        """A PNG for each request, in order: the class by id or by one of the artifact's label names."""
        if self.image is None:
            raise HTTPException(404, "no image model is served here (serve.image_artifact is not set)")
        problems = check_images_limits(body, self.limits)
        if problems:
            raise RequestValidationError(problems)
        names = list(self.image.artifact.conditioning.get("labels", []))
        requests = []
        for index, item in enumerate(body.requests):
            label = item.label
            if isinstance(label, str):
                if label not in names:
                    known = f"ids 0..{self.image.config.num_classes - 1} and names {names}"
                    raise RequestValidationError([violation(["requests", index, "label"],
                                                            f"unknown label; the model knows {known}", label)])
                label = names.index(label)
            requests.append(ImageRequest(label=label, features=item.features, seed=item.seed))
        results, model = await self._answer("image", self._images_batch, requests)
        return ImagesResponse(model=model, results=[
            ImageResult(png_base64=base64.b64encode(result.png).decode("ascii"), width=result.width,
                        height=result.height, label=request.label, seed=request.seed)
            for result, request in zip(results, requests, strict=True)])

    async def _decode_all(self, kind: str, batched: Any, requests: list[Any]) -> tuple[list[Any], ModelInfo]:
        """Each request through its `@serve.batch` method (concurrent calls share batches); the results in
        order, errors included, and the model that made them."""
        answered = await asyncio.gather(*(batched(request) for request in requests))
        model = answered[0][1]
        failed = sum(1 for result, _ in answered if result.error)
        self.metrics.inc("aigc_generate_rows_total", len(answered) - failed, model=model.name, status="ok")
        self.metrics.inc("aigc_generate_rows_total", failed, model=model.name, status="error")
        return [result for result, _ in answered], model

    async def _answer(self, kind: str, batched: Any, requests: list[Any], names: list[str] | None = None
                      ) -> tuple[list[Any], ModelInfo]:
        """`_decode_all`, where one request the engine refuses makes the call a 422 naming it (and
        `names[i]`, when given), while the calls it shared a batch with get their answers."""
        results, model = await self._decode_all(kind, batched, requests)
        failed = [violation(["requests", i], f"{names[i]}: {result.error}" if names and names[i] else result.error,
                            None) for i, result in enumerate(results) if result.error]
        if failed:
            raise RequestValidationError(failed)
        return results, model

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        loaded = [engine.artifact for engine in (self.text, self.image) if engine is not None]
        return ModelsResponse(models=[model_info(a) for a in loaded], stats={**self.stats, **self.live_stats()},
                              data=[openai_model(a) for a in loaded])

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        models = [model_info(e.artifact).model_dump() for e in (self.text, self.image) if e is not None]
        return JSONResponse(status_code=200 if models else 503,
                            content={"status": "ok" if models else "no model loaded", "models": models})


def deployment_options(limits: ServeConfig) -> dict[str, Any]:
    """Serve deployment options from the [serve] section: replicas, resources, admission control."""
    options: dict[str, Any] = {
        "max_ongoing_requests": limits.max_ongoing_requests,
        "max_queued_requests": limits.max_queued_requests,
        "backpressure_config": {"retry_after_s": limits.retry_after_s},
        "ray_actor_options": {"num_cpus": limits.cpus_per_replica, "num_gpus": limits.gpus_per_replica},
        "user_config": {key: getattr(limits, key) for key in USER_CONFIG_KEYS},
    }
    if limits.min_replicas == limits.max_replicas:
        options["num_replicas"] = limits.max_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": limits.min_replicas, "max_replicas": limits.max_replicas,
                                         "target_ongoing_requests": limits.target_ongoing_requests}
    return options


def application(cfg: AigcConfig, runtime_env: dict[str, Any] | None = None) -> serve.Application:
    """The bound application for a resolved config (the CLI and `build_app` both end here).

    `runtime_env`: the replicas' Ray runtime environment (e.g. `env_vars`), as a Serve config file's
    `runtime_env` gives it; by default they inherit the Ray node's environment.
    """
    if cfg.serve.artifact is None and cfg.serve.image_artifact is None:
        from aigc_dist.config import ConfigError

        raise ConfigError(["serve.artifact or serve.image_artifact must name an artifact to serve (got neither)"])
    dumped = cfg.model_dump(mode="json")
    storage = cfg.storage.model_dump()  # secrets as SecretStr would not survive JSON: keep the objects' values
    for key in ("access_key_id", "secret_access_key", "session_token"):
        secret = getattr(cfg.storage, key)
        storage[key] = secret.get_secret_value() if secret is not None else None
    init_serve = {key: value for key, value in dumped["serve"].items() if key not in USER_CONFIG_KEYS}
    options = deployment_options(cfg.serve)
    if runtime_env is not None:
        options["ray_actor_options"]["runtime_env"] = runtime_env
    return AigcServe.options(**options).bind(init_serve, dumped["data"], storage)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run|deploy` and KubeRay's serveConfigV2.

    args: `config` (a TOML/YAML file of the config tree), section dicts that override it
    (`serve: {artifact: s3://...}`), and/or dotted `section.key: value` overrides as
    `serve run aigc_dist.serve.app:build_app serve.artifact=s3://...` passes them.
    """
    args = dict(args or {})
    path = args.pop("config", None)
    data = read_config_file(path) if path else {}
    dotted = [f"--{key}={value}" for key, value in args.items() if "." in key]
    sections = {key: value for key, value in args.items() if "." not in key}
    data = merge(merge(data, sections), parse_overrides(dotted))
    return application(validate_config(data))
