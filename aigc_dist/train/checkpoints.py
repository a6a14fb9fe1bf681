"""Training checkpoints: DeepSpeed shards from every rank plus the loop's own state, in one directory.

    <storage_path>/<run_name>/checkpoint_<step:08d>/
        trainer_state.json            rank 0: step, data position, history, what to export and how
        <engine>/latest               DeepSpeed: tag of the newest state ("state")
        <engine>/state/*.pt           DeepSpeed: model states and each rank's ZeRO optimizer shard
        <engine>/zero_to_fp32.py      DeepSpeed's own consolidation script

Each rank writes its shard into a local temporary directory and hands it to `ray.train.report`,
which merges the ranks' directories at the run's storage path (local or S3) and keeps the newest
`keep_checkpoints`. Ray Train remembers a run's checkpoints under its name, so starting the same
run again, or a restart after a worker failure, resumes from the newest one.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from aigc_dist.config import ConfigError
from aigc_dist.errors import EXIT_CONFIG_ERROR, UserError
from aigc_dist.storage import Storage, join_uri, parse_uri

STATE_FILE = "trainer_state.json"
DEEPSPEED_TAG = "state"
CHECKPOINT_PREFIX = "checkpoint_"
FORMAT_VERSION = 1


class UnsafeCheckpointError(UserError, ValueError):
    """A checkpoint file that would run code when unpickled: refused, never loaded."""

    exit_code = EXIT_CONFIG_ERROR  # bad input, like a checkpoint that is not there


def checkpoint_dir_name(step: int) -> str:
    """Zero-padded so names sort in step order: checkpoint_00000050."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


@dataclass
class TrainerState:
    """The loop's state that DeepSpeed does not keep, saved by rank 0 beside the shards."""

    kind: str  # lm, cgan or cvae
    engines: list[str]  # DeepSpeed engine sub-directories
    artifact_engine: str  # which engine's module is the artifact
    artifact: dict[str, Any]  # kind, model hyper-parameters, tokenizer, conditioning (see export.py)
    zero_stage: int
    world_size: int
    run_name: str
    name: str  # artifact name and version the run exports to
    version: str
    storage_path: str
    step: int = 0  # optimizer steps done
    micro_steps: int = 0  # micro-batches done (step * grad_accum_steps at a checkpoint)
    epoch: int = 0  # passes over the dataset started before this one
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on (per rank)
    samples: int = 0  # examples trained on, all ranks
    tokens: int = 0  # input tokens trained on, all ranks (text only)
    history: list[dict[str, float]] = field(default_factory=list)  # one record per progress line
    attempt_starts: list[int] = field(default_factory=list)  # step at which each (re)start began
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{STATE_FILE}: format_version {data.get('format_version')!r} is not {FORMAT_VERSION}")
        return cls(**data)

    def write(self, directory: str) -> None:
        with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as fh:
            fh.write(self.to_json())

    @classmethod
    def read(cls, directory: str) -> TrainerState:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as fh:
            return cls.from_json(fh.read())


def read_trainer_state(checkpoint_uri: str, storage: Storage) -> TrainerState:
    """A checkpoint's trainer_state.json, read straight from its storage."""
    return TrainerState.from_json(storage.read_bytes(join_uri(checkpoint_uri, STATE_FILE)).decode("utf-8"))


