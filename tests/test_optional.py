"""The core (`pip install aigc-dist`: what a cluster image holds) runs without the demo extra's packages;
what needs them says which extra installs them."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_ONLY = ["matplotlib", "sklearn"]
# Every entry point and stage of the core: CLI, training (driver and worker loop, every recipe), backfill
# (text and image), Serve, the engines, evaluation of text.
CORE = ["aigc_dist.cli", "aigc_dist.train.trainer", "aigc_dist.train.loop", "aigc_dist.train.generators",
        "aigc_dist.batch.pipeline", "aigc_dist.batch.shards", "aigc_dist.batch.finish", "aigc_dist.serve.app",
        "aigc_dist.serve.openai_api", "aigc_dist.engine.text", "aigc_dist.engine.images", "aigc_dist.submit",
        "aigc_dist.evaluation.text"]


def _without_demo_packages(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter in which matplotlib and scikit-learn cannot be imported."""
    blocked = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in DEMO_ONLY)
    return subprocess.run([sys.executable, "-c", blocked + code], capture_output=True, text=True, cwd=REPO)


def test_the_core_imports_without_the_demo_extra():
    done = _without_demo_packages(f"import importlib\nfor m in {CORE!r}: importlib.import_module(m)\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_what_needs_the_demo_extra_names_it():
    for module in ("aigc_dist.data.digits", "aigc_dist.evaluation.images"):
        done = _without_demo_packages(
            f"try:\n    import {module}\nexcept ImportError as exc:\n    print(exc)\nelse:\n    print('imported')")
        assert "pip install 'aigc-dist[demo]'" in done.stdout and "scikit-learn" not in done.stderr, done.stdout
    report = _without_demo_packages(
        "from aigc_dist.demo.pipeline import run_demo\ntry:\n    run_demo('/nonexistent/never-written')\n"
        "except ImportError as exc:\n    print(exc)")
    assert "the demo's report needs matplotlib" in report.stdout and "[demo]" in report.stdout, report.stderr[-2000:]
    assert not Path("/nonexistent/never-written").exists()


def test_the_image_installs_the_core_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = json.dumps(project["dependencies"])
    assert "matplotlib" not in core and "scikit-learn" not in core
    assert {d.split(">")[0] for d in project["optional-dependencies"]["demo"]} == {"matplotlib", "scikit-learn"}
    runtime = (REPO / "requirements" / "runtime.lock").read_text()
    assert "\nmatplotlib==" not in runtime and "\nscikit-learn==" not in runtime
    assert "\nscikit-learn==" in (REPO / "requirements" / "dev.lock").read_text()  # make test runs the demo
