"""Batched personalized copy generation on a loaded LM artifact.

The one engine both the Ray Data backfill actors and the Ray Serve replicas call, so a request with
the same features, sampling parameters and seed gets the same copy offline and online.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from aigc_dist.data.prompts import (
    CHAT_ROLES,
    PromptError,
    PromptTemplate,
    encode_chat,
    encode_prompt,
    encode_text,
    layout_overhead,
)
from aigc_dist.engine.cpu_layout import prepare_for_decode
from aigc_dist.engine.decode import DecodeRequest, decode_live, decode_steps, decode_stream
from aigc_dist.engine.live import LiveRequest, RequestFeed
from aigc_dist.engine.streaming import StreamedText, check_stop
from aigc_dist.models.artifact import PROMPT_TEMPLATE_KEY, Artifact, ArtifactError, ArtifactStore, load_artifact
from aigc_dist.models.tokenizer import SPECIAL_TOKENS, TextTokenizer


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request. temperature=0 is greedy."""

    max_new_tokens: int = 96
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")


NO_CHAT_TEMPLATE = "the model has no chat template; use /v1/completions or the aigc extension"


@dataclass
class TextRequest:
    """One request: what to continue, how to sample, with which seed, and where to stop.

    What the model continues is one of three things:
    - `user` and `item` features (the default, personalized copy): the prompt rendered from them by the
      artifact's `PromptTemplate`, as in training.
    - `prompt`, raw text (OpenAI completions): the tokenizer's BOS when it has one, then the text
      encoded as-is; no special tokens are read from it ("<eos>" in the text is text). user/item are
      not used.
    - `messages`, a chat conversation (OpenAI chat completions): rendered by the checkpoint's chat
      template (tokenizer_config.json's chat_template) with the generation prompt, the contents encoded
      as plain text so that no content can forge a turn. A model without a chat template answers the
      request with `error` = NO_CHAT_TEMPLATE. user/item are not used.
    At most one of `prompt` and `messages` may be set (ValueError otherwise); `max_prompt_tokens` of
    the template applies to features only, the context window to all three. `prompt_ids`, when given,
    are the features' prompt already encoded by this artifact's template and tokenizer (the backfill's
    preparer does it once per row, to check it fits the context); the engine uses them as they are.
    """

    user: Mapping[str, Any] = field(default_factory=dict)
    item: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    """The request's random numbers: the same seed gives the same text whatever the batch. Choice i of
    an OpenAI request with n choices uses seed + i (callers send n requests; the engine knows no n)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    """Raw text to continue (see above)."""
    messages: Sequence[Mapping[str, str]] | None = None
    """Chat messages, each {"role": "system" | "user" | "assistant", "content": str}; other keys are ignored."""
    prompt_ids: Sequence[int] | None = None
    """The features' prompt as token ids, encoded by the caller with the artifact's template and tokenizer."""
    stop: tuple[str, ...] = ()
    """Up to 4 non-empty stop strings, matched on the decoded text: the request ends as soon as its text
    holds one, and its text is cut just before the first occurrence (finish_reason "stop")."""

    def __post_init__(self) -> None:
        if self.prompt is not None and self.messages is not None:
            raise ValueError("a TextRequest takes prompt or messages, not both")
        if self.prompt_ids is not None and (self.prompt is not None or self.messages is not None):
            raise ValueError("prompt_ids are the features' prompt: a TextRequest with prompt or messages takes none")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string (got {type(self.prompt).__name__})")
        if self.messages is not None:
            if isinstance(self.messages, str | Mapping) or not self.messages:
                raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
            for k, m in enumerate(self.messages):
                if not isinstance(m, Mapping) or m.get("role") not in CHAT_ROLES or not isinstance(
                        m.get("content"), str):  # fmt: skip
                    raise ValueError(f"messages[{k}] must have a role in {', '.join(CHAT_ROLES)} and a string "
                                     f"content (got {m!r})")
            self.messages = tuple({"role": m["role"], "content": m["content"]} for m in self.messages)
        self.stop = check_stop(self.stop)


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class TextResult:
    """The text for one request, or the reason there is none (`error`, with `text` empty)."""

    text: str = ""
    num_tokens: int = 0  # generated tokens, EOS excluded (with a stop string: up to the one that completed it)
    prompt_tokens: int = 0
    finished: bool = False  # True when the model ended the copy (EOS or a stop string): finish_reason == "stop"
    error: str | None = None
    finish_reason: FinishReason | None = None
    """"stop": EOS or a stop string; "length": max_new_tokens reached; "cancelled": ended by the caller
    of `TextEngine.stream` (its `cancelled` said so), text is what was generated until then; None when
    `error` is set."""


@dataclass
class TextDelta:
    """A piece of one request's text from `TextEngine.stream`: `index` is its position in the requests;
    `result` is set on the request's last delta only (then `result.text` is the whole text)."""

    index: int
    text: str
    result: TextResult | None = None


