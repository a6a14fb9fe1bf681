"""The backfill driver: one run of `aigc-dist backfill`, resumable and exactly once.

    1. lock the run (lock.py: heart-beaten until released, fencing every commit and delete) and
       record what it was started with (`_run.json`);
    2. partition: Ray Data reads and validates the requests side (candidates or requests), the users
       and the items, and writes them under `_work/<pass>/` partitioned by shard (a stable hash:
       candidates and users by user_id, so each shard joins against its own slice of users; requests
       by request_id); the items go whole, a snapshot every later session reads instead of the live
       input. `_plan.json` (an exclusive write) then fixes the pass, the shard count and the content
       identity of every input file, so every later session sees the same shards of the same input;
    3. stream the shards not yet committed through prepare -> generate (shards.py): each shard is cut
       into generate tasks that any generator actor takes, so every actor works whatever the shard
       count; the driver counts the tasks' rows as they are generated (progress.py) and, once it has
       every task of a shard, starts the task that finishes and commits it (finish.py, commit.py);
    4. when every shard is committed: sweep the files no marker of that checked set names, write
       `_manifest.json` last, delete `_work/`.

A session killed anywhere resumes from its last commit: step 2 is redone from scratch until its plan
exists, and step 3 skips committed shards. A session whose input files differ from the plan's (any
content change, same size or not) is refused, naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import zip_longest
from typing import Any

from aigc_dist.batch.commit import sweep_uncommitted
from aigc_dist.batch.finish import Fenced, finish_generated
from aigc_dist.batch.inputs import InputTable, RowRules, describe_input_change, identify, resolve_input
from aigc_dist.batch.layout import RunLayout, read_manifest, write_manifest
from aigc_dist.batch.lock import FencedError, RunLock
from aigc_dist.batch.openai_batch import request_counts
from aigc_dist.batch.progress import Progress, build_manifest
from aigc_dist.batch.quality import quality_report, sum_quality
from aigc_dist.batch.reading import count_rows, read_work_rows, work_dataset
from aigc_dist.batch.records import ReadLimits
from aigc_dist.batch.run_state import CommitMarker, Plan, read_commits, read_plan, write_plan
from aigc_dist.batch.shards import ShardContext, ShardGenerator, ShardPreparer
from aigc_dist.batch.startup import input_ready, room_to_overlap, start_gate
from aigc_dist.config import BackfillConfig, DataConfig, MetricsConfig, QualityConfig, StorageConfig, config_digest
from aigc_dist.errors import UserError
from aigc_dist.metrics import DriverMetrics
from aigc_dist.models.spec import MODEL_SPECS, kinds_of, model_spec
from aigc_dist.storage import AlreadyExistsError, Storage, join_uri, parse_uri

log = logging.getLogger(__name__)

# Environment variable naming a point where the driver SIGKILLs itself ("name" or "name:N" for the
# N-th time it is reached), sleeps ("name=sleep:SECONDS") or waits until a file exists
# ("name=wait:PATH"): how the crash and lock tests stop or slow a driver at an exact place.
FAILPOINT_ENV = "AIGC_DIST_FAILPOINT"
_failpoint_hits: dict[str, int] = {}
# Logical CPUs of the per-shard stages besides the generators (Ray Data must never starve them).
PREPARE_CPUS, FINISH_CPUS = 1.0, 0.5


class BackfillError(UserError, RuntimeError):
    """A run that cannot start or finish as configured; the message says what to change."""


def _failpoint(name: str) -> None:
    wanted = os.environ.get(FAILPOINT_ENV, "")
    point, _, action = wanted.partition("=")
    target, _, nth = point.partition(":")
    if target != name:
        return
    _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
    if _failpoint_hits[name] < int(nth or 1):
        return
    if action.startswith("sleep:"):
        log.warning("failpoint %s reached: the driver sleeps %ss", wanted, action[len("sleep:"):])
        time.sleep(float(action[len("sleep:"):]))
        return
    if action.startswith("wait:"):  # as long as a test needs: until the file it names exists
        log.warning("failpoint %s reached: the driver waits for %s", wanted, action[len("wait:"):])
        while not os.path.exists(action[len("wait:"):]):
            time.sleep(0.1)
        return
    log.warning("failpoint %s reached: killing the driver (pid %d)", wanted, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def describe_artifact(uri: str, storage: Storage) -> dict[str, Any]:
    """What the driver needs of an artifact without loading its weights: kind, identity, template, sizes."""
    from aigc_dist.models.artifact import CONFIG_FILE, METADATA_FILE
    from aigc_dist.models.hf_format import METADATA_FORMAT as HF_METADATA_FORMAT
    from aigc_dist.models.hf_format import CheckpointError, model_config_json

    try:
        meta = storage.read_json(join_uri(uri, METADATA_FILE))
        if meta.get("format") == HF_METADATA_FORMAT:  # a text model (or a LoRA adapter on one): HF config.json
            config = model_config_json(uri, storage)
        else:
            config = storage.read_json(join_uri(uri, CONFIG_FILE))
    except FileNotFoundError as exc:
        raise BackfillError(f"backfill.artifact: {uri} is not a complete artifact ({exc} is missing)") from None
    except CheckpointError as exc:
        raise BackfillError(f"backfill.artifact: {exc}") from None
    if meta.get("format") == HF_METADATA_FORMAT:
        return {"kind": "lm", "uri": uri, "name": meta.get("name", "?"), "version": meta.get("version", "?"),
                "digest": meta["digest"], "max_seq_len": config.get("max_position_embeddings"),
                "num_classes": None, "template": meta.get("prompt_template"),
                "tokenizer": {"uri": uri}, "labels": []}
    model = config.get("model", {})
    conditioning = config.get("conditioning") or {}
    return {"kind": config.get("kind"), "uri": uri, "name": meta.get("name", "?"), "version": meta.get("version", "?"),
            "digest": meta["digest"], "max_seq_len": model.get("max_seq_len"),
            "num_classes": model.get("num_classes"), "template": conditioning.get("prompt_template"),
            "tokenizer": config.get("tokenizer"), "labels": list(conditioning.get("labels", []))}


def resolve_tables(data: DataConfig, storage: Storage) -> dict[str, InputTable]:
    """candidates + users + items, or requests (an OpenAI Batch file: + users + items if given)."""
    if data.requests:
        batch = data.requests_format == "openai_batch"
        if data.candidates or (data.users is None) != (data.items is None) or (data.users and not batch):
            raise BackfillError("data.requests is a pre-joined table: leave data.candidates, data.users and "
                                "data.items unset when it is given (an OpenAI Batch file, data.requests_format="
                                "openai_batch, may set both data.users and data.items, for its aigc lines)")
        names = ("requests", "users", "items") if data.users else ("requests",)
        tables = {name: resolve_input(name, getattr(data, name), data.format, storage) for name in names}
        if batch and tables["requests"].format != "jsonl":
            raise BackfillError(f"data.requests_format=openai_batch reads a .jsonl file; {data.requests} is "
                                f"{tables['requests'].format}")
        return tables
    missing = [name for name in ("candidates", "users", "items") if getattr(data, name) is None]
    if missing:
        raise BackfillError(f"set data.{', data.'.join(missing)} (or data.requests for a pre-joined table)")
    return {name: resolve_input(name, getattr(data, name), data.format, storage)
            for name in ("candidates", "users", "items")}


def _identity(backfill: BackfillConfig, data: DataConfig, model: dict[str, Any]) -> dict[str, Any]:
    """What a run is: resuming it with anything that changes its output would mix two outputs."""
    decisive = backfill.model_dump(mode="json", exclude={
        "run_id", "output", "artifact", "min_actors", "max_actors", "cpus_per_actor", "gpus_per_actor",
        "progress_interval_s", "lock_stale_after_s", "startup_overlap", "engine", "quality"})
    # The engine decides sampled copy (each engine has its own random streams), its memory settings do not;
    # a native run's identity is what it was before there was a choice, so such runs resume across versions.
    if backfill.engine.backend != "native":
        decisive["engine"] = backfill.engine.model_dump(mode="json", include={"backend", "vllm_min_parameters"})
    # The quality rules decide the grounded / personalized columns and require_item_mention's filter; runs
    # on the default rules keep the identity they had before the rules were configurable.
    if backfill.quality != QualityConfig():
        decisive["quality"] = backfill.quality.model_dump(mode="json")
    decisive["data"] = data.model_dump(mode="json", include={
        "max_id_chars", "max_value_chars", "max_record_bytes", "max_nesting_depth", "max_fields", "format",
        "requests_format"})
    decisive["model_digest"] = model["digest"]
    digest = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()
    return {"output_digest": digest,
            "config_digest": {"backfill": config_digest(backfill), "data": config_digest(data)}}


def _id_salt(backfill: BackfillConfig, model: dict[str, Any]) -> str:
    """The "template" part of default request ids: the prompt template, or the image condition."""
    return model_spec(model["kind"]).part("backfill").id_salt(backfill, model)


def _fenced(lock: RunLock, storage: Storage) -> None:
    """Before the driver writes or deletes a run object: the lock must still be ours (lock.py)."""
    lock.check()
    lock.fence.check(storage)


def _record_run(layout: RunLayout, storage: Storage, backfill: BackfillConfig, model: dict[str, Any],
                identity: dict[str, Any], lock: RunLock) -> dict[str, Any]:
    """`_run.json` of a new run, or the existing one after checking it is the same run."""
    new = {"run_id": backfill.run_id, "mode": backfill.mode, "started_at": time.time(),
           "model": {k: model[k] for k in ("name", "version", "digest", "kind", "uri")}, **identity}
    if not storage.exists(layout.run_info):
        _fenced(lock, storage)
        try:
            storage.write_json(layout.run_info, new, if_absent=True)
            return new
        except AlreadyExistsError:  # a retried write whose first try landed: what is there tells
            pass
    run_info = storage.read_json(layout.run_info)
    if run_info["output_digest"] != identity["output_digest"]:
        raise BackfillError(
            f"run {backfill.run_id} at {layout.root} was started with another model or other output settings "
            "(sampling, seed, engine, filters, quality rules, rows_per_file, batch_size, validation limits); resume "
            "it with the same config, or use a new backfill.run_id")
    return run_info


def _check_inputs(then: list[Any], now: list[Any], run_id: str) -> None:
    """Refuse a session whose input differs from the plan's, naming the first file that differs."""
    for before, after in zip_longest(then, now):
        if before is None or after is None or before[0] != after[0]:
            change = "the input tables differ (candidates + users + items against a requests table)"
        else:
            change = describe_input_change(after[0], before, after)
        if change:
            raise BackfillError(f"the input changed since run {run_id} started: {change}. A run reads one input: "
                                "resume it with the input it started with, or use a new backfill.run_id")


