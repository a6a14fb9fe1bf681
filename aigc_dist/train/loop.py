"""What every Ray Train worker runs: typed config in, DeepSpeed engines, stream, step, checkpoint, export.

Ray hands the worker a plain dict; the first thing `train_loop_per_worker` does is turn it back into
our typed sections (`WorkerSettings.from_dict`), so nothing below reads an untyped key.
All ranks run the same steps in lockstep: the same number of micro-batches per epoch (Ray Data
splits the dataset into equal shards), the same progress reports and checkpoints (each is a
collective), and the same final gather under ZeRO-3.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aigc_dist.config import DataConfig, DeepSpeedConfig, ModelConfig, StorageConfig, TrainConfig
from aigc_dist.metrics import ActorMetrics
from aigc_dist.storage import Storage
from aigc_dist.train.checkpoints import (
    DEEPSPEED_TAG,
    TrainerState,
    check_resumable,
    checkpoint_dir_name,
    verify_checkpoint_files,
)
from aigc_dist.train.deepspeed_config import deepspeed_config, lr_scheduler_factory, resolve_precision
from aigc_dist.train.export import artifact_metadata, artifact_uri, gathered_state_dict, save_trained_artifact
from aigc_dist.train.generators import Recipe, StepResult, make_recipe
from aigc_dist.train.optim import parameter_groups

log = logging.getLogger("aigc_dist.train")

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Ray Train's controller takes one report per worker per poll (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
# 2 s by default; Ray passes the variable on to the workers); a worker that reports faster blocks
# until its last report is taken. So progress between checkpoints goes to Ray Train at most once per
# poll; the progress lines and the run's history keep every log step.
POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0


@dataclass
class WorkerSettings:
    """The sections a worker needs, plus what the driver resolved for the whole run."""

    train: TrainConfig
    deepspeed: DeepSpeedConfig
    model: ModelConfig
    data: DataConfig
    storage: StorageConfig
    on_gpu: bool
    resume_from: str | None  # a checkpoint URI, already checked to exist

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `train_loop_config`. Secrets stay `SecretStr` objects: they travel to the
        workers (which need them for S3) but print as '**********'."""
        names = ("train", "deepspeed", "model", "data", "storage")
        sections = {name: getattr(self, name).model_dump() for name in names}
        return {**sections, "on_gpu": self.on_gpu, "resume_from": self.resume_from}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> WorkerSettings:
        return cls(
            train=TrainConfig.model_validate(config["train"]),
            deepspeed=DeepSpeedConfig.model_validate(config["deepspeed"]),
            model=ModelConfig.model_validate(config["model"]),
            data=DataConfig.model_validate(config["data"]),
            storage=StorageConfig.model_validate(config["storage"]),
            on_gpu=bool(config["on_gpu"]),
            resume_from=config.get("resume_from"),
        )


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker entry point; rank 0 returns the run summary, the others None."""
    return WorkerRun(WorkerSettings.from_dict(config)).run()


def format_progress(
    step: int, max_steps: int, loss: float, rate: float, unit: str, step_seconds: float, extra: dict[str, float]
) -> str:
    """`step 40/200 | loss 2.3141 | 10,532 tokens/s | 0.212 s/step | ETA 0:00:34` (+ extra losses)."""
    eta = int(round((max_steps - step) * step_seconds))
    parts = [
        f"step {step}/{max_steps}",
        f"loss {loss:.4f}",
        *(f"{k} {v:.4f}" for k, v in extra.items()),
        f"{rate:,.0f} {unit}/s",
        f"{step_seconds:.3f} s/step",
        f"ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}",
    ]
    return " | ".join(parts)


class ProgressWindow:
    """Sums of what happened since the last progress line, on this rank."""

    def __init__(self, extra_names: list[str]):
        self.extra_names = extra_names
        self.reset()

    def reset(self) -> None:
        self.loss = 0.0
        self.micro = 0
        self.samples = 0
        self.tokens = 0
        self.extra = dict.fromkeys(self.extra_names, 0.0)
        self.steps = 0
        self.seconds = 0.0

    def add(self, result: StepResult) -> None:
        self.loss += result.loss
        self.micro += 1
        self.samples += result.samples
        self.tokens += result.tokens
        for name in self.extra_names:
            self.extra[name] += result.extra.get(name, 0.0)

    def reduce(self, device: torch.device, report_due: bool) -> tuple[float, int, int, dict[str, float], bool]:
        """Mean loss over every rank's micro-batches, total samples and tokens, and whether any rank
        finds a report due (so all ranks agree and report equally often): one all-reduce."""
        import torch.distributed as dist

        values = [self.loss, self.micro, self.samples, self.tokens, float(report_due), *self.extra.values()]
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(tensor)
        loss, micro, samples, tokens, due, *extra = tensor.tolist()
        micro = max(micro, 1.0)
        means = {k: v / micro for k, v in zip(self.extra_names, extra, strict=True)}
        return loss / micro, int(samples), int(tokens), means, due > 0


class WorkerRun:
    """One worker's part of a run."""

    def __init__(self, settings: WorkerSettings):
        import ray.train

        self.s = settings
        train = settings.train
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))  # the worker's share of the cores
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat on every rank
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        if settings.on_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.precision = resolve_precision(settings.deepspeed, settings.on_gpu)
        self.recipe: Recipe = make_recipe(settings.model, settings.data, train, PRECISION_DTYPES[self.precision],
                                          settings.storage)
        self.engines = self._build_engines()
        # Rank 0 exports the run's metrics: it times every step and holds the all-reduced figures,
        # where the driver sees only the reports Ray Train takes (at most one per poll interval).
        self.metrics: ActorMetrics | None = None
        if self.rank == 0:
            self.metrics = ActorMetrics("train", {"run": train.run_name, "model": settings.model.name})

    def _build_engines(self) -> dict[str, Any]:
        import deepspeed

        ds_config = deepspeed_config(
            self.s.train, self.s.deepspeed, world_size=self.world_size, on_gpu=self.s.on_gpu
        )
        torch.manual_seed(self.s.train.seed)  # same initial weights on every rank (DeepSpeed also broadcasts)
        engines = {}
        for name, module in self.recipe.build_modules().items():
            engine, *_ = deepspeed.initialize(
                model=module,
                model_parameters=parameter_groups(module, self.s.train.weight_decay),
                config=dict(ds_config),
                lr_scheduler=lr_scheduler_factory(self.s.train),
            )
            engines[name] = engine
        return engines

    def _fresh_state(self) -> TrainerState:
        s = self.s
        return TrainerState(
            kind=self.recipe.kind,
            engines=list(self.recipe.engine_names),
            artifact_engine=self.recipe.artifact_engine,
            artifact=self.recipe.artifact_spec(),
            zero_stage=s.deepspeed.zero_stage,
            world_size=self.world_size,
            run_name=s.train.run_name,
            name=s.model.name,
            version=s.model.version,
            storage_path=s.train.storage_path,
        )

    def _restore(self) -> TrainerState:
        """This run's newest checkpoint (same run name, or a restart after a failure), else
        `train.resume_from`, else a fresh start."""
        import ray.train

        checkpoint, source = ray.train.get_checkpoint(), "the run's latest checkpoint"
        if checkpoint is None and self.s.resume_from:
            fs, path = Storage(self.s.storage).filesystem(self.s.resume_from)
            checkpoint, source = ray.train.Checkpoint(path=path, filesystem=fs), self.s.resume_from
        fresh = self._fresh_state()
        if checkpoint is None:
            fresh.attempt_starts.append(0)
            return fresh
        with checkpoint.as_directory() as local:
            state = TrainerState.read(local)
            check_resumable(
                state, kind=fresh.kind, world_size=self.world_size, zero_stage=fresh.zero_stage, source=source
            )
            verify_checkpoint_files(local, source)  # DeepSpeed unpickles with weights_only=False
            for name, engine in self.engines.items():
                path, _ = engine.load_checkpoint(os.path.join(local, name), tag=DEEPSPEED_TAG)
                if path is None:
                    raise RuntimeError(f"{source}: no DeepSpeed state for engine {name!r}")
        # Where this run exports and what it is called come from this run's config, not the checkpoint's.
        state.run_name, state.name, state.version = fresh.run_name, fresh.name, fresh.version
        state.storage_path, state.artifact = fresh.storage_path, fresh.artifact
        state.attempt_starts.append(state.step)
        if self.rank == 0:
            log.info("resumed from %s at step %d (epoch %d)", source, state.step, state.epoch)
        return state

    def _batches(self, shard: Any, state: TrainerState) -> Iterator[dict[str, np.ndarray]]:
        """Micro-batches from the saved data position on, epoch after epoch, without end.

        The shuffle is seeded by (seed, epoch, rank), so after a restart the same epoch yields the
        same batches and the first `batch_in_epoch` of them are skipped, not trained on twice.
        """
        train = self.s.train
        buffer = max(train.shuffle_buffer, train.micro_batch_size) if train.shuffle_buffer else None
        while True:
            seed = (train.seed * 1_000_003 + state.epoch * 1009 + self.rank) % 2**32 if buffer else None
            index = 0
            for batch in shard.iter_batches(
                batch_size=train.micro_batch_size,
                drop_last=True,
                batch_format="numpy",
                local_shuffle_buffer_size=buffer,
                local_shuffle_seed=seed,
            ):
                index += 1
                if index > state.batch_in_epoch:
                    yield batch
            if index == 0:
                raise RuntimeError(
                    f"train.dataset: a worker got no full micro-batch in an epoch; the dataset needs at least "
                    f"train.num_workers x train.micro_batch_size = {self.world_size * train.micro_batch_size} "
                    "examples"
                )
            state.epoch += 1
            state.batch_in_epoch = 0

    def run(self) -> dict[str, Any] | None:
        train = self.s.train
        state = self._restore()
        # Noise (cGAN latents, dropout) differs per rank and per restart, reproducibly.
        torch.manual_seed((train.seed * 1_000_003 + self.rank * 10_007 + state.step) % 2**63)
        last_checkpoint = self._train(state) if state.step < train.max_steps else state.step
        if last_checkpoint != state.step:
            self._checkpoint(state, {"step": state.step})
        artifact = self._export(state) if train.export_at_end else None
        if self.rank != 0:
            return None
        if self.metrics is not None:
            self.metrics.flush()  # the worker group is torn down when this returns
        return {
            "step": state.step,
            "epoch": state.epoch,
            "samples": state.samples,
            "tokens": state.tokens,
            "history": state.history,
            "attempt_starts": state.attempt_starts,
            "artifact_uri": artifact,
        }

    def _train(self, state: TrainerState) -> int:
        """Step until train.max_steps, with progress lines, reports and checkpoints on the way;
        returns the step of the last checkpoint."""
        import ray.train

        train = self.s.train
        lr_source = next(iter(self.engines.values()))
        window = ProgressWindow(list(self.recipe.progress_extras))
        last_checkpoint, last_report = state.step, time.monotonic()
        report_interval = float(os.environ.get(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_S))
        for engine in self.engines.values():
            engine.train()
        batches = self._batches(ray.train.get_dataset_shard("train"), state)
        first = next(batches)  # waiting for the data pipeline to start is not step time
        tick = time.perf_counter()
        for batch in itertools.chain([first], batches):
            window.add(self.recipe.step(self.engines, batch, self.device))
            state.batch_in_epoch += 1
            state.micro_steps += 1
            if state.micro_steps % train.grad_accum_steps:
                continue  # DeepSpeed accumulates; the optimizer steps on the last micro-batch
            state.step += 1
            window.steps += 1
            step_seconds = time.perf_counter() - tick
            window.seconds += step_seconds
            if self.metrics is not None:
                self.metrics.observe("aigc_train_step_seconds", step_seconds)
            save = state.step == train.max_steps or state.step % train.checkpoint_every_steps == 0
            if save or state.step % train.log_every_steps == 0:
                # A checkpoint also closes the progress window, so the counters it saves are complete.
                due = time.monotonic() - last_report >= report_interval
                metrics, due = self._progress(state, window, lr_source.get_lr()[0], due)
                if save:
                    self._checkpoint(state, metrics)
                    last_checkpoint = state.step
                elif due:
                    ray.train.report(metrics)
                if save or due:
                    last_report = time.monotonic()
            if state.step >= train.max_steps:
                break
            tick = time.perf_counter()  # checkpoint and report time is not step time
        return last_checkpoint

    def _progress(
        self, state: TrainerState, window: ProgressWindow, lr: float, report_due: bool
    ) -> tuple[dict[str, float], bool]:
        """Reduce the window over ranks, log the progress line on rank 0; returns the metrics and
        whether a report to Ray Train is due on every rank."""
        loss, samples, tokens, extra, report_due = window.reduce(self.device, report_due)
        state.samples += samples
        state.tokens += tokens
        seconds = max(window.seconds, 1e-9)
        unit = self.recipe.throughput_unit
        rate = (tokens if unit == "tokens" else samples) / seconds
        step_seconds = seconds / max(window.steps, 1)
        metrics = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss,
            **extra,
            "lr": lr,
            "step_seconds": step_seconds,
            f"{unit}_per_s": rate,
            "samples": state.samples,
            "tokens": state.tokens,
        }
        state.history.append(metrics)
        if self.rank == 0:
            log.info(format_progress(state.step, self.s.train.max_steps, loss, rate, unit, step_seconds, extra))
        if self.metrics is not None:
            self.metrics.inc("aigc_train_samples_total", samples)
            self.metrics.inc("aigc_train_tokens_total", tokens)
            self.metrics.set("aigc_train_loss", loss)
        window.reset()
        return metrics, report_due

    def _checkpoint(self, state: TrainerState, metrics: dict[str, Any]) -> None:
        """Every rank saves its DeepSpeed shard locally; `ray.train.report` merges and persists them."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="aigc-ckpt-") as tmp:
            for name, engine in self.engines.items():
                engine.save_checkpoint(os.path.join(tmp, name), tag=DEEPSPEED_TAG)
            if self.rank == 0:
                state.write(tmp)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(state.step),
            )

    def _export(self, state: TrainerState) -> str | None:
        """Gather the artifact engine's weights (a collective under ZeRO-3); rank 0 writes the artifact."""
        engine = self.engines[self.recipe.artifact_engine]
        weights = gathered_state_dict(engine, self.s.deepspeed.zero_stage, self.rank)
        if self.rank != 0:
            return None
        uri = artifact_uri(state.storage_path, state.name, state.version)
        save_trained_artifact(uri, state.artifact, weights, Storage(self.s.storage), artifact_metadata(state))
        return uri
