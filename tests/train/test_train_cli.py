"""`aigc-dist train` / `aigc-dist export` and their Ray job entrypoints, as a user meets their errors:
a config that cannot work stops before Ray or any worker starts, with a message naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aigc_dist.cli import EXIT_CONFIG_ERROR, main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.preset=huge"], "model.preset: unknown lm preset 'huge'; choose one of tiny, mini, small, base"),
        (["--model.kind=cgan", "--model.preset=gigantic"], "model.preset: unknown cgan preset 'gigantic'"),
        ([], "train.dataset: required"),
        (["--train.dataset=x.parquet", "--resume-from=/nonexistent/run"], "train.resume_from: no complete checkpoint"),
    ],
)
def test_train_config_errors_exit_2_naming_the_field(args, message, capsys):
    assert main(["train", *args]) == EXIT_CONFIG_ERROR
    assert message in capsys.readouterr().err


def test_export_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "no-run")]) == EXIT_CONFIG_ERROR
    assert "--checkpoint: no complete checkpoint at" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("train.py", ["--train.num_workers=0"], "train.num_workers: Input should be greater than or equal to 1"),
        ("export.py", ["--checkpoint", "/nonexistent/run"], "--checkpoint: no complete checkpoint at '/nonex"),
    ],
)
def test_job_entrypoints_exit_non_zero_with_a_clear_message(script, args, message):
    done = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == EXIT_CONFIG_ERROR
    assert message in done.stderr
