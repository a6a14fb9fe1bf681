"""Typed config tree (`sections`) and its loading (`loader`): import from here."""

from aigc_dist.config.loader import (
    ConfigError,
    config_digest,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
    read_config_file,
    validate_config,
)
from aigc_dist.config.sections import (
    AigcConfig,
    BackfillConfig,
    DataConfig,
    DeepSpeedConfig,
    EngineConfig,
    MetricsConfig,
    ModelConfig,
    QualityConfig,
    ServeConfig,
    StorageConfig,
    TrainConfig,
)

__all__ = [
    "AigcConfig",
    "BackfillConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EngineConfig",
    "MetricsConfig",
    "ModelConfig",
    "QualityConfig",
    "ServeConfig",
    "StorageConfig",
    "TrainConfig",
    "config_digest",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
    "read_config_file",
    "validate_config",
]
