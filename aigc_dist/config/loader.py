"""Loading the config tree: defaults < TOML/YAML file < `--section.key=value` overrides.

Every failure is a `ConfigError` whose message names the field, the value given and what is
allowed, e.g. `config error: train.lr: Input should be a valid number (got 'abc')`.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from aigc_dist.config.sections import AigcConfig
from aigc_dist.errors import EXIT_CONFIG_ERROR, UserError

# Fields whose values must never be echoed back in an error message or a dump.
SECRET_FIELDS = frozenset({"access_key_id", "secret_access_key", "session_token"})
# An override value spelled like this unsets an optional field (TOML has no null).
NULL_SPELLINGS = frozenset({"null", "none", "None"})


class ConfigError(UserError, ValueError):
    """A config file, override or value that cannot be used; the message says what to fix."""

    exit_code = EXIT_CONFIG_ERROR

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("config error: " + "; ".join(self.problems))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (.toml) or YAML (.yaml/.yml) file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {str(path)!r}: unknown extension {path.suffix!r}; use .toml or .yaml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table of sections (got {type(data).__name__})")
    return data


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Turn `["--train.lr=1e-3", "--data.user_fields=[\"segment\"]"]` into a nested dict.

    A value is read as JSON (numbers, booleans, lists) unless the field takes text, so
    `--deepspeed.zero_stage=3` is the integer 3 while `--model.version=2` stays the string "2";
    what is not valid JSON stays a string and pydantic reports it with the field's name.
    """
    tree: dict[str, Any] = {}
    for arg in args:
        body = arg[2:] if arg.startswith("--") else None
        if body is None or "=" not in body:
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        dotted, raw = body.split("=", 1)
        keys = dotted.split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {arg!r} must name a section and a key, like --train.lr=1e-3")
        value: Any = raw
        if _is_secret(_annotation_at(keys)):
            pass  # a secret is text whatever it starts with, and is never echoed in an error
        elif raw in NULL_SPELLINGS:
            value = None
        elif raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{dotted}: {raw!r} is not valid JSON ({exc.msg})") from exc
        elif not _takes_text(_annotation_at(keys)):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with another override of {key!r}")
        node[keys[-1]] = value
    return tree


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge where `top` wins; tables merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> AigcConfig:
    """Resolve the config tree with precedence CLI overrides > file > defaults."""
    data = read_config_file(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides))
    return validate_config(data)


def validate_config(data: Mapping[str, Any]) -> AigcConfig:
    """Validate a plain dict against the tree, turning pydantic's errors into `ConfigError`."""
    try:
        return AigcConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()]) from None


def _describe(err: Mapping[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    where = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(loc[:-1])) or "(none)"
        section = ".".join(loc[:-1]) or "top level"
        return f"unknown key {where!r}; allowed keys in {section}: {allowed}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # a cross-field check: the message already names the values
        return f"{where}: {msg}"
    shown = "***" if loc and loc[-1] in SECRET_FIELDS else repr(err.get("input"))
    return f"{where}: {msg} (got {shown})"


def _annotation_at(keys: Sequence[str]) -> Any:
    """The type annotation of the field at `keys`, or None when there is no such field."""
    model: Any = AigcConfig
    annotation = None
    for key in keys:
        fields = getattr(model, "model_fields", None)
        if not fields or key not in fields:
            return None
        annotation = model = fields[key].annotation
    return annotation


def _is_secret(annotation: Any) -> bool:
    """True for a SecretStr field (optional or not)."""
    return annotation is SecretStr or SecretStr in get_args(annotation)


def _takes_text(annotation: Any) -> bool:
    """True when a field accepts free text (str, SecretStr, or a Literal of strings)."""
    if annotation in (str, SecretStr):
        return True
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    return any(_takes_text(a) for a in args if a is not type(None))


def _fields_at(loc: Sequence[str]) -> list[str]:
    model: type[BaseModel] = AigcConfig
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-safe dict of a config (secrets masked as '**********')."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: BaseModel, fmt: str = "toml") -> str:
    """Render a resolved config as TOML, YAML or JSON; unset (None) fields are left out of TOML."""
    data = config_to_dict(cfg)
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if fmt == "toml":
        return tomli_w.dumps(_drop_none(data))
    raise ConfigError(f"format {fmt!r} is not one of toml, yaml, json")


def config_digest(cfg: BaseModel) -> str:
    """sha256 of the canonical JSON of a config, for manifests: equal configs, equal digests."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return data
