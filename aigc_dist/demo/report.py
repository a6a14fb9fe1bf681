"""The demo's report: `report/index.html` (no script, no external link) beside its PNG plots.

Plots: training loss and training tokens/s per logged step (from the run's history), backfill rows/s
and tokens/s over time (from the shard commits the demo watched), and the text quality measures of
`aigc_dist.evaluation.text` on pairs seen in training, held-out pairs and the reference copy.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from aigc_dist.demo.console import format_seconds
from aigc_dist.demo.report_html import render_html
from aigc_dist.demo.world import world_quality
from aigc_dist.evaluation.text import evaluate_text
from aigc_dist.optional import optional_import
from aigc_dist.storage import Storage, join_uri

if TYPE_CHECKING:
    from aigc_dist.demo.pipeline import DemoRun

PLOTS = {"training": "training.png", "throughput": "throughput.png", "quality": "quality.png"}
# Window of the backfill rate curve: commits arrive a shard at a time, so a rate needs a few of them.
RATE_WINDOW_FRACTION, MIN_RATE_WINDOW_S = 0.15, 5.0
COLORS = {"main": "#2563eb", "second": "#ea580c", "grey": "#6b7280"}


def _read_table(storage: Storage, uri: str) -> pa.Table:
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs)


@dataclass(frozen=True)
class WorldLookup:
    """The world's tables by id, which pairs were held out of training, and the reference copy."""

    users: dict[str, dict[str, Any]]
    items: dict[str, dict[str, Any]]
    held_out: set[tuple[str, str]]
    reference: list[dict[str, Any]]  # user_id, item_id, copy

    @classmethod
    def load(cls, run: DemoRun, storage: Storage) -> WorldLookup:
        def table(name: str) -> list[dict[str, Any]]:
            return _read_table(storage, join_uri(run.layout.world, f"{name}.parquet")).to_pylist()

        rank = run.sizes.held_out_rank
        return cls(users={u["user_id"]: u for u in table("users")}, items={i["item_id"]: i for i in table("items")},
                   held_out={(c["user_id"], c["item_id"]) for c in table("candidates") if c["rank"] == rank},
                   reference=table("copy"))


def pick_showcase(data: pa.Table, run: DemoRun, world: WorldLookup) -> list[dict[str, Any]]:
    """Backfill rows for the side-by-side table: the items pitched to the most different kinds of user
    (segments, then locales), each with up to `table_users` users of different segments, both locales
    first. Chosen by who the users are, never by how good the copy is."""
    users = world.users
    by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(data.to_pylist(), key=lambda r: r["user_id"]):
        by_item[row["item_id"]].append(row)

    def variety(item_id: str) -> tuple[int, int, str]:
        kinds = [users[r["user_id"]] for r in by_item[item_id]]
        return -len({u["segment"] for u in kinds}), -len({u["locale"] for u in kinds}), item_id

    showcase = []
    for item_id in sorted(by_item, key=variety)[: run.sizes.table_items]:
        picked: list[dict[str, Any]] = []
        for locale_first in (True, False):
            for row in by_item[item_id]:
                user = users[row["user_id"]]
                new_segment = user["segment"] not in {users[p["user_id"]]["segment"] for p in picked}
                new_locale = user["locale"] not in {users[p["user_id"]]["locale"] for p in picked}
                if len(picked) < run.sizes.table_users and new_segment and (new_locale or not locale_first):
                    picked.append(row)
        showcase += [{**row, "user": users[row["user_id"]], "item": world.items[item_id],
                      "held_out": (row["user_id"], item_id) in world.held_out} for row in picked]
    return showcase


def quality_table(data: pa.Table, world: WorldLookup) -> dict[str, dict[str, float]]:
    """evaluate_text by the world's quality rules on the generated copy of trained and held-out pairs, and on
    the reference copy."""
    groups: dict[str, list[tuple[str, str, str]]] = {"trained pairs": [], "held-out pairs": []}
    for row in data.select(["user_id", "item_id", "content"]).to_pylist():
        group = "held-out pairs" if (row["user_id"], row["item_id"]) in world.held_out else "trained pairs"
        groups[group].append((row["content"], row["user_id"], row["item_id"]))
    groups["reference copy"] = [(r["copy"], r["user_id"], r["item_id"]) for r in world.reference]
    table = {}
    for name, rows in groups.items():
        scores = evaluate_text([t for t, _, _ in rows], [world.users[u] for _, u, _ in rows],
                               [world.items[i] for _, _, i in rows], world_quality())
        table[name] = {**scores, "rows": len(rows)}
    return table


