"""`aigc-dist` command line: parse, build the typed config, hand one section to one function.

Every subcommand accepts `--config FILE` (TOML or YAML) and any number of `--section.key=value`
overrides; precedence is overrides > file > defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from aigc_dist.config import AigcConfig, ConfigError, dump_config, load_config

# Subcommands the architecture names that a later issue implements: name -> (help, issue).
PLANNED: dict[str, tuple[str, int]] = {
    "train": ("train a generator with Ray Train + DeepSpeed", 4),
    "export": ("export a training checkpoint as an artifact", 4),
    "backfill": ("generate content for every candidate with Ray Data", 5),
    "serve": ("serve personalized generation over HTTP with Ray Serve", 6),
    "submit": ("submit train/backfill/export as a Ray job to a cluster", 8),
    "jobs": ("status, logs or stop of a submitted Ray job", 8),
    "status": ("state, counts and progress of a backfill run", 5),
}

EXIT_CONFIG_ERROR = 2
EXIT_NOT_IMPLEMENTED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aigc-dist",
        description="Train content generators on Ray + DeepSpeed; generate personalized content "
        "online (Ray Serve) and offline (Ray Data backfills).",
        epilog="Config: --config FILE.toml|.yaml plus --section.key=value overrides "
        "(sections: model, train, deepspeed, data, backfill, serve, storage, metrics).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the whole pipeline on one machine (local Ray, local storage)")
    demo.add_argument("--output", default="./aigc-demo", help="where the demo writes (path or s3:// URI)")
    _add_config_argument(demo)

    config = sub.add_parser("config", help="inspect the resolved config")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config tree")
    show.add_argument("--format", choices=["toml", "yaml", "json"], default="toml")
    _add_config_argument(show)
    config_sub.add_parser("reference", help="print every config field as Markdown")

    for name, (help_text, issue) in PLANNED.items():
        planned = sub.add_parser(name, help=f"{help_text} (not implemented yet: issue #{issue})")
        planned.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML or YAML config file")


def run_config(cfg: AigcConfig, args: argparse.Namespace) -> int:
    if args.config_command == "reference":
        from aigc_dist.config.reference import reference_markdown

        sys.stdout.write(reference_markdown())
    else:
        sys.stdout.write(dump_config(cfg, args.format))
    return 0


def run_demo(cfg: AigcConfig, args: argparse.Namespace) -> int:
    from aigc_dist.demo import run_demo as demo

    demo(args.output, cfg.storage)
    return 0


COMMANDS: dict[str, Callable[[AigcConfig, argparse.Namespace], int]] = {
    "config": run_config,
    "demo": run_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in PLANNED:
        help_text, issue = PLANNED[args.command]
        print(
            f"aigc-dist {args.command}: not implemented yet ({help_text}; tracked in issue #{issue})",
            file=sys.stderr,
        )
        return EXIT_NOT_IMPLEMENTED
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(getattr(args, "config", None), extra)
    except ConfigError as exc:
        print(f"aigc-dist {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return COMMANDS[args.command](cfg, args)


if __name__ == "__main__":
    sys.exit(main())
