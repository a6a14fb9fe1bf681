"""The config tree: precedence, errors that name the field, dumps, and every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc_dist.config import (
    AigcConfig,
    ConfigError,
    config_digest,
    dump_config,
    load_config,
    read_config_file,
    validate_config,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.toml")) + sorted(
    (REPO / "jobs" / "configs").glob("*.yaml")
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_a_valid_tree():
    cfg = load_config()
    assert cfg == AigcConfig()
    assert cfg.serve.host == "127.0.0.1" and cfg.metrics.host == "127.0.0.1"  # loopback unless asked


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = write(tmp_path, "c.toml", "[train]\nlr = 0.01\nmax_steps = 500\n")
    cfg = load_config(path, ["--train.lr=0.002"])
    assert cfg.train.lr == 0.002  # CLI beats file
    assert cfg.train.max_steps == 500  # file beats default
    assert cfg.train.num_workers == 2  # default kept


def test_yaml_and_toml_give_the_same_tree(tmp_path):
    toml = write(tmp_path, "c.toml", '[model]\nkind = "cgan"\nimage_size = 32\n')
    yaml = write(tmp_path, "c.yaml", "model:\n  kind: cgan\n  image_size: 32\n")
    assert load_config(toml) == load_config(yaml)


def test_bad_value_names_field_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--train.lr=abc"])
    assert "train.lr" in str(err.value) and "'abc'" in str(err.value)


def test_unknown_key_names_key_and_lists_allowed(tmp_path):
    path = write(tmp_path, "c.toml", "[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.learning_rate" in message and "lr" in message and "max_steps" in message


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(None, ["--trian.lr=0.1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--deepspeed.zero_stage=5", "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        ("--backfill.mode=video", "backfill.mode: Input should be 'text' or 'image'"),
        ("--backfill.batch_size=0", "backfill.batch_size: Input should be greater than or equal to 1"),
        ("--model.image_size=12", "model.image_size"),
        ("--model.name=Has Spaces", "model.name"),
        ("--serve.port=70000", "serve.port"),
    ],
)
def test_bounds_and_choices(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(None, [override])


def test_invalid_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="offload_params=true needs zero_stage=3"):
        load_config(None, ["--deepspeed.offload_params=true"])
    with pytest.raises(ConfigError, match="offload_optimizer=true needs zero_stage >= 1"):
        load_config(None, ["--deepspeed.zero_stage=0", "--deepspeed.offload_optimizer=true"])
    with pytest.raises(ConfigError, match=r"min_actors \(3\) must be <= max_actors \(2\)"):
        load_config(None, ["--backfill.min_actors=3"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(None, ["--train.max_steps=10", "--train.warmup_steps=10"])


def test_override_values_take_the_fields_type():
    cfg = load_config(
        None,
        [
            "--deepspeed.zero_stage=3",
            "--deepspeed.offload_params=true",
            "--model.version=2",  # a text field keeps "2" as text
            "--train.use_gpu=false",
            "--data.user_fields=[\"segment\",\"locale\"]",
            "--backfill.top_p=0.9",
            "--backfill.top_p=null",  # the last override wins; null unsets an optional field
        ],
    )
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.offload_params is True
    assert cfg.model.version == "2"
    assert cfg.train.use_gpu is False
    assert cfg.data.user_fields == ["segment", "locale"]
    assert cfg.backfill.top_p is None


@pytest.mark.parametrize("bad", ["train.lr=1", "--train", "--lr=1", "--train.=1"])
def test_malformed_override_is_explained(bad):
    with pytest.raises(ConfigError, match="--section.key=value|must name a section"):
        load_config(None, [bad])


def test_malformed_files_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "bad.toml", "[train\nlr=1"))
    with pytest.raises(ConfigError, match="unknown extension"):
        load_config(write(tmp_path, "c.ini", "[train]"))
    with pytest.raises(ConfigError, match="must hold a table"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_secrets_are_never_echoed_or_dumped():
    secret = "wJalrXUtnFEMI-very-secret"
    cfg = load_config(None, [f"--storage.secret_access_key={secret}", "--storage.access_key_id=AKIAEXAMPLE"])
    assert cfg.storage.secret_access_key.get_secret_value() == secret
    for fmt in ("toml", "yaml", "json"):
        assert secret not in dump_config(cfg, fmt)
    assert secret not in repr(cfg) and secret not in str(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config({"storage": {"secret_access_key": [secret]}})
    assert secret not in str(err.value) and "storage.secret_access_key" in str(err.value)
    # A secret that happens to start like JSON is taken as the text it is, not parsed and echoed.
    bracketed = "[" + secret
    cfg = load_config(None, [f"--storage.secret_access_key={bracketed}"])
    assert cfg.storage.secret_access_key.get_secret_value() == bracketed


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_dump_round_trips(tmp_path, fmt):
    cfg = load_config(None, ["--train.lr=0.0005", "--backfill.banned_terms=[\"free\",\"免费\"]"])
    path = write(tmp_path, f"dumped.{'yaml' if fmt == 'json' else fmt}", dump_config(cfg, fmt))
    assert load_config(path) == cfg  # JSON is valid YAML, so it loads through the YAML reader


def test_digest_tracks_content():
    assert config_digest(load_config()) == config_digest(load_config())
    assert config_digest(load_config()) != config_digest(load_config(None, ["--train.seed=1"]))


def test_sections_are_separable():
    """A component gets only its section; each section validates and dumps on its own."""
    cfg = load_config(None, ["--serve.max_batch_size=8"])
    serve = cfg.serve
    assert type(serve).model_validate(serve.model_dump()) == serve
    with pytest.raises(ValueError, match="max_batch_size"):
        serve.max_batch_size = 0  # validated on assignment too


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    raw = read_config_file(path)
    cfg = load_config(path)
    for section, values in raw.items():  # what the file says is what the tree holds
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{path.name}: {section}.{key}"


def test_shipped_configs_exist():
    assert len(SHIPPED_CONFIGS) >= 2


def test_docs_reference_is_current():
    """docs/configuration-reference.md is generated; regenerate with `aigc-dist config reference`."""
    from aigc_dist.config.reference import reference_markdown

    shipped = (REPO / "docs" / "configuration-reference.md").read_text()
    assert shipped == reference_markdown(), "run: aigc-dist config reference > docs/configuration-reference.md"
