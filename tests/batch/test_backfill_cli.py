"""`aigc-dist backfill` / `status` as a user meets them when something is wrong (no Ray needed)."""

from __future__ import annotations

from aigc_dist.cli import EXIT_FAILED, main


def test_backfill_without_artifact_says_what_to_set(capsys):
    assert main(["backfill", "--data.requests=/nowhere.csv"]) == EXIT_FAILED
    assert "backfill.artifact is not set" in capsys.readouterr().err


def test_backfill_with_wrong_artifact_kind_or_missing_input(tmp_path, kit, lm_artifact, capsys):
    assert main(["backfill", f"--backfill.artifact={lm_artifact}", "--backfill.mode=image",
                 f"--data.requests={tmp_path}/r.csv"]) == EXIT_FAILED
    assert "needs a cgan or cvae artifact" in capsys.readouterr().err
    assert main(["backfill", f"--backfill.artifact={lm_artifact}", f"--data.requests={tmp_path}/r.csv"]) == EXIT_FAILED
    assert "data.requests: nothing at" in capsys.readouterr().err
    assert main(["backfill", f"--backfill.artifact={lm_artifact}", f"--data.users={tmp_path}"]) == EXIT_FAILED
    assert "set data.candidates, data.items" in capsys.readouterr().err


def test_status_of_a_run_that_never_started(tmp_path, capsys):
    assert main(["status", str(tmp_path / "out" / "nothing")]) == 0
    assert "not started" in capsys.readouterr().out
    assert main(["backfill", "status", str(tmp_path / "out" / "nothing"), "--json"]) == 0
    assert '"state": "not started"' in capsys.readouterr().out