def prompt_template_of(artifact: Artifact) -> PromptTemplate:
    """The template the artifact was trained with (prompts must be rendered exactly the same way)."""
    raw = artifact.conditioning.get(PROMPT_TEMPLATE_KEY)
    if raw is None:
        raise ArtifactError(f"artifact {artifact.label} has no conditioning.{PROMPT_TEMPLATE_KEY}")
    return PromptTemplate(**raw)


def check_template_fits(template: PromptTemplate, tokenizer: TextTokenizer) -> None:
    """ArtifactError naming the missing tokens when a "markers" template meets a tokenizer without them
    (a checkpoint the user brought): say to use the "text" layout instead."""
    if template.layout == "chat":
        try:
            layout_overhead(tokenizer, "chat")
        except PromptError as exc:
            raise ArtifactError(str(exc)) from None
        return
    if template.layout != "markers":
        return
    missing = [t for t in SPECIAL_TOKENS[1:] if tokenizer.token_id(t) is None]
    if missing:
        raise ArtifactError(f"{tokenizer.source}: tokenizer.json has no {', '.join(missing)} for the prompt "
                            "template's layout 'markers'; set data.template.layout = \"text\" for this checkpoint")


def prompt_conditioning(template: PromptTemplate) -> dict[str, Any]:
    """What an LM's metadata.json records so the engine renders prompts exactly as training did."""
    return {PROMPT_TEMPLATE_KEY: asdict(template)}


