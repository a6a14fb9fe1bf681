"""`aigc-dist` command line: parse, build the typed config, hand one section to one function.

Every subcommand accepts `--config FILE` (TOML or YAML) and any number of `--section.key=value`
overrides; precedence is overrides > file > defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from aigc_dist.config import AigcConfig, dump_config, load_config
from aigc_dist.errors import (  # noqa: F401  (exit codes re-exported for scripts and tests)
    EXIT_CONFIG_ERROR,
    EXIT_FAILED,
    EXIT_RUN_LOCKED,
    UserError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aigc-dist",
        description="Train content generators on Ray + DeepSpeed; generate personalized content "
        "online (Ray Serve) and offline (Ray Data backfills).",
        epilog="Config: --config FILE.toml|.yaml plus --section.key=value overrides "
        "(sections: model, train, deepspeed, data, backfill, serve, storage, metrics).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the whole pipeline on one machine (local Ray, local storage)",
                          description="World -> training -> backfill -> serve -> report on one local Ray. Defaults: "
                          "aigc_dist/demo/defaults.toml (tiny.toml under --tiny), under --config and overrides.")
    demo.add_argument("--output", default="./aigc-demo", help="where the demo writes (path or s3:// URI)")
    demo.add_argument("--tiny", action="store_true", help="the same stages at the smallest sizes (~2 minutes; "
                      "what the test suite runs)")
    _add_config_argument(demo)

    config = sub.add_parser("config", help="inspect the resolved config")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config tree")
    show.add_argument("--format", choices=["toml", "yaml", "json"], default="toml")
    _add_config_argument(show)
    config_sub.add_parser("reference", help="print every config field as Markdown")

    backfill = sub.add_parser("backfill", help="generate content for every candidate with Ray Data "
                              "(`backfill status RUN` shows a run)")
    _add_config_argument(backfill)
    backfill_sub = backfill.add_subparsers(dest="backfill_command", metavar="[status RUN]")
    _add_status_arguments(backfill_sub.add_parser("status", help="state, counts, progress and ETA of a run"))
    _add_status_arguments(sub.add_parser("status", help="state, counts, progress and ETA of a backfill run"))

    train = sub.add_parser("train", help="train a generator with Ray Train + DeepSpeed")
    _add_train_arguments(train)
    _add_config_argument(train)

    export = sub.add_parser("export", help="export a training checkpoint as an artifact (or, --to-hf, say "
                            "what becomes of an artifact of the earlier format)")
    _add_export_arguments(export, to_hf=True)
    _add_config_argument(export)

    _add_job_parsers(sub)

    serve = sub.add_parser("serve", help="serve personalized generation over HTTP with Ray Serve "
                           "(local Ray, or the cluster at $RAY_ADDRESS)")
    serve.add_argument("--artifact", help="text (LM) artifact to serve (sets serve.artifact)")
    serve.add_argument("--image-artifact", help="image artifact for /v1/images (sets serve.image_artifact)")
    _add_config_argument(serve)
    return parser


def _add_config_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, help="TOML or YAML config file")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume-from", help="checkpoint URI, or a run directory (its newest checkpoint), to start "
                        "from when this run has no checkpoint of its own yet")


def _add_export_arguments(parser: argparse.ArgumentParser, to_hf: bool = False) -> None:
    source = parser.add_mutually_exclusive_group(required=True) if to_hf else parser
    source.add_argument("--checkpoint", required=not to_hf,
                        help="checkpoint URI, or a run directory (its newest checkpoint is exported)")
    if to_hf:
        source.add_argument("--to-hf", metavar="URI",
                            help="an artifact of aigc-dist's earlier format: image artifacts need nothing; a text "
                            "model (GPT-style) cannot become a Llama-family checkpoint, and the command says how to "
                            "retrain it")
    parser.add_argument("--output", help="artifact location (default: <storage_path>/models/<name>/<version> "
                        "of the run that wrote the checkpoint)" + ("; --to-hf writes nothing" if to_hf else ""))


def _add_job_parsers(sub: argparse._SubParsersAction) -> None:
    """`submit train|backfill|export` (the local command's own options plus where and how to submit) and
    `jobs status|logs|stop ID`."""
    address_help = "the cluster's Ray dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)"
    submit = sub.add_parser("submit", help="submit train, backfill or export as a Ray job to a cluster")
    submit_sub = submit.add_subparsers(dest="job_command", required=True, metavar="COMMAND")
    for name, add_own_arguments in (("train", _add_train_arguments), ("backfill", None),
                                    ("export", _add_export_arguments)):
        job = submit_sub.add_parser(
            name, help=f"`aigc-dist {name}` as a Ray job (jobs/{name}.py)",
            epilog="--section.key=value overrides are validated here, then passed to the job with --config. Secret "
            "fields (storage.secret_access_key, ...) are refused: the job gets them from the nodes' environment "
            "($AWS_SECRET_ACCESS_KEY, ...), see docs/operations.md.")
        if add_own_arguments is not None:
            add_own_arguments(job)
        _add_config_argument(job)
        job.add_argument("--address", help=address_help)
        job.add_argument("--working-dir", default=".", help="directory uploaded for the job (default: .); it holds "
                         "jobs/ and the --config file")
        job.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                         help="a pip package the job needs on top of the cluster's image (repeatable)")
        job.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                         help="an environment variable of the job; NAME alone takes its value from here (repeatable). "
                         "Values are shown in the Ray dashboard: no secrets on a shared cluster")
        job.add_argument("--submission-id", help="the Ray job id (default: <command>-<run id>[-attemptN])")
        job.add_argument("--wait", action="store_true", help="stream the job's log, then exit with its exit status")

    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted Ray job")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    actions = {"status": "state, exit status and times of a job", "logs": "the job's log (driver output)",
               "stop": "stop a job (SIGTERM to its driver, then SIGKILL) and wait until it and its actors have stopped"}
    for name, help_text in actions.items():
        action = jobs_sub.add_parser(name, help=help_text)
        action.add_argument("submission_id", metavar="ID", help="the job's submission id")
        action.add_argument("--address", help=address_help)
        if name == "status":
            action.add_argument("--json", action="store_true", help="print the status as JSON")
        elif name == "logs":
            action.add_argument("--follow", action="store_true", help="stream the log until the job ends")
        else:
            action.add_argument("--wait-s", type=float, default=60.0,
                                help="how long to wait for the job and its actors to end")


def _add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="the run: <backfill.output>/<backfill.run_id> (path or s3:// URI)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    _add_config_argument(parser, default=argparse.SUPPRESS)  # keeps a --config given before `status`


def run_config(cfg: AigcConfig, args: argparse.Namespace) -> int:
    if args.config_command == "reference":
        from aigc_dist.config.reference import reference_markdown

        sys.stdout.write(reference_markdown())
    else:
        sys.stdout.write(dump_config(cfg, args.format))
    return 0


def run_demo(cfg: AigcConfig, args: argparse.Namespace) -> int:
    from aigc_dist.demo.pipeline import run_demo as demo

    # The demo's own defaults (aigc_dist/demo/defaults.toml) sit under the same --config and overrides.
    demo(args.output, args.config, args.overrides, tiny=args.tiny)
    return 0


def run_status(cfg: AigcConfig, args: argparse.Namespace) -> int:
    from aigc_dist.batch.progress import format_status
    from aigc_dist.batch.progress import run_status as status_of
    from aigc_dist.storage import Storage

    status = status_of(args.run, Storage(cfg.storage), cfg.backfill.lock_stale_after_s)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def run_backfill(cfg: AigcConfig, args: argparse.Namespace) -> int:
    if args.backfill_command == "status":
        return run_status(cfg, args)
    from aigc_dist.batch.pipeline import run_backfill as backfill

    manifest = backfill(cfg.backfill, cfg.data, cfg.storage, cfg.metrics)
    counts = manifest["counts"]
    print(f"backfill {manifest['run_id']}: complete, {counts['total']:,} rows: {counts['ok']:,} ok, "
          f"{counts['quarantined']:,} quarantined, {counts['filtered']:,} filtered -> {manifest['root']}")
    return 0


def run_serve(cfg: AigcConfig, args: argparse.Namespace) -> int:
    from aigc_dist.serve.runner import run_server

    cfg.serve.artifact = args.artifact or cfg.serve.artifact
    cfg.serve.image_artifact = args.image_artifact or cfg.serve.image_artifact
    run_server(cfg)
    return 0


def run_train(cfg: AigcConfig, args: argparse.Namespace) -> int:
    from aigc_dist.train.trainer import run_training

    if args.resume_from:
        cfg.train.resume_from = args.resume_from
    result = run_training(cfg.train, cfg.deepspeed, cfg.model, cfg.data, cfg.storage)
    loss = result.metrics.get("loss", float("nan"))
    print(f"train {result.run_name}: {result.step} steps, loss {loss:.4f}; checkpoint {result.checkpoint_uri}; "
          f"artifact {result.artifact_uri}")
    return 0


def run_export(cfg: AigcConfig, args: argparse.Namespace) -> int:
    from aigc_dist.storage import Storage
    from aigc_dist.train.export import export_checkpoint

    if args.to_hf:
        from aigc_dist.train.legacy import convert_to_hf

        print(f"export --to-hf: {convert_to_hf(args.to_hf, Storage(cfg.storage))}")
        return 0
    uri, meta = export_checkpoint(args.checkpoint, Storage(cfg.storage), args.output)
    print(f"export: step {meta['step']} of run {meta['run']} -> {uri} (digest {meta['digest'][:12]})")
    return 0


def run_submit(cfg: AigcConfig, args: argparse.Namespace) -> int:
    from aigc_dist.submit import FORWARDED_OPTIONS, export_run_id, refuse_config_file_secrets, submit_job

    refuse_config_file_secrets(cfg, args.config)
    command = args.job_command
    run_id = {"train": cfg.train.run_name, "backfill": cfg.backfill.run_id}.get(command) or export_run_id(
        args.checkpoint)
    return submit_job(command, run_id, address=args.address, config=args.config, working_dir=args.working_dir,
                      options={name: getattr(args, name) for name in FORWARDED_OPTIONS[command]},
                      overrides=args.overrides, pip=args.pip, env=args.env, submission_id=args.submission_id,
                      follow_logs=args.wait)


def run_jobs(cfg: AigcConfig, args: argparse.Namespace) -> int:
    from aigc_dist.submit import jobs_command

    return jobs_command(args.jobs_command, args.submission_id, address=args.address,
                        as_json=getattr(args, "json", False), follow_logs=getattr(args, "follow", False),
                        wait_s=getattr(args, "wait_s", 0.0))


COMMANDS: dict[str, Callable[[AigcConfig, argparse.Namespace], int]] = {
    "backfill": run_backfill,
    "config": run_config,
    "demo": run_demo,
    "export": run_export,
    "jobs": run_jobs,
    "serve": run_serve,
    "status": run_status,
    "submit": run_submit,
    "train": run_train,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.overrides = extra  # for commands that hand them on (submit: to the job; demo)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = None
    try:
        if args.command == "submit":  # before the overrides are parsed, so no error can echo a secret's value
            from aigc_dist.submit import refuse_secret_overrides

            refuse_secret_overrides(extra)
        cfg = load_config(getattr(args, "config", None), extra)
        return COMMANDS[args.command](cfg, args)
    except UserError as exc:  # the message says what to change: no traceback
        print(f"aigc-dist {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        traceback.print_exc()
        print(f"aigc-dist {args.command}: failed: {exc}{_resume_hint(args.command, cfg)}", file=sys.stderr)
        return EXIT_FAILED


def _resume_hint(command: str, cfg: AigcConfig | None) -> str:
    """What to do after a crash of a resumable command: run it again."""
    if cfg is None:
        return ""
    if command == "backfill":
        return f"\n(run the same command again to resume run {cfg.backfill.run_id!r})"
    if command == "train":
        return f"\n(run the same command again to resume run {cfg.train.run_name!r} from its latest checkpoint)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
