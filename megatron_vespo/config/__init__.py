"""Configuration: component-owned pydantic sections composed into ``JobConfig``."""

from megatron_vespo.config.base import (
    ConfigError,
    Section,
    apply_overrides,
    dump_config,
    load_config,
    load_yaml,
    validate,
)

__all__ = ["ConfigError", "Section", "apply_overrides", "dump_config", "load_config", "load_yaml", "validate"]
