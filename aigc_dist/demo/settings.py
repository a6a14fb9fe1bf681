"""The demo's config: the embedded defaults (defaults.toml, then tiny.toml under --tiny), the user's
--config file and --section.key=value overrides on top, and locations that follow --output."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from aigc_dist.config import AigcConfig, ConfigError, parse_overrides, read_config_file
from aigc_dist.config.loader import merge, validate_config
from aigc_dist.demo.world import world_quality
from aigc_dist.storage import join_uri, parse_uri

HERE = Path(__file__).resolve().parent
DEFAULTS_FILE, TINY_FILE = HERE / "defaults.toml", HERE / "tiny.toml"


@dataclass(frozen=True)
class DemoSizes:
    """The `[demo]` table: the synthetic world and how much the serve and report stages show."""

    num_users: int
    num_items: int
    candidates_per_user: int
    world_seed: int
    held_out_rank: int  # candidates of this rank stay out of training: the held-out pairs
    serve_requests: int
    table_items: int
    table_users: int

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < (0 if f.name == "world_seed" else 1):
                raise ConfigError(f"demo.{f.name} must be >= 1 (got {getattr(self, f.name)})")
        if not 1 <= self.held_out_rank <= self.candidates_per_user:
            raise ConfigError(f"demo.held_out_rank must be in 1..candidates_per_user={self.candidates_per_user} "
                              f"(got {self.held_out_rank})")


@dataclass(frozen=True)
class DemoLayout:
    """Where each stage writes under the demo's output (a path or an s3:// URI)."""

    root: str

    def at(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    @property
    def world(self) -> str:
        """write_world's tables: users, items, candidates, copy (the reference corpus)."""
        return self.at("world")

    @property
    def inputs(self) -> str:
        """What the stages read that the world does not hold as is: training pairs, candidates + bad rows."""
        return self.at("inputs")

    @property
    def runs(self) -> str:
        """train.storage_path: checkpoints and the exported artifact."""
        return self.at("runs")

    @property
    def backfill(self) -> str:
        return self.at("backfill")

    @property
    def run_root(self) -> str:
        """The backfill run's directory: data/, errors/, _manifest.json."""
        return self.at("backfill", "demo")

    @property
    def report(self) -> str:
        return self.at("report")

    @property
    def config_file(self) -> str:
        """The resolved config, for rerunning a stage by hand."""
        return self.at("config.toml")


def demo_config(output: str, config_file: str | None, overrides: Sequence[str], tiny: bool
                ) -> tuple[AigcConfig, DemoSizes, DemoLayout]:
    """Resolve the demo's config tree, sizes and layout; a bad value is a `ConfigError` naming it."""
    with DEFAULTS_FILE.open("rb") as fh:
        data: dict[str, Any] = tomllib.load(fh)
    if tiny:
        with TINY_FILE.open("rb") as fh:
            data = merge(data, tomllib.load(fh))
    sizes = DemoSizes(**data.pop("demo"))
    # The demo's data is the synthetic world: its quality rules, as any user gives theirs (a config file may
    # still override them).
    data = merge(data, {"backfill": {"quality": world_quality().model_dump(mode="json")}})
    if config_file is not None:
        data = merge(data, read_config_file(config_file))
    data = merge(data, parse_overrides(overrides))
    layout = DemoLayout(parse_uri(output).uri.rstrip("/"))
    world = layout.world
    data = merge(data, {
        "data": {"users": join_uri(world, "users.parquet"), "items": join_uri(world, "items.parquet"),
                 "candidates": join_uri(layout.inputs, "candidates.parquet"), "requests": None},
        "train": {"storage_path": layout.runs, "dataset": join_uri(layout.inputs, "train.parquet")},
        "backfill": {"output": layout.backfill, "run_id": "demo"},
    })
    cfg = validate_config(data)
    if cfg.model.kind != "lm" or cfg.backfill.mode != "text":
        raise ConfigError("the demo trains and serves the text generator: model.kind must be 'lm' and "
                          f"backfill.mode 'text' (got {cfg.model.kind!r}, {cfg.backfill.mode!r})")
    # The artifact the training stage exports, which the backfill and serve stages then use.
    artifact = join_uri(layout.runs, "models", cfg.model.name, cfg.model.version)
    cfg.backfill.artifact = cfg.serve.artifact = artifact
    cfg.serve.image_artifact = None
    return cfg, sizes, layout