def _partition(layout: RunLayout, storage: Storage, tables: dict[str, InputTable], backfill: BackfillConfig,
               data: DataConfig, id_salt: str, lock: RunLock) -> tuple[Plan, Callable[[], None] | None]:
    """The run's plan, and the pass that writes its input under `_work/<pass>/` (None once the plan exists).

    The plan's shard count is known once the input is counted, before the pass writes a row: the
    driver starts the actor pools while the pass runs (startup.py). The pass writes `_plan.json` last.
    """
    fingerprint = [table.fingerprint for table in tables.values()]
    plan = read_plan(layout, storage)
    if plan is not None:
        _check_inputs(plan.inputs, fingerprint, backfill.run_id)
        return plan, None
    _failpoint("partition")
    # A pass of its own: files of an earlier pass (one that died, or of a driver that lost the lock)
    # are never mixed in; they go with the rest of _work/ when the run completes.
    work = uuid.uuid4().hex[:12]
    limits = ReadLimits.of(data)
    side = "requests" if "requests" in tables else "candidates"
    kind = "batch" if data.requests_format == "openai_batch" and side == "requests" else side
    total, chunks = count_rows(tables[side], storage, limits)
    num_shards = max(1, math.ceil(total / backfill.rows_per_file))
    plan = Plan(num_shards, total, backfill.rows_per_file, fingerprint, work)

    def write_pass() -> None:
        log.info("partitioning %s rows of %s into %d shards", f"{total:,}", side, num_shards)
        parts = [read_work_rows(tables[side], RowRules(kind, num_shards, id_salt, limits), storage, "requests",
                                chunks, rows=total)]
        if "users" in tables:
            # A batch file's lines shard by custom_id, not by user: its users go whole to shard 0, as items do.
            user_shards = 1 if kind == "batch" else num_shards
            parts.append(read_work_rows(tables["users"], RowRules("users", user_shards, limits=limits), storage,
                                        "users"))
            parts.append(read_work_rows(tables["items"], RowRules("items", 1, limits=limits), storage, "items"))
        out_fs, out_path = storage.filesystem(layout.work_pass(work))
        work_rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        work_rows.write_parquet(out_path, filesystem=out_fs, partition_cols=["part", "shard"])
        _failpoint("partitioned")
        # The pass read the live input: had it changed since the fingerprint, the plan would vouch for
        # content the run never read.
        _check_inputs(fingerprint, [identify(t, storage).fingerprint for t in tables.values()], backfill.run_id)
        _fenced(lock, storage)
        try:
            write_plan(layout, storage, dataclasses.replace(plan, planned_at=time.time()))
        except AlreadyExistsError:  # a retried write that landed: the plan there must be this pass's
            written = read_plan(layout, storage)
            if written is None or written.work != work:
                raise BackfillError(f"another driver planned run {backfill.run_id} while this one held its lock "
                                    f"({layout.plan}); run the same config again to resume") from None
        _failpoint("planned")
        log.info("partition pass done: %s rows in %d shards", f"{total:,}", num_shards)

    return plan, write_pass


