"""index.html of the demo's report: one static page, inline CSS, images beside it, no script or link out."""

from __future__ import annotations

import html
import os
import platform
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from aigc_dist.demo.console import format_seconds

if TYPE_CHECKING:
    from aigc_dist.demo.pipeline import DemoRun

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC", sans-serif;
       color: #111827; background: #f9fafb; margin: 0; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 24px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 36px 0 10px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: #4b5563; margin: 0 0 18px; }
.cards { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px; }
@media (max-width: 720px) { .cards { grid-template-columns: 1fr; } }
.card { background: #fff; border: 1px solid #e5e7eb; border-radius: 10px; padding: 12px 14px; }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: .05em; color: #6b7280; }
.card .value { font-size: 22px; font-weight: 650; margin: 2px 0; }
.card .note { font-size: 13px; color: #4b5563; }
figure { background: #fff; border: 1px solid #e5e7eb; border-radius: 10px; margin: 0 0 12px; padding: 10px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #4b5563; padding: 6px 4px 0; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 14px; margin-bottom: 8px;
        table-layout: fixed; }
th, td { border: 1px solid #e5e7eb; padding: 6px 9px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.copy { font-size: 15px; } .who { white-space: nowrap; } .muted { color: #6b7280; font-size: 12.5px; }
.tag { display: inline-block; font-size: 11.5px; padding: 0 6px; border-radius: 8px; margin: 1px 3px 1px 0;
       background: #e5e7eb; color: #374151; }
.tag.yes { background: #dcfce7; color: #166534; } .tag.no { background: #fee2e2; color: #991b1b; }
pre { background: #111827; color: #e5e7eb; padding: 10px 12px; border-radius: 8px; overflow-x: auto;
      font-size: 12.5px; line-height: 1.45; margin: 0 0 10px; }
.where { font-size: 12.5px; color: #4b5563; margin: 4px 0 3px; }
code { font-size: 13px; background: #eef2ff; padding: 0 4px; border-radius: 4px; overflow-wrap: anywhere; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _tag(text: str, ok: bool | None = None) -> str:
    kind = "" if ok is None else (" yes" if ok else " no")
    return f'<span class="tag{kind}">{esc(text)}</span>'


def _card(label: str, value: str, note: str) -> str:
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div>'
            f'<div class="note">{esc(note)}</div></div>')


def _cards(run: DemoRun, summary: dict[str, Any]) -> str:
    counts, quality, serve = summary["counts"], summary["quality"], summary["serve"]
    trained, held = quality["trained pairs"], quality["held-out pairs"]
    training = summary["training"]
    return '<div class="cards">' + "".join([
        _card("world", f"{run.world['candidates']:,} pairs",
              f"{run.world['users']:,} users x {run.sizes.candidates_per_user} candidates, "
              f"{run.world['items']:,} items"),
        _card("training", f"loss {training['last_loss']:.3f}",
              f"{training['steps']} steps, {run.cfg.train.num_workers} {training['device']} workers, "
              f"ZeRO-{run.cfg.deepspeed.zero_stage}, {format_seconds(run.seconds['training'])}"),
        _card("backfill", f"{summary['steady']['rows_per_s']:,.0f} rows/s",
              f"once generating ({summary['throughput']['rows_per_s']:,.0f} over the whole run); {counts['ok']:,} ok, "
              f"{counts['quarantined']:,} quarantined, {counts['filtered']:,} filtered"),
        _card("grounding", f"{trained['grounding_rate']:.2f}",
              f"held-out pairs {held['grounding_rate']:.2f}; reference copy "
              f"{quality['reference copy']['grounding_rate']:.2f}"),
        _card("personalization", f"{trained['personalization_rate']:.2f}",
              f"held-out pairs {held['personalization_rate']:.2f}; reference copy "
              f"{quality['reference copy']['personalization_rate']:.2f}"),
        _card("serve", f"{serve['matched']}/{len(serve['checks'])} equal",
              f"HTTP answers = backfill copy, same seed; median {1000 * serve['median_s']:.0f} ms"),
    ]) + "</div>"


def _showcase(showcase: list[dict[str, Any]]) -> str:
    by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in showcase:
        by_item[row["item_id"]].append(row)
    parts = []
    for item_id, rows in by_item.items():
        item = rows[0]["item"]
        parts.append(f"<h3>{esc(item['title'])} <span class='muted'>{esc(item_id)} · {esc(item['category'])} · "
                     f"{esc(', '.join(item.get('attributes') or []))}</span></h3>")
        body = "".join(
            f"<tr><td class='who'>{esc(r['user_id'])}<br><span class='muted'>{esc(r['user']['segment'])} · "
            f"{esc(r['user']['locale'])} · {esc(', '.join(r['user'].get('interests') or []))}</span></td>"
            f"<td class='copy'>{esc(r['content'])}</td>"
            f"<td>{_tag('grounded', r['grounded'])}{_tag('personalized', r['personalized'])}"
            f"{_tag('held-out pair') if r['held_out'] else ''}"
            f"{_tag('served = backfill', r['served']) if 'served' in r else ''}</td></tr>"
            for r in rows)
        parts.append("<table><tr><th style='width:22%'>user</th><th>generated copy</th><th style='width:24%'>checks"
                     f"</th></tr>{body}</table>")
    return "".join(parts)


def _quality_table(quality: dict[str, dict[str, float]]) -> str:
    measures = [("grounding_rate", "grounded"), ("personalization_rate", "personalized"),
                ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("repetition_rate", "repetitive"),
                ("empty_rate", "empty"), ("mean_chars", "mean chars")]
    head = "".join(f"<th>{esc(label)}</th>" for _, label in measures)
    body = "".join(
        f"<tr><td>{esc(group)}</td><td class='num'>{int(scores['rows']):,}</td>"
        + "".join(f"<td class='num'>{scores[key]:.{1 if key == 'mean_chars' else 3}f}</td>" for key, _ in measures)
        + "</tr>" for group, scores in quality.items())
    return f"<table><tr><th style='width:15%'>copy</th><th style='width:9%'>rows</th>{head}</tr>{body}</table>"


def _errors(run: DemoRun, counts: dict[str, Any], errors: list[dict[str, str]]) -> str:
    stages = ", ".join(f"{stage}: {n}" for stage, n in sorted(counts["by_stage"].items())) or "none"
    injected = "".join(f"<li>{esc(kind)}</li>" for kind in run.world["malformed_rows"])
    rows = "".join(f"<tr><td>{esc(e['stage'])}</td><td>{esc(e['error'])}</td><td><code>{esc(e['raw'])}</code></td>"
                   "</tr>" for e in errors)
    return (f"<p>The demo appends {len(run.world['malformed_rows'])} malformed candidates to the input:</p>"
            f"<ul>{injected}</ul><p>None of them stops the run; each ends in <code>errors/</code> with the stage "
            f"and the reason. Quarantined by stage: <b>{esc(stages)}</b>; filtered by quality rules: "
            f"<b>{counts['filtered']:,}</b>.</p><table><tr><th style='width:10%'>stage</th>"
            f"<th style='width:38%'>reason</th><th>input row</th></tr>{rows}</table>")


def _serve(serve: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{esc(c['user_id'])}</td><td>{esc(c['item_id'])}</td><td class='num'>{c['seed']}</td>"
                   f"<td class='num'>{1000 * c['seconds']:.0f} ms</td>"
                   f"<td>{_tag('equal' if c['matches'] else 'differs', c['matches'])}</td>"
                   f"<td class='copy'>{esc(c['content'])}</td></tr>" for c in serve["checks"])
    return (f"<p>The Serve app (<code>aigc_dist.serve.app:application</code>) ran on the same Ray at "
            f"<code>{esc(serve['url'])}</code>. Each request below asked <code>POST /v1/generate</code> for a "
            "backfill row by user_id and item_id (features looked up server-side), with the row's seed and sampling "
            "parameters; the answer must be the backfill's copy, byte for byte.</p>"
            "<table><tr><th style='width:10%'>user</th><th style='width:9%'>item</th><th style='width:19%'>seed</th>"
            "<th style='width:9%'>latency</th><th style='width:11%'>vs backfill</th>"
            f"<th>copy</th></tr>{rows}</table>")


def _commands(commands: list[tuple[str, str, str]]) -> str:
    return "".join(f"<h3>{esc(stage)}</h3><div class='where'>this machine</div><pre>{esc(here)}</pre>"
                   f"<div class='where'>a Ray cluster / Kubernetes</div><pre>{esc(scale)}</pre>"
                   for stage, here, scale in commands)


def _files(run: DemoRun, summary: dict[str, Any]) -> str:
    entries = [("config (resolved)", run.layout.config_file), ("world", run.layout.world),
               ("checkpoints", summary["training"]["checkpoint"]), ("artifact", summary["artifact"]),
               ("backfill run", summary["backfill"]), ("demo log", run.logs["demo"]),
               ("Ray's logs", f"{run.logs['ray']}/session_latest/logs")]
    return "<table>" + "".join(f"<tr><th style='width:20%'>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>"
                               for k, v in entries) + "</table>"


def render_html(run: DemoRun, summary: dict[str, Any], showcase: list[dict[str, Any]], errors: list[dict[str, str]],
                commands: list[tuple[str, str, str]]) -> str:
    plots, seconds, manifest_tokens = summary["plots"], summary["seconds"], summary["tokens"]
    stage_times = " · ".join(f"{name} {format_seconds(s)}" for name, s in seconds.items() if name != "total")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    train = run.cfg.train
    epoch_steps = run.world["training_pairs"] // (train.micro_batch_size * train.num_workers * train.grad_accum_steps)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>aigc-dist demo report</title><style>{CSS}</style></head>
<body><main>
<h1>aigc-dist demo</h1>
<p class="sub">{esc(when)} · {esc(machine)} · local Ray + local storage · {esc(format_seconds(seconds['total']))}
({esc(stage_times)})</p>
{_cards(run, summary)}

<h2>Training: Ray Train + DeepSpeed ZeRO-{run.cfg.deepspeed.zero_stage}</h2>
<figure><img src="{plots['training']}" alt="training loss and tokens per second by step">
<figcaption>Left: mean cross-entropy of the copy tokens over each {run.cfg.train.log_every_steps}-step window,
all-reduced over the {run.cfg.train.num_workers} workers (the loss the run reports). Right: input tokens per second
of both workers together, timed on rank 0 without checkpoint time; dips are the machine's other load and the data
pipeline starting again at each epoch (every {epoch_steps} steps). Model preset
<code>{esc(run.cfg.model.preset)}</code>, {run.world['training_pairs']:,} training pairs, batch
{train.micro_batch_size} x {train.num_workers} workers.</figcaption></figure>

<h2>Backfill throughput</h2>
<figure><img src="{plots['throughput']}" alt="backfill rows and tokens per second over time">
<figcaption>Measured by the demo from the run's shard commit markers: a shard of
{run.cfg.backfill.rows_per_file:,} rows counts when its files are committed, so progress moves in steps and the
rates (right: rows/s, and generated tokens/s dashed) are over a {summary['rate_window_s']:.0f} s moving window. Time 0
is the call of <code>run_backfill</code>: the grey part is partitioning the input into shards, starting the
{run.cfg.backfill.max_actors} generator actors and generating the first shards. From the first commit to the last:
{summary['steady']['rows_per_s']:,.0f} rows/s, {summary['steady']['tokens_per_s']:,.0f} tokens/s; over the whole run
(the manifest): {summary['throughput']['rows_per_s']:,.0f} rows/s, {summary['throughput']['tokens_per_s']:,.0f}
tokens/s, {manifest_tokens['generated']:,} tokens in all.</figcaption></figure>

<h2>Quality</h2>
<figure><img src="{plots['quality']}" alt="grounding, personalization, distinct-2, repetition"></figure>
{_quality_table(summary['quality'])}
<p class="muted">Grounding: the copy names the item's title or category. Personalization: it carries a phrase of the
user's segment in the user's language. Held-out pairs were not in the training set (each user's
rank-{run.sizes.held_out_rank} candidate); the reference copy is what the model learned from. Sampling:
temperature {run.cfg.backfill.temperature}, top-p {run.cfg.backfill.top_p}, a seed per row.</p>

<h2>Same item, different users</h2>
<p>Copy from the backfill for the items the most different kinds of user were recommended (picked by who the users
are, not by how good the copy is).</p>
{_showcase(showcase)}

<h2>Quarantine</h2>
{_errors(run, summary['counts'], errors)}

<h2>Online: Ray Serve answers as the backfill did</h2>
{_serve(summary['serve'])}

<h2>Run each stage again, here or at scale</h2>
{_commands(commands)}

<h2>Files</h2>
{_files(run, summary)}
</main></body></html>
"""