class TextEngine:
    """Turns `TextRequest`s into copy: render prompts, schedule them through decode slots, detokenize.

    scheduling="continuous" (default): iteration-level scheduling; `max_batch_size` slots decode
    together and a slot freed by a finished request takes the next waiting one at once, whatever its
    sampling parameters. "static": batches of `max_batch_size` requests in arrival order, each run
    until its longest request ends (the baseline `benchmarks/engine_batching.py` measures against).
    Either way a request's copy depends only on its features, sampling parameters and seed.
    """

    def __init__(
        self,
        artifact: Artifact,
        max_batch_size: int = 64,
        num_threads: int | None = None,
        scheduling: Literal["continuous", "static"] = "continuous",
    ):
        if artifact.kind != "lm" or artifact.tokenizer is None:
            raise ArtifactError(f"TextEngine needs an lm artifact with a tokenizer (got kind {artifact.kind!r})")
        if scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static' (got {scheduling!r})")
        if num_threads is not None:
            # The process's share of cores: actors and replicas set it so co-located ones don't fight.
            torch.set_num_threads(num_threads)
        self.artifact = artifact
        self.tokenizer = artifact.tokenizer
        self.template = prompt_template_of(artifact)
        self.max_batch_size = max_batch_size
        self.scheduling = scheduling
        self.context = artifact.model_config.max_position_embeddings
        check_template_fits(self.template, self.tokenizer)
        eos = self.tokenizer.eos_id
        # Generation stops at any of the checkpoint's EOS ids (Qwen2 has two) and the tokenizer's.
        self.eos_ids = sorted(set(artifact.model_config.eos_token_id) | ({eos} if eos is not None else set()))
        self.model = self._decoder(artifact)

    def _decoder(self, artifact: Artifact) -> Any:
        """What decodes: the artifact's module laid out for decoding (vllm_engine.py: vLLM's engine)."""
        return prepare_for_decode(artifact.model)

    @classmethod
    def from_uri(cls, uri: str, store: ArtifactStore, **kwargs: Any) -> TextEngine:
        return cls(load_artifact(uri, store), **kwargs)

    @property
    def max_new_tokens_limit(self) -> int:
        """Longest continuation of the shortest possible prompt the context window admits."""
        return self.context - 1

    def generate(self, requests: Sequence[TextRequest]) -> list[TextResult]:
        """One result per request, in order. A request that cannot be served (missing required
        feature, no chat template, prompt + max_new_tokens over the context) gets `error` set; the
        others proceed."""
        results: list[TextResult] = [TextResult() for _ in requests]
        for delta in self._run(requests, None, stepwise=any(r.stop for r in requests)):
            if delta.result is not None:
                results[delta.index] = delta.result
        return results

    def stream(self, requests: Sequence[TextRequest],
               cancelled: Callable[[int], bool] | None = None) -> Iterator[TextDelta]:  # fmt: skip
        """`generate` delta by delta, as decode steps produce the text (requests interleaved).

        Each request's deltas, concatenated, are the text `generate` gives it (the same seed, whatever
        the batch), and its last delta carries its `result`, equal to `generate`'s. A delta never
        splits a character and never holds text that may turn out to begin a stop string (it waits
        until it cannot); deltas with no text are not sent, except a last one. A request that fails
        before decoding gets one delta: empty text, the result with `error`.
        cancelled(index), when given, is asked once per decode step for each request still decoding;
        True ends it at that step (its slot takes the next waiting request) with a last delta whose
        result has finish_reason "cancelled" and the text generated until then.
        """
        return self._run(requests, cancelled, stepwise=True)

    def run_live(self, feed: RequestFeed, on_step: Callable[[int], None] | None = None) -> None:
        """Decode the feed's requests as they arrive, until it is closed and all it gave have ended.

        Each request joins the running batch at the next decode step (up to `max_batch_size` at once;
        the others wait in the feed) and gets `stream`'s deltas for it, in order, through its
        `deliver`: the same text and result as `stream` or `generate` for the same seed. `cancelled()`
        ends it at a step. on_step(rows), when given, is called each decode step with the number of
        requests decoding (how full the batch runs). An exception here closes the feed and is
        delivered to every request it holds or still queues, then raised.
        """
        jobs: dict[int, tuple[LiveRequest, StreamedText, TextResult, int]] = {}

        def arrivals() -> Iterator[DecodeRequest | None]:
            while True:
                live = feed.take(block=not jobs)  # nothing decoding: wait for the next request
                if live is None:
                    if feed.closed:
                        return
                    yield None
                    continue
                result, decode = self._prepare_one(live.request)
                if decode is None:
                    live.deliver(TextDelta(0, "", result))
                    continue
                jobs[next(numbers)] = (live, StreamedText(self.tokenizer, live.request.stop), result,
                                              decode.max_new_tokens)
                yield decode

        numbers = itertools.count()  # decode_live's index of each request it is given
        end: set[int] = set()
        try:
            for events in decode_live(self.model, arrivals(), self.max_batch_size, self.eos_ids, end=end):
                if on_step is not None:
                    on_step(len(events))
                for j, tokens, done in events:
                    job = jobs.get(j)
                    if job is None:
                        continue
                    live, text, result, max_new_tokens = job
                    piece, reason = self._advance(text, tokens, done, max_new_tokens, live.cancelled())
                    if reason is None:
                        if piece:
                            live.deliver(TextDelta(0, piece, None))
                        continue
                    if not done:
                        end.add(j)
                    del jobs[j]
                    live.deliver(TextDelta(0, piece, self._finish(result, text, reason)))
        except BaseException as exc:
            feed.close()
            for live in [job[0] for job in jobs.values()] + feed.drain():
                live.deliver(exc)
            raise

    def _encode(self, request: TextRequest) -> list[int]:
        if request.prompt is not None:
            return encode_text(request.prompt, self.tokenizer)
        if request.messages is not None:
            return encode_chat(request.messages, self.tokenizer)
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        return encode_prompt(request.user, request.item, self.template, self.tokenizer)

    def _prepare(self, requests: Sequence[TextRequest]) -> tuple[list[TextResult], list[DecodeRequest], list[int]]:
        """Results (errors filled in), the decode requests of the servable ones, and where[j]: the
        request decode[j] serves."""
        results: list[TextResult] = []
        decode: list[DecodeRequest] = []
        where: list[int] = []
        for index, request in enumerate(requests):
            result, one = self._prepare_one(request)
            results.append(result)
            if one is not None:
                decode.append(one)
                where.append(index)
        return results, decode, where

    def _prepare_one(self, request: TextRequest) -> tuple[TextResult, DecodeRequest | None]:
        """The request's result (its `error` when it cannot be served) and what to decode for it."""
        result = TextResult()
        if request.messages is not None and self.tokenizer.chat_template is None:
            result.error = NO_CHAT_TEMPLATE
            return result, None
        try:
            prompt = self._encode(request)
        except (PromptError, UnicodeError) as exc:  # a lone surrogate in a value cannot be encoded
            result.error = f"prompt: {exc}"
            return result, None
        if not prompt:
            result.error = "prompt: the text is empty and the tokenizer has no BOS to start from"
            return result, None
        room = self.context - len(prompt)
        sampling = request.sampling
        if sampling.max_new_tokens > room:
            result.error = (f"prompt of {len(prompt)} tokens + max_new_tokens={sampling.max_new_tokens} "
                            f"exceeds the model's context of {self.context}")
            return result, None
        decode = DecodeRequest(prompt, sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                               request.seed)
        try:  # here, not in the decode loop, where it would fail the batch (a live one: every stream)
            decode.check(self.artifact.model_config, "request")
        except ValueError as exc:
            result.error = str(exc)
            return result, None
        result.prompt_tokens = len(prompt)
        return result, decode

    def _run(self, requests: Sequence[TextRequest], cancelled: Callable[[int], bool] | None,
             stepwise: bool) -> Iterator[TextDelta]:  # fmt: skip
        """Deltas of all requests: those that cannot be served first, then the decoded ones."""
        results, decode, where = self._prepare(requests)
        for index, result in enumerate(results):
            if result.error is not None:
                yield TextDelta(index, "", result)
        if decode:
            yield from self._decoded(requests, results, decode, where, cancelled, stepwise)

    def _decoded(self, requests: Sequence[TextRequest], results: list[TextResult], decode: list[DecodeRequest],
                 where: list[int], cancelled: Callable[[int], bool] | None, stepwise: bool) -> Iterator[TextDelta]:
        """The decoded requests' deltas. stepwise=False: one delta per request, when it ends (decode_stream,
        no per-step host sync); True: per decode step (decode_steps), needed for stop strings."""
        schedule = dict(slots=min(self.max_batch_size, len(decode)), eos_ids=self.eos_ids,
                        refill=self.scheduling == "continuous",
                        max_len=max(len(r.prompt) + r.max_new_tokens for r in decode))  # fmt: skip
        if not stepwise:
            for j, tokens in decode_stream(self.model, decode, **schedule):
                result = results[where[j]]
                result.text = self.tokenizer.decode(tokens)
                result.num_tokens = len(tokens)
                self._close(result, "stop" if len(tokens) < decode[j].max_new_tokens else "length")
                yield TextDelta(where[j], result.text, result)
            return
        end: set[int] = set()  # decode_steps ends these before their next token
        texts: dict[int, StreamedText] = {}
        closed: set[int] = set()  # answered already (stop string, cancelled): later events are ignored
        for events in decode_steps(self.model, decode, end=end, **schedule):
            for j, tokens, done in events:
                if j in closed:
                    continue
                text = texts.get(j)
                if text is None:
                    text = texts[j] = StreamedText(self.tokenizer, requests[where[j]].stop)
                piece, reason = self._advance(text, tokens, done, decode[j].max_new_tokens,
                                              cancelled is not None and cancelled(where[j]))
                if reason is None:
                    if piece:
                        yield TextDelta(where[j], piece, None)
                    continue
                if not done:  # a stop string or a cancel: the decoder ends it before its next token
                    end.add(j)
                closed.add(j)
                del texts[j]
                yield TextDelta(where[j], piece, self._finish(results[where[j]], text, reason))

    def _advance(self, text: StreamedText, tokens: list[int], done: bool, max_new_tokens: int,
                 cancelled: bool) -> tuple[str, FinishReason | None]:  # fmt: skip
        """One decode event of a request: the text it releases, and why the request ends now (None: it
        goes on). A stop string or a cancel ends it before the decoder would; the caller stops decoding
        it then. The text of an ending request includes the rest `StreamedText.finish` releases."""
        piece = text.push(tokens)
        if text.stopped:
            reason: FinishReason = "stop"
        elif done:
            reason = "stop" if text.num_tokens < max_new_tokens else "length"
        elif cancelled:
            reason = "cancelled"
        else:
            return piece, None
        return piece + text.finish(), reason

    def _finish(self, result: TextResult, text: StreamedText, reason: FinishReason) -> TextResult:
        result.text, result.num_tokens = text.shown, text.num_tokens
        self._close(result, reason)
        return result

    @staticmethod
    def _close(result: TextResult, reason: FinishReason) -> None:
        result.finish_reason, result.finished = reason, reason == "stop"
