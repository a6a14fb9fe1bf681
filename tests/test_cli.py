"""The `aigc-dist` command line as a user meets it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from aigc_dist.cli import EXIT_CONFIG_ERROR, main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "jobs" / "configs" / "example.toml")


def test_console_script_lists_every_subcommand():
    script = Path(sys.executable).with_name("aigc-dist")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for name in ["demo", "train", "backfill", "serve", "submit", "status", "export", "config"]:
        assert f"    {name}" in out


def test_config_show_prints_resolved_tree(capsys):
    assert main(["config", "show", "--config", EXAMPLE, "--train.lr=0.0007"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["train"]["lr"] == 0.0007  # override
    assert shown["train"]["run_name"] == "copy-lm-tiny"  # file
    assert shown["serve"]["max_ongoing_requests"] == 32  # default


def test_config_show_json(capsys):
    assert main(["config", "show", "--format", "json", "--backfill.batch_size=7"]) == 0
    assert json.loads(capsys.readouterr().out)["backfill"]["batch_size"] == 7


def test_bad_value_exits_with_message_naming_field(capsys):
    assert main(["config", "show", "--config", EXAMPLE, "--train.lr=abc"]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "train.lr" in err and "'abc'" in err


def test_unknown_key_exits_with_message_naming_key(capsys):
    assert main(["config", "show", "--serve.prot=80"]) == EXIT_CONFIG_ERROR
    assert "serve.prot" in capsys.readouterr().err

