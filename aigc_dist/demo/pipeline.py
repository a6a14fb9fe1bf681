"""`aigc-dist demo`: the whole pipeline on one machine, on one local Ray, through the real code paths.

    [1/5] world     the synthetic world (users, items, top-k candidates, reference copy), plus the
                    training pairs (each user's `held_out_rank` candidate left out) and the candidates
                    with a few deliberately malformed rows appended
    [2/5] training  `run_training`: Ray Train + DeepSpeed ZeRO-2, 2 workers, checkpoints, export
    [3/5] backfill  `run_backfill` over every candidate with that artifact: data/, errors/, manifest
    [4/5] serve     `serve.app.application` on Ray Serve; a few backfill rows asked again over HTTP
                    with their seed and sampling parameters must come back as the same copy
    [5/5] report    report/index.html with PNG plots (report.py)

Progress goes to the terminal; everything else (Ray, DeepSpeed, our loggers) to the demo's log file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aigc_dist.batch.layout import RunLayout, read_output
from aigc_dist.batch.run_state import read_commits
from aigc_dist.config import AigcConfig, ConfigError, dump_config
from aigc_dist.demo.console import Console, Reading, Stage, format_seconds, routed_output
from aigc_dist.demo.settings import DemoLayout, DemoSizes, demo_config
from aigc_dist.demo.world import WorldConfig, make_world, write_world
from aigc_dist.optional import optional_import
from aigc_dist.storage import Storage, join_uri, parse_uri

log = logging.getLogger(__name__)

STAGES = 5
# Logical CPUs of the demo's Ray: more than the actors need at once (2 workers, or 2 preparers + 2
# generators), so Ray Data's read and finish tasks always find room (see DEVELOPERS notes).
RAY_LOGICAL_CPUS = 8
# Ray's socket paths must fit in ~107 bytes; a longer temp dir than this goes to /tmp instead.
MAX_RAY_TEMP_DIR = 40
DEMO_DIRS = ("world", "inputs", "runs", "backfill", "report")


@dataclass
class DemoRun:
    """What the stages found; the report is drawn from it."""

    cfg: AigcConfig
    sizes: DemoSizes
    layout: DemoLayout
    seconds: dict[str, float] = field(default_factory=dict)
    world: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    throughput: list[tuple[float, int, int]] = field(default_factory=list)  # (s since start, rows, tokens)
    serve: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)


def run_demo(output: str, config_file: str | None = None, overrides: Sequence[str] = (), tiny: bool = False
             ) -> dict[str, Any]:
    """Run the five stages into `output` (path or s3:// URI); returns the summary the report holds."""
    optional_import("matplotlib", "demo", "the demo's report")  # before minutes of training, not after
    cfg, sizes, layout = demo_config(output, config_file, overrides, tiny)
    storage = Storage(cfg.storage)
    run = DemoRun(cfg, sizes, layout)
    _clear_previous(layout, storage)
    local = parse_uri(layout.root).scheme != "s3"
    log_dir = layout.at("logs") if local else tempfile.mkdtemp(prefix="aigc-demo-logs-")
    os.makedirs(log_dir, exist_ok=True)
    run.logs["demo"] = os.path.join(log_dir, "demo.log")
    ray_dir = os.path.join(os.path.abspath(log_dir), "ray")
    run.logs["ray"] = ray_dir if len(ray_dir) <= MAX_RAY_TEMP_DIR else f"/tmp/aigc-demo-{os.getpid()}"
    started = time.monotonic()
    with routed_output(run.logs["demo"]) as console:
        console.line(f"aigc-dist demo{' --tiny' if tiny else ''}: output {layout.root}")
        console.line(f"  logs: {run.logs['demo']} (Ray's own: {run.logs['ray']}/session_latest/logs)")
        _start_ray(run.logs["ray"])
        try:
            storage.write_bytes(layout.config_file, dump_config(cfg).encode())
            _stage_world(run, storage, Stage(console, 1, STAGES, "world"))
            _stage_train(run, storage, Stage(console, 2, STAGES, "training"))
            _stage_backfill(run, storage, Stage(console, 3, STAGES, "backfill"))
            from aigc_dist.demo.report import WorldLookup, pick_showcase, write_report

            data, errors = read_output(layout.run_root, storage)
            world = WorldLookup.load(run, storage)
            showcase = pick_showcase(data, run, world)
            _stage_serve(run, showcase, Stage(console, 4, STAGES, "serve"))
            stage = Stage(console, 5, STAGES, "report")
            stage.show("plots and index.html")
            run.seconds["total"] = time.monotonic() - started
            summary = write_report(run, data, errors, world, showcase, storage)
            run.seconds["report"] = stage.done(summary["report"])
        except BaseException as exc:
            console.line(f"aigc-dist demo: failed: {exc!r}; the log says more: {run.logs['demo']}")
            raise
        finally:
            import ray

            ray.shutdown()
        _print_summary(console, summary, time.monotonic() - started)
    return summary


def _clear_previous(layout: DemoLayout, storage: Storage) -> None:
    """A new demo starts from nothing: a previous demo's training run would otherwise be resumed (and
    be finished already), and its backfill found complete. Only the demo's own directories go, and only
    from an output a demo wrote (its config.toml is there): anything else stops with a config error."""
    found = [name for name in DEMO_DIRS if storage.list(layout.at(name))]
    if found and not storage.exists(layout.config_file):
        raise ConfigError(f"--output {layout.root} already holds {', '.join(found)}/ that no demo wrote; "
                          "give a new or empty directory")
    for name in found:
        storage.delete_tree(layout.at(name), keep_root=True)


def _start_ray(temp_dir: str) -> None:
    """One local Ray for every stage, its logs in `temp_dir` and not on the terminal."""
    import ray

    if os.environ.pop("RAY_ADDRESS", None):
        log.info("RAY_ADDRESS is set but the demo runs on a local Ray of its own; unset it for the stages")
    # Metrics reach Ray's port every second (10 s by default): the training stage's last worker waits
    # one export before it exits (ActorMetrics.flush), 1.5 s instead of 15 s of a short demo.
    ray.init(address="local", num_cpus=RAY_LOGICAL_CPUS, include_dashboard=False, log_to_driver=False,
             object_store_memory=1024**3, _temp_dir=temp_dir, _system_config={"metrics_report_interval_ms": 1000})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


# -- 1. world ----------------------------------------------------------------------------------


def malformed_candidates(candidates: pa.Table, max_id_chars: int) -> tuple[pa.Table, list[str]]:
    """Rows that must end in errors/, never stop the run: one per kind of bad input, with what each is."""
    first = candidates.slice(0, 1).to_pylist()[0]
    rows = [
        ({**first, "user_id": "u-not-a-user"}, "unknown user_id"),
        ({**first, "item_id": "i-not-an-item"}, "unknown item_id"),
        ({**first, "user_id": None}, "null user_id"),
        ({**first, "user_id": "u" + "9" * max_id_chars}, f"user_id over {max_id_chars} characters"),
        (dict(first), "the same (user, item) pair twice"),
    ]
    return pa.Table.from_pylist([row for row, _ in rows], schema=candidates.schema), [what for _, what in rows]


def _stage_world(run: DemoRun, storage: Storage, stage: Stage) -> None:
    sizes, layout = run.sizes, run.layout
    stage.show(f"{sizes.num_users:,} users x {sizes.candidates_per_user} candidates")
    world = make_world(WorldConfig(num_users=sizes.num_users, num_items=sizes.num_items,
                                   candidates_per_user=sizes.candidates_per_user, seed=sizes.world_seed))
    fs, path = storage.filesystem(layout.world)
    counts = write_world(world, path, filesystem=fs)
    examples = world.training_examples()
    in_training = pc.not_equal(world.candidates["rank"], sizes.held_out_rank)
    train = examples.filter(in_training)
    bad, bad_kinds = malformed_candidates(world.candidates, run.cfg.data.max_id_chars)
    _write_parquet(storage, join_uri(layout.inputs, "train.parquet"), train)
    _write_parquet(storage, join_uri(layout.inputs, "candidates.parquet"), pa.concat_tables([world.candidates, bad]))
    run.world = {**counts, "training_pairs": train.num_rows, "held_out_pairs": examples.num_rows - train.num_rows,
                 "malformed_rows": bad_kinds}
    run.seconds["world"] = stage.done(
        f"{counts['users']:,} users, {counts['items']:,} items, {counts['candidates']:,} candidates "
        f"(+{len(bad_kinds)} malformed); {train.num_rows:,} training pairs")


def _write_parquet(storage: Storage, uri: str, table: pa.Table) -> None:
    fs, path = storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


# -- 2. training -------------------------------------------------------------------------------


class TrainingWatcher:
    """Progress of a training run from its newest checkpoint (step, loss), as any reader could see it."""

    def __init__(self, run_dir: str, storage: Storage, max_steps: int, num_workers: int):
        self.run_dir, self.storage, self.max_steps = run_dir, storage, max_steps
        self.waiting = self.last = f"starting {num_workers} Ray Train workers + DeepSpeed"
        self.seen: list[tuple[float, int]] = []  # (monotonic time first seen, step)

    def read(self) -> Reading:
        from aigc_dist.train.checkpoints import find_checkpoint, read_trainer_state

        try:
            state = read_trainer_state(find_checkpoint(self.run_dir, self.storage), self.storage)
        except (OSError, ValueError):  # no checkpoint yet (a ConfigError), or one deleted or written while read
            return self.waiting if not self.seen else self.last, None
        now = time.monotonic()
        if not self.seen or self.seen[-1][1] != state.step:
            self.seen.append((now, state.step))
        loss = state.history[-1]["loss"] if state.history else float("nan")
        detail = self.last = f"step {state.step}/{self.max_steps}  loss {loss:.3f}"
        if len(self.seen) < 2:
            return detail, None
        (t0, s0), (t1, s1) = self.seen[0], self.seen[-1]
        seconds_per_step = (t1 - t0) / max(s1 - s0, 1)
        return detail, max((self.max_steps - s1) * seconds_per_step - (now - t1), 0.0)


def _stage_train(run: DemoRun, storage: Storage, stage: Stage) -> None:
    from aigc_dist.train.trainer import resolve_use_gpu, run_training

    cfg = run.cfg
    watcher = TrainingWatcher(join_uri(cfg.train.storage_path, cfg.train.run_name), storage, cfg.train.max_steps,
                              cfg.train.num_workers)
    stage.show(watcher.waiting)
    with stage.watching(watcher.read):
        result = run_training(cfg.train, cfg.deepspeed, cfg.model, cfg.data, cfg.storage)
    if result.artifact_uri is None:
        raise RuntimeError("training finished without exporting an artifact (train.export_at_end is false)")
    history = result.history
    device = "GPU" if resolve_use_gpu(cfg.train) else "CPU"
    run.training = {"run_name": result.run_name, "steps": result.step, "history": history,
                    "checkpoint": result.checkpoint_uri, "artifact": result.artifact_uri, "device": device,
                    "first_loss": history[0]["loss"] if history else None,
                    "last_loss": history[-1]["loss"] if history else None}
    run.seconds["training"] = stage.done(
        f"{result.step} steps on {cfg.train.num_workers} {device} workers, ZeRO-{cfg.deepspeed.zero_stage}, "
        f"loss {run.training['first_loss']:.2f} -> {run.training['last_loss']:.3f}")


# -- 3. backfill -------------------------------------------------------------------------------


class BackfillWatcher:
    """Progress of a backfill from its plan and commit markers; keeps (time, rows, tokens) at each
    change for the throughput plot."""

    def __init__(self, root: str, storage: Storage, total_rows: int):
        self.layout, self.storage, self.total_rows = RunLayout(root), storage, total_rows
        self.started = time.monotonic()
        self.samples: list[tuple[float, int, int]] = [(0.0, 0, 0)]

    def read(self) -> Reading:
        if not self.storage.exists(self.layout.plan):
            return f"partitioning {self.total_rows:,} candidates into shards", None
        try:
            markers = read_commits(self.layout, self.storage).values()
        except (OSError, ValueError):  # a marker being written: the next reading counts it
            return f"{self.samples[-1][1]:,}/{self.total_rows:,} rows", None
        rows = sum(m.stats.counts.total for m in markers)
        tokens = sum(m.stats.generated_tokens for m in markers)
        now = time.monotonic() - self.started
        if rows != self.samples[-1][1]:
            self.samples.append((now, rows, tokens))
        detail = f"{rows:,}/{self.total_rows:,} rows"
        # The first commit's time is mostly start-up; the rate is from there on, once a few shards have landed.
        (t0, r0, _), (t1, r1, _) = self.samples[min(1, len(self.samples) - 1)], self.samples[-1]
        if len(self.samples) < 4 or t1 - t0 < 5.0:
            return detail, None
        rate = (r1 - r0) / (t1 - t0)
        return f"{detail}  {rate:,.0f} rows/s", max((self.total_rows - r1) / max(rate, 1e-9) - (now - t1), 0.0)


def _stage_backfill(run: DemoRun, storage: Storage, stage: Stage) -> None:
    from aigc_dist.batch.pipeline import run_backfill

    cfg = run.cfg
    total = run.world["candidates"] + len(run.world["malformed_rows"])
    watcher = BackfillWatcher(run.layout.run_root, storage, total)
    stage.show(f"partitioning {total:,} candidates into shards")
    with stage.watching(watcher.read):
        manifest = run_backfill(cfg.backfill, cfg.data, cfg.storage, cfg.metrics)
    watcher.read()  # the last commits, if the watcher had not seen them yet
    run.manifest, run.throughput = manifest, watcher.samples
    counts = manifest["counts"]
    run.seconds["backfill"] = stage.done(
        f"{counts['total']:,} rows: {counts['ok']:,} ok, {counts['quarantined']:,} quarantined, "
        f"{counts['filtered']:,} filtered; {manifest['throughput']['rows_per_s']:,.0f} rows/s")


# -- 4. serve ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post_json(url: str, body: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        return json.loads(answer.read())


def serve_request(row: dict[str, Any]) -> dict[str, Any]:
    """The online request that asks for a backfill row's copy: same ids, seed and sampling."""
    request = {"user_id": row["user_id"], "item_id": row["item_id"], "seed": row["seed"],
               "max_new_tokens": row["max_new_tokens"], "temperature": row["temperature"]}
    return {**request, **{k: row[k] for k in ("top_k", "top_p") if row.get(k) is not None}}


def _stage_serve(run: DemoRun, showcase: list[dict[str, Any]], stage: Stage) -> None:
    from ray import serve

    from aigc_dist.serve.app import application

    cfg = run.cfg
    cfg.serve.port = free_port()
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    stage.show(f"starting the app at {url}")
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    checks = []
    try:
        serve.run(application(cfg), name="aigc-demo", route_prefix="/")
        rows = showcase[: run.sizes.serve_requests]
        for number, row in enumerate(rows, 1):
            stage.show(f"request {number}/{len(rows)}: POST {url}/v1/generate")
            tick = time.perf_counter()
            answer = _post_json(f"{url}/v1/generate", {"requests": [serve_request(row)]})
            seconds = time.perf_counter() - tick
            content = answer["results"][0]["content"]
            checks.append({"user_id": row["user_id"], "item_id": row["item_id"], "seed": row["seed"],
                           "seconds": seconds, "content": content, "matches": content == row["content"]})
            row["served"] = content == row["content"]
    finally:
        serve.shutdown()
    matched = sum(c["matches"] for c in checks)
    run.serve = {"url": url, "checks": checks, "matched": matched,
                 "median_s": statistics.median(c["seconds"] for c in checks) if checks else None}
    if matched != len(checks):
        raise RuntimeError(f"serve answered {len(checks) - matched} of {len(checks)} requests with copy other "
                           f"than the backfill's for the same seed: {checks}")
    run.seconds["serve"] = stage.done(f"{matched}/{len(checks)} answers over HTTP equal the backfill's copy "
                                      f"(median {1000 * run.serve['median_s']:.0f} ms)")


# -- summary -----------------------------------------------------------------------------------


def _print_summary(console: Console, summary: dict[str, Any], seconds: float) -> None:
    console.line()
    console.line(f"aigc-dist demo: done in {format_seconds(seconds)}")
    for label, text in summary["lines"]:
        console.line(f"  {label:<9} {text}")
    console.line(f"  {'report':<9} {summary['report']}")