def _item_refs(layout: RunLayout, storage: Storage, plan: Plan, data: DataConfig) -> tuple[Any, list[Any]]:
    """The items snapshot of the run, as object-store blocks every preparer actor fetches once (a broadcast)."""
    items = work_dataset(storage, layout.work_dir(plan.work, "items", 0))
    if items is None:
        return None, []
    items = items.materialize()
    count = items.count()
    if count > data.max_broadcast_items:
        raise BackfillError(f"the items table has {count:,} rows, more than data.max_broadcast_items="
                            f"{data.max_broadcast_items:,}; every preparer actor holds a copy of it")
    return items, items.to_arrow_refs()


def ensure_ray(backfill: BackfillConfig) -> None:
    """Join the cluster in RAY_ADDRESS (a Ray job), else start a local Ray sized for the actor pools."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    # Logical CPUs for the generators, the preparers and the read/finish tasks: an actor pool that
    # takes every CPU leaves none for the tasks that feed it, and the pipeline deadlocks.
    needed = math.ceil(backfill.max_actors * (backfill.cpus_per_actor + PREPARE_CPUS) + 2)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False)


def quiet_ray_data() -> None:
    """Ray Data's info lines (plans, operator progress bars) go to its log file only, where the driver
    says they are: the progress line tells how the run goes; Ray Data's warnings still reach stderr."""
    import ray.data
    from ray.data._internal.logging import get_log_directory

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)
            # the warning that follows is about the setting below: noise on a terminal
            handler.addFilter(lambda record: not record.getMessage().startswith("Progress bars disabled"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    directory = get_log_directory()
    if directory:
        log.info("Ray Data's log: %s", os.path.join(directory, "ray-data.log"))


def _generated_tasks(pending: list[int], context: ShardContext, gate: Any) -> Iterator[dict[str, Any]]:
    """Ray Data: the pending shards through prepare -> generate; yields what each generate task reports."""
    import ray

    backfill = context.backfill
    ds = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(ShardPreparer, batch_size=1, batch_format="pyarrow", num_cpus=PREPARE_CPUS,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=backfill.max_actors),
                        fn_constructor_kwargs={"context": context, "gate": gate})
    ds = ds.map_batches(ShardGenerator, batch_size=1, batch_format="pyarrow", num_cpus=backfill.cpus_per_actor,
                        num_gpus=backfill.gpus_per_actor or None,
                        compute=ray.data.ActorPoolStrategy(min_size=backfill.min_actors, max_size=backfill.max_actors,
                                                           max_tasks_in_flight_per_actor=2),
                        fn_constructor_kwargs={"context": context})
    # Every task a preparer yields is a block of its own (this dataset's context only): an actor takes
    # whole blocks, and Ray Data otherwise merges a task's outputs up to 128 MiB, so one generator
    # would get a whole shard, and only once the shard was prepared. Measured: with the default, the
    # first of five tasks yielded a second apart reached the next stage with the last.
    ds.context.target_max_block_size = 1
    for row in ds.iter_rows():
        yield json.loads(row["generated"])


def _shard_pipeline(pending: list[int], context: ShardContext, gate: Any,
                    progress: Progress) -> Iterator[CommitMarker]:
    """Generate the pending shards, finish each once all its tasks are in; yields each commit marker."""
    import ray

    finish = ray.remote(finish_generated).options(num_cpus=FINISH_CPUS, max_retries=3)
    gathered: dict[int, dict[int, dict[str, Any]]] = {}
    finishing: list[Any] = []

    def committed(refs: list[Any]) -> Iterator[CommitMarker]:
        for marker in ray.get(refs):
            if isinstance(marker, Fenced):  # this driver's lock was taken over: nothing more is ours to do
                raise FencedError(marker.reason)
            yield marker

    for task in _generated_tasks(pending, context, gate):
        tasks = gathered.setdefault(task["shard"], {})
        if task["task"] in tasks:  # a task Ray ran again (its output was lost with a node) reports twice
            continue
        tasks[task["task"]] = task
        progress.generated(task)
        _failpoint("task_generated")
        if len(tasks) == task["num_tasks"]:
            _failpoint("shard_generated")
            finishing.append(finish.remote(task["shard"], [tasks[k] for k in sorted(tasks)], context))
            del gathered[task["shard"]]
        done, finishing = ray.wait(finishing, num_returns=len(finishing), timeout=0) if finishing else ([], [])
        yield from committed(done)
    while finishing:
        done, finishing = ray.wait(finishing, num_returns=1)
        yield from committed(done)


def _generate(pending: list[int], context: ShardContext, write_pass: Callable[[], None] | None,
              plan: Plan, data: DataConfig, progress: Progress) -> Iterator[CommitMarker]:
    """The pending shards' commit markers; a new run's partition pass (`write_pass`) runs beside the
    actor pools' start when the cluster has room for both (startup.py)."""
    layout, storage, backfill = RunLayout(context.root), Storage(context.storage), context.backfill
    items: list[Any] = []  # the broadcast catalog's dataset: its blocks stay until the shards are done

    def item_refs() -> list[Any]:
        if not context.profiles:
            return []
        dataset, refs = _item_refs(layout, storage, plan, data)
        items.append(dataset)
        return refs

    gate = start_gate()
    # Only a new run has a pass to overlap; `auto` asks the cluster (a Ray call) only then.
    overlap = write_pass is not None and (
        backfill.startup_overlap == "on"
        or (backfill.startup_overlap == "auto"
            and room_to_overlap(backfill.max_actors * (backfill.cpus_per_actor + PREPARE_CPUS))))
    with input_ready(gate, write_pass, item_refs, overlap):
        yield from _shard_pipeline(pending, context, gate, progress)


def _check_artifact(backfill: BackfillConfig, model: dict[str, Any]) -> None:
    """The artifact's kind generates what backfill.mode asks for, and its task can run this backfill."""
    if model["kind"] not in MODEL_SPECS:
        raise BackfillError(f"backfill.artifact: {backfill.artifact} is a {model['kind']!r} artifact; known kinds: "
                            f"{', '.join(MODEL_SPECS)}")
    spec = model_spec(model["kind"])
    if spec.modality != backfill.mode:
        raise BackfillError(f"backfill.mode={backfill.mode} needs a {' or '.join(kinds_of(backfill.mode))} "
                            f"artifact; {backfill.artifact} is a {model['kind']!r} artifact")
    problem = spec.part("backfill").check(backfill, model)
    if problem is not None:
        raise BackfillError(problem)


def _finish(layout: RunLayout, storage: Storage, run_info: dict[str, Any], plan: Plan,
            progress: Progress, lock: RunLock, backfill: BackfillConfig, openai: bool = False) -> dict[str, Any]:
    """Every shard committed: sweep uncommitted files, write the manifest (last), drop the work files.

    The sweep and the manifest use the one marker set checked complete here: a second listing could
    miss a marker, and the sweep would delete files the manifest lists.
    """
    committed = read_commits(layout, storage)
    missing = sorted(set(range(plan.num_shards)) - set(committed))
    if missing:
        raise BackfillError(f"shards {missing[:10]} did not commit; run again to resume")
    _failpoint("before_manifest")
    sweep_uncommitted(layout, storage, committed, lock.fence)
    manifest = build_manifest(layout, run_info, plan, committed, progress)
    quality = quality_report(sum_quality(committed.values()), backfill)
    if quality is not None:
        manifest["quality"] = quality
    if openai:  # an OpenAI Batch file in, or OpenAI-shaped files out: its counts as a Batch object gives them
        manifest["request_counts"] = request_counts(manifest["counts"])
    _fenced(lock, storage)
    write_manifest(layout.root, storage, manifest)
    _fenced(lock, storage)
    storage.delete_tree(layout.work)  # absent (a pass that wrote nothing) is no error
    storage.delete(layout.progress)
    return manifest


@contextmanager
def exported_metrics(run_id: str, config: MetricsConfig | None) -> Iterator[DriverMetrics | None]:
    """The driver's metrics, on /metrics while the body runs, pushed to `config.pushgateway_url` (if set)
    when it ends, complete or failed; None when metrics are disabled or not configured."""
    if config is None or not config.enabled:
        yield None
        return
    metrics = DriverMetrics({"run": run_id})
    # The counters exist at 0 from the first scrape on, so rate() sees them rise with the first commits.
    for status in ("ok", "quarantined", "filtered"):
        metrics.inc("aigc_backfill_rows_total", 0, status=status)
    metrics.inc("aigc_backfill_tokens_total", 0)
    for kind in ("data", "errors"):
        metrics.inc("aigc_storage_written_bytes_total", 0, kind=kind)
    metrics.serve_http(config.host, config.port)  # a port in use is a warning, never a failed job
    try:
        yield metrics
    finally:
        if config.pushgateway_url:
            metrics.push(config.pushgateway_url, job="aigc-backfill")
        metrics.close()


def run_backfill(backfill: BackfillConfig, data: DataConfig, storage_config: StorageConfig,
                 metrics_config: MetricsConfig | None = None) -> dict[str, Any]:
    """Run (or resume, or find complete) the backfill `backfill.run_id`; returns its manifest.

    `metrics_config` (the CLI passes the `metrics` section) exports the driver's figures; see
    `exported_metrics`."""
    started = time.time()
    storage = Storage(storage_config)
    if backfill.artifact is None:
        raise BackfillError("backfill.artifact is not set: give the artifact directory (path or s3:// URI)")
    model = describe_artifact(backfill.artifact, storage)
    _check_artifact(backfill, model)
    tables = resolve_tables(data, storage)
    layout = RunLayout(parse_uri(join_uri(backfill.output, backfill.run_id)).uri)
    identity = _identity(backfill, data, model)
    if storage.exists(layout.manifest):
        manifest = read_manifest(layout.root, storage)
        if manifest["output_digest"] != identity["output_digest"]:
            raise BackfillError(f"run {backfill.run_id} at {layout.root} is complete, with other settings; "
                                "use a new backfill.run_id")
        log.info("backfill %s is already complete: %s", backfill.run_id, layout.manifest)
        return manifest
    tables = {name: identify(table, storage) for name, table in tables.items()}
    ensure_ray(backfill)
    quiet_ray_data()
    # Heartbeats well inside the stale time: a takeover needs several missed beats, not one late one.
    heartbeat_s = min(backfill.progress_interval_s, backfill.lock_stale_after_s / 4)
    with (RunLock(layout.lock, storage, backfill.lock_stale_after_s, heartbeat_s) as lock,
          exported_metrics(backfill.run_id, metrics_config) as metrics):
        run_info = _record_run(layout, storage, backfill, model, identity, lock)
        plan, write_pass = _partition(layout, storage, tables, backfill, data, _id_salt(backfill, model), lock)
        committed = read_commits(layout, storage) if write_pass is None else {}
        pending = [k for k in range(plan.num_shards) if k not in committed]
        log.info("backfill %s: %d of %d shards to do (%s)", backfill.run_id, len(pending), plan.num_shards,
                 layout.root)
        progress = Progress(layout, storage, backfill.run_id, plan, committed, started, metrics)
        with progress.reporting(lock.check, backfill.progress_interval_s):
            if pending:
                context = ShardContext(layout.root, backfill, storage_config, "candidates" in tables, model,
                                       plan.work, lock.fence, uuid.uuid4().hex[:12], data.requests_format,
                                       "users" in tables)
                for marker in _generate(pending, context, write_pass, plan, data, progress):
                    progress.add(marker)
                    progress.check()
                    _failpoint("shard_committed")
        openai = backfill.output_format != "parquet" or data.requests_format == "openai_batch"
        manifest = _finish(layout, storage, run_info, plan, progress, lock, backfill, openai)
    counts = manifest["counts"]
    log.info("backfill %s complete: %d rows (%d ok, %d quarantined, %d filtered) -> %s", backfill.run_id,
             counts["total"], counts["ok"], counts["quarantined"], counts["filtered"], layout.manifest)
    return manifest