def rate_curve(samples: list[tuple[float, int, int]], window_s: float) -> tuple[list[float], list[float], list[float]]:
    """(seconds, rows/s, tokens/s) once a second: what was committed over the last `window_s` seconds."""
    if len(samples) < 2:
        return [], [], []

    def at(t: float) -> tuple[int, int]:  # committed rows and tokens at time t (a step function)
        rows = tokens = 0
        for ts, r, k in samples:
            if ts > t:
                break
            rows, tokens = r, k
        return rows, tokens

    times, rows_s, tokens_s = [], [], []
    end, t = samples[-1][0], 0.0
    while t <= end + 1e-9:
        (r1, k1), (r0, k0) = at(t), at(t - window_s)
        span = min(window_s, t) or 1.0
        times.append(t)
        rows_s.append((r1 - r0) / span)
        tokens_s.append((k1 - k0) / span)
        t += 1.0
    return times, rows_s, tokens_s


def _figure(rows: int = 1, height: float = 3.0) -> tuple[Any, Any]:
    matplotlib = optional_import("matplotlib", "demo", "the demo's report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, rows, figsize=(4.6 * rows, height), dpi=110)
    for ax in axes if rows > 1 else [axes]:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(alpha=0.25)
    return fig, axes


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def plot_training(history: list[dict[str, float]]) -> bytes:
    from matplotlib.ticker import FuncFormatter

    fig, (loss_ax, rate_ax) = _figure(2)
    steps = [h["step"] for h in history]
    loss_ax.plot(steps, [h["loss"] for h in history], color=COLORS["main"], lw=1.6)
    loss_ax.set_yscale("log")  # from ~5.6 (a uniform guess over 264 byte tokens) to ~0.1: log shows both ends
    plain = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "125" else "")
    loss_ax.yaxis.set_major_formatter(plain)
    loss_ax.yaxis.set_minor_formatter(plain)
    loss_ax.set(title="training loss (copy tokens)", xlabel="optimizer step", ylabel="cross-entropy, nats")
    rate_ax.plot(steps, [h.get("tokens_per_s", 0.0) / 1000 for h in history], color=COLORS["second"], lw=1.4)
    rate_ax.set(title="training throughput, both workers", xlabel="optimizer step", ylabel="thousand tokens/s")
    rate_ax.set_ylim(bottom=0)
    return _png(fig)


def steady_rates(samples: list[tuple[float, int, int]]) -> tuple[float, float]:
    """(rows/s, tokens/s) from the first commit to the last: the pipeline once it is generating."""
    if len(samples) < 3:
        return 0.0, 0.0
    (t0, r0, k0), (t1, r1, k1) = samples[1], samples[-1]
    span = max(t1 - t0, 1e-9)
    return (r1 - r0) / span, (k1 - k0) / span


def plot_throughput(samples: list[tuple[float, int, int]]) -> tuple[bytes, float]:
    """Rows committed over time, and rows/s + tokens/s over a moving window; returns the PNG and the window."""
    end = samples[-1][0] if samples else 0.0
    window = max(MIN_RATE_WINDOW_S, RATE_WINDOW_FRACTION * end)
    times, rows_s, tokens_s = rate_curve(samples, window)
    fig, (done_ax, rate_ax) = _figure(2)
    first_commit = samples[1][0] if len(samples) > 1 else end
    for ax in (done_ax, rate_ax):
        ax.axvspan(0, first_commit, color=COLORS["grey"], alpha=0.12, lw=0)
        ax.text(first_commit / 2, 0.5, "partition,\nstart actors,\nfirst shard", ha="center", va="center",
                transform=ax.get_xaxis_transform(), fontsize=8, color=COLORS["grey"])
        ax.set_xlabel("seconds since the backfill started")
    done_ax.step([t for t, _, _ in samples], [r for _, r, _ in samples], where="post", color=COLORS["main"], lw=1.6)
    done_ax.set(title="rows committed (a step per shard)", ylabel="rows")
    rows_line = rate_ax.plot(times, rows_s, color=COLORS["main"], lw=1.6, label="rows/s (left)")
    rate_ax.set(title=f"throughput ({window:.0f} s moving window)", ylabel="rows/s")
    tokens_ax = rate_ax.twinx()  # tokens/s follows rows/s closely: copy is about as long whoever it is for
    tokens_line = tokens_ax.plot(times, [k / 1000 for k in tokens_s], color=COLORS["second"], lw=1.2, ls="--",
                                 label="thousand tokens/s (right)")
    tokens_ax.set_ylabel("thousand tokens/s")
    tokens_ax.spines[["top"]].set_visible(False)
    rate_ax.legend(handles=rows_line + tokens_line, fontsize=7.5, loc="lower right", frameon=False)
    for ax in (done_ax, rate_ax, tokens_ax):
        ax.set_ylim(bottom=0)
    return _png(fig), window


