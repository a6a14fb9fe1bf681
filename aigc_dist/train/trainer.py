"""`run_training`: one Ray Train `TorchTrainer` run of a generator under DeepSpeed.

The driver checks everything it can before any worker starts (the DeepSpeed mapping, presets, the
dataset, the checkpoint to resume), builds the Ray Dataset of examples, and hands each worker a
plain dict of its config sections (`loop.WorkerSettings`). Workers stream their shard, step, save
checkpoints to `<storage_path>/<run_name>/` and, at the end, export the artifact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aigc_dist.config import ConfigError, DataConfig, DeepSpeedConfig, ModelConfig, StorageConfig, TrainConfig
from aigc_dist.storage import Storage, join_uri, parse_uri
from aigc_dist.train.checkpoints import check_resumable, find_checkpoint, read_trainer_state
from aigc_dist.train.deepspeed_config import deepspeed_config
from aigc_dist.train.generators import make_recipe
from aigc_dist.train.loop import WorkerSettings, train_loop_per_worker
from aigc_dist.train.sources import absolute_source

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """What a finished run produced."""

    run_name: str
    step: int  # optimizer steps done in total (across restarts and resumed runs)
    attempt_starts: list[int]  # step at which each start began: [0] fresh, [0, 50] one restart or resume at 50
    history: list[dict[str, float]] = field(default_factory=list)  # progress records, oldest first
    checkpoint_uri: str | None = None  # the newest checkpoint
    artifact_uri: str | None = None  # None when train.export_at_end is false
    metrics: dict[str, Any] = field(default_factory=dict)  # the last progress record

    @property
    def losses(self) -> list[float]:
        return [record["loss"] for record in self.history]


class WorkersFailedError(RuntimeError):
    """The run's workers failed more often than `train.max_failures` lets Ray Train restart them."""

    def __init__(self, train: TrainConfig, cause: Exception):
        # Ray Train raises only once a failure is one more than it may retry (-1 never raises).
        times = train.max_failures + 1
        super().__init__(
            f"train {train.run_name}: the workers failed {times} time{'s' if times != 1 else ''} "
            f"(train.max_failures={train.max_failures}), so Ray Train stopped restarting them; {cause}"
        )


def _ensure_ray(train: TrainConfig) -> None:
    """Join the cluster in RAY_ADDRESS (`ray job submit` sets it), else start a local Ray with room
    for the workers plus Ray Data's read and tokenize tasks: on a small machine the workers would
    otherwise hold every CPU and starve the pipeline that feeds them."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    needed = math.ceil(train.num_workers * train.cpus_per_worker) + 2
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed))


def resolve_use_gpu(train: TrainConfig) -> bool:
    """`auto` means: when the Ray cluster has GPUs."""
    import ray

    if train.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(train.use_gpu)


def run_training(
    train: TrainConfig,
    deepspeed: DeepSpeedConfig,
    model: ModelConfig,
    data: DataConfig,
    storage_config: StorageConfig,
) -> TrainingResult:
    """Train `model` on `train.dataset` with `train.num_workers` Ray Train workers; see the module doc.

    Uses the running Ray, else the cluster in `RAY_ADDRESS`, else starts a local one.
    Raises `ConfigError` for settings that cannot work, and `WorkersFailedError` (from Ray's
    `WorkerGroupError`, what each rank reported) when the workers fail more than `train.max_failures` times.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    train, data = _absolute_locations(train, data)
    model = model.model_copy(update={"source": absolute_source(model.source)})
    # Config errors first, before Ray or any worker starts.
    recipe = make_recipe(model, data, train, storage=storage_config)
    if not train.dataset:
        raise ConfigError("train.dataset: required (parquet path or s3:// URI of the training examples)")
    storage = Storage(storage_config)
    resume_from = _checked_resume(train, deepspeed, recipe.kind, storage)
    _ensure_ray(train)
    on_gpu = resolve_use_gpu(train)
    deepspeed_config(train, deepspeed, world_size=train.num_workers, on_gpu=on_gpu)
    dataset = recipe.dataset(train, data, storage_config)
    dataset.context.enable_progress_bars = False  # the progress line says how training goes

    fs, path = storage.filesystem(train.storage_path)
    settings = WorkerSettings(train, deepspeed, model, data, storage_config, on_gpu, resume_from)
    resources = {"CPU": train.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=on_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=train.run_name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
        ),
        datasets={"train": dataset},
        # preserve_order: the same rows reach the same rank in the same order on every run, which
        # makes runs reproducible and lets a restart skip exactly the batches already trained on.
        dataset_config=ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    run_dir = join_uri(train.storage_path, train.run_name)
    log.info(
        "training %s (%s) with %d workers, ZeRO-%d, checkpoints under %s",
        train.run_name, model.kind, train.num_workers, deepspeed.zero_stage, run_dir,
    )  # fmt: skip
    try:
        with _sigterm_aborts_run():
            result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        raise WorkersFailedError(train, exc) from exc
    summary = result.return_value or {}
    checkpoint_uri = None
    if result.checkpoint is not None:
        scheme = "s3://" if train.storage_path.startswith("s3://") else ""
        checkpoint_uri = scheme + result.checkpoint.path
    history = summary.get("history", [])
    return TrainingResult(
        run_name=train.run_name,
        step=summary.get("step", 0),
        attempt_starts=summary.get("attempt_starts", []),
        history=history,
        checkpoint_uri=checkpoint_uri,
        artifact_uri=summary.get("artifact_uri"),
        metrics=history[-1] if history else {},
    )


