"""Configuration: the TOML file, validated once and all at once (``load_config``), and the
pydantic models it becomes. Each destination type's settings model lives beside its code in
``sync.destinations`` (``SegmentSettings``, ...); ``Config.destinations`` holds them."""

from sync.config.loader import load_config, parse_config
from sync.config.models import (
    DEFAULT_CONFIG_PATH,
    AudienceConfig,
    AudienceDestinationSettings,
    ComputationConfig,
    Config,
    DaemonConfig,
    Defaults,
    SourceConfig,
    StateConfig,
    TraitGroupConfig,
)
from sync.config.rules import compile_rules, rule_problems

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AudienceConfig",
    "AudienceDestinationSettings",
    "ComputationConfig",
    "Config",
    "DaemonConfig",
    "Defaults",
    "SourceConfig",
    "StateConfig",
    "TraitGroupConfig",
    "compile_rules",
    "load_config",
    "parse_config",
    "rule_problems",
]