def plot_quality(quality: dict[str, dict[str, float]]) -> bytes:
    # distinct-n is in the table only: template-like reference copy scores low on it, which reads as "worse".
    measures = {"grounding": ("grounding_rate", False), "personalization": ("personalization_rate", False),
                "no repetition": ("repetition_rate", True), "non-empty": ("empty_rate", True)}  # (key, 1 - rate)
    fig, ax = _figure(1, height=3.0)
    fig.set_size_inches(9.2, 3.0)
    width = 0.8 / len(quality)
    colors = [COLORS["main"], COLORS["second"], COLORS["grey"]]
    for k, (group, scores) in enumerate(quality.items()):
        values = [1 - scores[key] if inverted else scores[key] for key, inverted in measures.values()]
        xs = [i + (k - (len(quality) - 1) / 2) * width for i in range(len(measures))]
        bars = ax.bar(xs, values, width * 0.95, label=f"{group} ({scores['rows']:,})", color=colors[k % 3])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(measures)), list(measures))
    ax.set(ylim=(0, 1.12), ylabel="share of copy", title="copy quality (aigc_dist.evaluation.text)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(quality), frameon=False, bbox_to_anchor=(0.5, -0.12))
    return _png(fig)


def error_summary(errors: pa.Table, limit: int = 12) -> list[dict[str, str]]:
    """The quarantined and filtered rows (the first `limit`): stage, reason, the raw input row."""
    rows = errors.select(["stage", "error", "raw"]).to_pylist()[:limit]
    return [{"stage": r["stage"], "error": r["error"], "raw": _clip(r["raw"] or "", 120)} for r in rows]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rerun_commands(run: DemoRun) -> list[tuple[str, str, str]]:
    """(stage, this machine, at scale) commands; the config file is the demo's resolved config."""
    config, cfg, sizes = run.layout.config_file, run.cfg, run.sizes
    world = ("python -c \"from aigc_dist.demo.world import WorldConfig, write_world\n"
             "write_world(WorldConfig(num_users={users}, num_items={items}, "
             f"candidates_per_user={sizes.candidates_per_user}), {{where!r}})\"")
    s3_tables = ("  --data.users=s3://BUCKET/world/users.parquet --data.items=s3://BUCKET/world/items.parquet")
    check = run.serve["checks"][0] if run.serve.get("checks") else {"user_id": "u000000", "item_id": "i00000"}
    return [
        ("world", world.format(users=sizes.num_users, items=sizes.num_items, where=run.layout.world),
         world.format(users="1_000_000", items="50_000", where="world") + "\naws s3 sync world s3://BUCKET/world"),
        ("training", f"aigc-dist train --config {config} --train.run_name=again --model.version=v2",
         f"aigc-dist submit train --config {config} --address http://HEAD:8265 --wait \\\n"
         "  --train.run_name=copy-lm-small --model.preset=small --train.num_workers=8 --train.use_gpu=true \\\n"
         "  --train.storage_path=s3://BUCKET/runs --train.dataset=s3://BUCKET/world/copy.parquet \\\n"
         f"{s3_tables}\n"
         "# on Kubernetes: the RayJob aigc-train (k8s/base/rayjob-train.yaml, config k8s/base/config/train.toml)\n"
         "kubectl kustomize k8s/overlays/prod | kubectl apply -f - && kubectl get rayjob aigc-train -w"),
        ("backfill", f"aigc-dist backfill --config {config} --backfill.run_id=again\n"
         f"aigc-dist backfill status {join_uri(cfg.backfill.output, 'again')}",
         f"aigc-dist submit backfill --config {config} --address http://HEAD:8265 --wait \\\n"
         "  --backfill.run_id=copy-2026-11 --backfill.output=s3://BUCKET/backfills \\\n"
         "  --backfill.artifact=s3://BUCKET/runs/models/copy-lm/v1 \\\n"
         "  --backfill.max_actors=32 --backfill.gpus_per_actor=1 --backfill.rows_per_file=100000 \\\n"
         f"{s3_tables} \\\n  --data.candidates=s3://BUCKET/world/candidates.parquet\n"
         "# on Kubernetes: the RayJob aigc-backfill (k8s/base/rayjob-backfill.yaml, "
         "config k8s/base/config/backfill.toml)"),
        ("serve", f"aigc-dist serve --config {config} --serve.port=8000\n"
         "curl -s localhost:8000/v1/generate -H 'content-type: application/json' \\\n"
         f"  -d '{{\"requests\": [{{\"user_id\": \"{check['user_id']}\", \"item_id\": \"{check['item_id']}\", "
         "\"seed\": 1}]}'",
         "RAY_ADDRESS=ray://HEAD:10001 aigc-dist serve --config serve.toml \\\n"
         "  --serve.artifact=s3://BUCKET/runs/models/copy-lm/v1 --serve.max_replicas=8\n"
         "# on Kubernetes: the RayService aigc-serve (k8s/base/rayservice.yaml, config k8s/base/config/serve.toml,\n"
         "# import_path aigc_dist.serve.app:build_app)"),
    ]


def summary_lines(run: DemoRun, quality: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    world, training, manifest, serve = run.world, run.training, run.manifest, run.serve
    counts, throughput = manifest["counts"], manifest["throughput"]
    stages = ", ".join(f"{stage} {n}" for stage, n in sorted(counts["by_stage"].items()))
    trained, held, reference = quality["trained pairs"], quality["held-out pairs"], quality["reference copy"]
    rows_s, tokens_s = steady_rates(run.throughput)
    return [
        ("world", f"{world['users']:,} users, {world['items']:,} items, {world['candidates']:,} candidates "
                  f"(+{len(world['malformed_rows'])} malformed), {world['training_pairs']:,} training pairs"),
        ("training", f"{training['steps']} steps, {run.cfg.train.num_workers} {training['device']} workers, "
                     f"DeepSpeed ZeRO-{run.cfg.deepspeed.zero_stage}, loss {training['first_loss']:.2f} -> "
                     f"{training['last_loss']:.3f} in {format_seconds(run.seconds['training'])}"),
        ("backfill", f"{counts['total']:,} rows: {counts['ok']:,} ok, {counts['quarantined']:,} quarantined "
                     f"({stages or 'none'}), {counts['filtered']:,} filtered; {rows_s:,.0f} rows/s and "
                     f"{tokens_s:,.0f} tokens/s generating, {throughput['rows_per_s']:,.0f} rows/s overall"),
        ("quality", f"grounding {trained['grounding_rate']:.2f} (held-out {held['grounding_rate']:.2f}), "
                    f"personalization {trained['personalization_rate']:.2f} "
                    f"(held-out {held['personalization_rate']:.2f}); reference copy "
                    f"{reference['grounding_rate']:.2f} / {reference['personalization_rate']:.2f}"),
        ("serve", f"{serve['matched']}/{len(serve['checks'])} HTTP answers equal the backfill's copy for the same "
                  f"seed (median {1000 * serve['median_s']:.0f} ms)"),
    ]


def write_report(run: DemoRun, data: pa.Table, errors: pa.Table, world: WorldLookup,
                 showcase: list[dict[str, Any]], storage: Storage) -> dict[str, Any]:
    """Write the plots, index.html and summary.json under report/; returns the summary."""
    report = run.layout.report
    quality = quality_table(data, world)
    throughput_png, window = plot_throughput(run.throughput)
    images = {"training": plot_training(run.training["history"]), "throughput": throughput_png,
              "quality": plot_quality(quality)}
    for name, png in images.items():
        storage.write_bytes(join_uri(report, PLOTS[name]), png)
    lines = summary_lines(run, quality)
    summary = {
        "report": join_uri(report, "index.html"), "lines": lines, "seconds": run.seconds,
        "world": run.world, "counts": run.manifest["counts"], "throughput": run.manifest["throughput"],
        "tokens": run.manifest["tokens"], "quality": quality, "plots": PLOTS, "rate_window_s": window,
        "steady": dict(zip(("rows_per_s", "tokens_per_s"), steady_rates(run.throughput), strict=True)),
        "serve": run.serve, "artifact": run.training["artifact"], "backfill": run.manifest["root"],
        "training": {k: v for k, v in run.training.items() if k != "history"}, "logs": run.logs,
        "showcase": [{k: row[k] for k in ("user_id", "item_id", "content", "seed", "held_out")} for row in showcase],
    }
    page = render_html(run, summary, showcase, error_summary(errors), rerun_commands(run))
    storage.write_bytes(join_uri(report, "index.html"), page.encode("utf-8"))
    storage.write_bytes(join_uri(report, "summary.json"), json.dumps(summary, indent=2, default=str).encode())
    return summary
