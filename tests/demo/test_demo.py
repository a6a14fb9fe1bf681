"""`aigc-dist demo --tiny` as a user runs it: its own local Ray, every stage, a report that opens offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from aigc_dist.batch.layout import read_output

REPO = Path(__file__).resolve().parents[2]
MALFORMED_ROWS = 5  # the demo's injected bad candidates (pipeline.malformed_candidates)


class References(HTMLParser):
    """Every src/href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~2-3 minutes alone; a loaded machine stretches Ray and DeepSpeed start-up
def test_tiny_demo_runs_every_stage_and_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as on a laptop
    done = subprocess.run([sys.executable, "-m", "aigc_dist.cli", "demo", "--tiny", "--output", str(out)],
                          capture_output=True, text=True, timeout=840, cwd=REPO, env=env)
    shown = done.stdout + done.stderr
    log = out / "logs" / "demo.log"
    assert done.returncode == 0, shown[-3000:] + (log.read_text()[-5000:] if log.exists() else "")

    # Progress per stage on the terminal; Ray's own output in the log file the demo names.
    for number, stage in enumerate(["world", "training", "backfill", "serve", "report"], 1):
        assert f"[{number}/5] {stage}" in done.stdout and "done in" in done.stdout
    assert "Started a local Ray instance" not in shown and "Started a local Ray instance" in log.read_text()
    assert str(log) in done.stdout
    summary = json.loads((out / "report" / "summary.json").read_text())

    # The backfill: every candidate, good or bad, ends in data/ or errors/ exactly once, and the manifest adds up.
    root = out / "backfill" / "demo"
    manifest = json.loads((root / "_manifest.json").read_text())
    counts = manifest["counts"]
    candidates = pq.read_metadata(out / "world" / "candidates.parquet").num_rows
    assert counts["total"] == candidates + MALFORMED_ROWS == counts["ok"] + counts["quarantined"] + counts["filtered"]
    assert counts["quarantined"] >= MALFORMED_ROWS and counts["by_stage"].get("join") == 2
    data, errors = read_output(str(root))
    assert data.num_rows == counts["ok"] == sum(f["rows"] for f in manifest["files"]["data"])
    assert errors.num_rows == counts["quarantined"] + counts["filtered"]
    assert len(set(data["request_id"].to_pylist())) == data.num_rows
    reasons = " | ".join(errors["error"].to_pylist())
    assert "unknown user 'u-not-a-user'" in reasons and "unknown item 'i-not-an-item'" in reasons
    for entry in manifest["files"]["data"] + manifest["files"]["errors"]:
        assert (root / entry["path"]).stat().st_size == entry["bytes"]
    # The demo scores its copy by the synthetic world's rules, given as any user gives theirs.
    quality = manifest["quality"]
    assert quality["rules"] == {"mention_fields": ["title", "category"], "personalization_feature": "segment"}
    assert quality["scored"] == counts["ok"] + counts["filtered"] and data["personalized"].null_count == 0
    # The rate covers the kept copy and the filtered copy: at least the kept personalized rows, at most those
    # plus every filtered one.
    personalized = round(quality["personalized_rate"] * quality["scored"])
    kept = sum(data["personalized"].to_pylist())
    assert kept <= personalized <= kept + counts["filtered"]  # the tiny demo's model may personalize none

    # Training checkpointed and exported; Serve answered as the backfill wrote.
    assert list((out / "runs" / "demo-copy-lm").glob("checkpoint_*"))
    assert (Path(summary["artifact"]) / "config.json").is_file()
    assert summary["serve"]["checks"] and summary["serve"]["matched"] == len(summary["serve"]["checks"])

    # The report: its PNGs exist and decode, and the page points only at files that exist beside it.
    report = out / "report"
    page = (report / "index.html").read_text(encoding="utf-8")
    parser = References()
    parser.feed(page)
    assert sorted(parser.found) == sorted(summary["plots"].values())
    for name in parser.found:
        assert "://" not in name and not name.startswith("/")
        with Image.open(report / name) as image:
            image.load()
            assert image.format == "PNG" and image.width >= 400 and image.height >= 200
    assert "Same item, different users" in page and "u-not-a-user" in page
    assert "aigc-dist submit train" in page and "kubectl" in page
