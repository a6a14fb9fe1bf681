"""Batched personalized copy generation on a loaded LM artifact.

The one engine both the Ray Data backfill actors and the Ray Serve replicas call, so a request with
the same features, sampling parameters and seed gets the same copy offline and online.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from aigc_dist.data.prompts import PromptError, PromptTemplate, encode_prompt, layout_overhead
from aigc_dist.engine.cpu_layout import prepare_for_decode
from aigc_dist.engine.decode import DecodeRequest, decode_stream
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


@dataclass
class TextRequest:
    """One personalized request: whose feed, which item, how to sample, with which seed."""

    user: Mapping[str, Any]
    item: Mapping[str, Any]
    seed: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class TextResult:
    """The copy for one request, or the reason there is none (`error`, with `text` empty)."""

    text: str = ""
    num_tokens: int = 0  # generated tokens, EOS excluded
    prompt_tokens: int = 0
    finished: bool = False  # True when the model ended the copy (EOS), False when cut at max_new_tokens
    error: str | None = None


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
        self.model = prepare_for_decode(artifact.model)
        self.tokenizer = artifact.tokenizer
        self.template = prompt_template_of(artifact)
        self.max_batch_size = max_batch_size
        self.scheduling = scheduling
        self.context = self.model.config.max_position_embeddings
        check_template_fits(self.template, self.tokenizer)
        eos = self.tokenizer.eos_id
        # Generation stops at any of the checkpoint's EOS ids (Qwen2 has two) and the tokenizer's.
        self.eos_ids = sorted(set(self.model.config.eos_token_id) | ({eos} if eos is not None else set()))

    @classmethod
    def from_uri(cls, uri: str, store: ArtifactStore, **kwargs: Any) -> TextEngine:
        return cls(load_artifact(uri, store), **kwargs)

    @property
    def max_new_tokens_limit(self) -> int:
        """Longest continuation of the shortest possible prompt the context window admits."""
        return self.context - 1

    def generate(self, requests: Sequence[TextRequest]) -> list[TextResult]:
        """One result per request, in order. A request that cannot be served (missing required
        feature, prompt + max_new_tokens over the context) gets `error` set; the others proceed."""
        results = [TextResult() for _ in requests]
        decode: list[DecodeRequest] = []
        where: list[int] = []  # decode[j] serves requests[where[j]]
        for index, request in enumerate(requests):
            try:
                prompt = encode_prompt(request.user, request.item, self.template, self.tokenizer)
            except (PromptError, UnicodeError) as exc:  # a lone surrogate in a value cannot be encoded
                results[index].error = f"prompt: {exc}"
                continue
            room = self.context - len(prompt)
            sampling = request.sampling
            if sampling.max_new_tokens > room:
                results[index].error = (
                    f"prompt of {len(prompt)} tokens + max_new_tokens={sampling.max_new_tokens} "
                    f"exceeds the model's context of {self.context}"
                )
                continue
            results[index].prompt_tokens = len(prompt)
            decode.append(DecodeRequest(prompt, sampling.max_new_tokens, sampling.temperature, sampling.top_k,
                                        sampling.top_p, request.seed))
            where.append(index)
        if not decode:
            return results
        outputs = decode_stream(
            self.model,
            decode,
            slots=min(self.max_batch_size, len(decode)),
            eos_ids=self.eos_ids,
            refill=self.scheduling == "continuous",
            max_len=max(len(r.prompt) + r.max_new_tokens for r in decode),
        )
        for j, tokens in outputs:
            result = results[where[j]]
            result.text = self.tokenizer.decode(tokens)
            result.num_tokens = len(tokens)
            result.finished = len(tokens) < decode[j].max_new_tokens
        return results