def shard_files(state: TrainerState) -> list[str]:
    """The files every rank's part of a checkpoint adds, relative to the checkpoint directory."""
    files = []
    for engine in state.engines:
        base = f"{engine}/{DEEPSPEED_TAG}"
        files.append(f"{engine}/latest")
        if state.zero_stage == 3:
            files += [f"{base}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(state.world_size)]
        else:
            files.append(f"{base}/mp_rank_00_model_states.pt")
        if state.zero_stage >= 1:
            files += [f"{base}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(state.world_size)]
    return files


def checkpoint_complete(uri: str, storage: Storage) -> bool:
    """True when the checkpoint at `uri` holds its state file and every rank's shards: a run killed
    while uploading leaves a directory with only some ranks' files, which must not be resumed."""
    try:
        state = read_trainer_state(uri, storage)
    except FileNotFoundError:
        return False
    base = parse_uri(uri).uri.rstrip("/") + "/"
    present = {f.removeprefix(base) for f in storage.list(uri)}
    return set(shard_files(state)) <= present


def find_checkpoint(uri: str, storage: Storage, what: str = "train.resume_from") -> str:
    """The complete checkpoint at `uri`, or the newest complete one under a run directory at `uri`.

    `ConfigError` naming `what` when there is none, so a typo fails before any worker starts.
    """
    if storage.exists(join_uri(uri, STATE_FILE)):
        if not checkpoint_complete(uri, storage):
            raise ConfigError(f"{what}: the checkpoint at {uri!r} is incomplete (some ranks' shards are missing)")
        return uri.rstrip("/")
    names = [name for name in storage.subdirectories(uri) if name.startswith(CHECKPOINT_PREFIX)]
    for name in reversed(names):
        candidate = join_uri(uri, name)
        if checkpoint_complete(candidate, storage):
            return candidate
    raise ConfigError(f"{what}: no complete checkpoint at {uri!r} (no {STATE_FILE} and shards there or in a "
                      "checkpoint_* below)")


def download_checkpoint(uri: str, storage: Storage, local_dir: str, engine: str | None = None) -> str:
    """Copy a checkpoint (or just its state file and one engine's files) to `local_dir`; returns it."""
    fs, path = storage.filesystem(uri)
    local = pafs.LocalFileSystem()
    if engine is None:
        pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=local)
        return local_dir
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(f"{path}/{STATE_FILE}", os.path.join(local_dir, STATE_FILE), source_filesystem=fs,
                    destination_filesystem=local)
    pafs.copy_files(f"{path}/{engine}", os.path.join(local_dir, engine), source_filesystem=fs,
                    destination_filesystem=local)
    return local_dir


def check_resumable(state: TrainerState, *, kind: str, world_size: int, zero_stage: int, source: str) -> None:
    """A checkpoint can resume this run only with the same generator, worker count and ZeRO stage
    (ZeRO shards are cut per rank); anything else is a `ConfigError` saying what to change."""
    problems = []
    if state.kind != kind:
        problems.append(f"model.kind is {kind!r} but the checkpoint holds a {state.kind!r} model")
    if state.world_size != world_size:
        problems.append(f"train.num_workers is {world_size} but the checkpoint was written by {state.world_size}")
    if state.zero_stage != zero_stage:
        problems.append(f"deepspeed.zero_stage is {zero_stage} but the checkpoint was written with {state.zero_stage}")
    if problems:
        raise ConfigError(
            [f"cannot resume from {source} at step {state.step}: {p}" for p in problems]
            + ["use the checkpoint's settings, or export it (aigc-dist export) and start a new run"]
        )


def deepspeed_pickle_classes() -> list[type]:
    """The classes DeepSpeed pickles into its state files beside tensors, containers and numbers
    (found with `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 0-3 checkpoints):
    plain records and an enum, which rebuild without calling anything else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def verify_checkpoint_files(directory: str, source: str) -> None:
    """Open every pickle (`*.pt`) of a local checkpoint copy with torch's weights-only unpickler,
    which admits tensors, containers, numbers and the allow-listed DeepSpeed classes and nothing
    else; `UnsafeCheckpointError` naming the file and the refused global otherwise.

    DeepSpeed and its zero_to_fp32 load with `weights_only=False`, so a bucket anyone can write
    to would be code execution on every rank that resumes or exports. This check runs on the very
    files they then load (the local copy, after the download), so a later swap in the bucket cannot
    slip past it. Tensors are memory-mapped, so the check reads little more than the pickles.
    """
    import torch

    allowed = deepspeed_pickle_classes()
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{source}: {path.relative_to(directory)} holds more than tensors and DeepSpeed's records "
                f"({_refused_global(str(exc))}); refused without loading it. A checkpoint is code to "
                "whoever can write it: resume and export only from storage that only training writes"
            ) from None


def _refused_global(message: str) -> str:
    """The line of torch's weights-only error that names what the pickle asked for (the rest of
    the message suggests `weights_only=False`, the very thing this check exists to prevent)."""
    for line in message.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.split(" Please use")[0].rstrip(".")
    return "a pickle the weights-only loader refuses"


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (DeepSpeed's default), which torch.load can memory-map; the legacy
    format cannot be."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"