@contextlib.contextmanager
def _sigterm_aborts_run() -> Iterator[None]:
    """SIGTERM (`ray job stop`, `aigc-dist jobs stop`, a Kubernetes pod's end) aborts the run as Ctrl-C does.

    `fit()` registers Ray Train's SIGINT handler, which asks the TrainController to abort: it stops its
    placement-group cleaner, kills the workers and ends, marking the run ABORTED. On SIGTERM Ray's own
    handler only exits the driver, leaving the controller to die with its owner and its detached
    placement-group cleaner to notice that by itself (which fails, and lingers, where two Ray instances
    share a machine). The handler is called directly: Ray blocks SIGINT in a job's driver.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def abort(signum: int, frame: Any) -> None:
        on_interrupt = signal.getsignal(signal.SIGINT)
        if callable(on_interrupt) and on_interrupt is not signal.default_int_handler:  # fit() has started
            log.warning("SIGTERM: aborting the training run (its controller and workers)")
            with contextlib.suppress(SystemExit):  # Ray Train's handler exits 0 once the controller is gone
                on_interrupt(signal.SIGINT, frame)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, abort)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _absolute_locations(train: TrainConfig, data: DataConfig) -> tuple[TrainConfig, DataConfig]:
    """Local paths made absolute here, on the driver: a Ray Train worker runs in a directory of its
    own (Ray changes into the run's artifact directory), where a relative path means somewhere else."""

    def absolute(uri: str | None) -> str | None:
        return parse_uri(uri).uri if uri else uri

    train_paths, data_paths = ("storage_path", "dataset", "resume_from"), ("users", "items", "candidates", "requests")
    train = train.model_copy(update={k: absolute(getattr(train, k)) for k in train_paths})
    data = data.model_copy(update={k: absolute(getattr(data, k)) for k in data_paths})
    return train, data


def _checked_resume(train: TrainConfig, deepspeed: DeepSpeedConfig, kind: str, storage: Storage) -> str | None:
    """The resolved `train.resume_from` checkpoint, and a check on the driver that the checkpoint
    the run will start from (its own newest one, else that) fits this config, so a mismatch fails
    before any worker starts."""
    resume_from = find_checkpoint(train.resume_from, storage) if train.resume_from else None
    try:
        start, source = find_checkpoint(join_uri(train.storage_path, train.run_name), storage), "the run's checkpoint"
    except ConfigError:
        start, source = resume_from, str(train.resume_from)
    if start is not None:
        check_resumable(
            read_trainer_state(start, storage), kind=kind, world_size=train.num_workers,
            zero_stage=deepspeed.zero_stage, source=source,
        )  # fmt: skip
    return resume_from
