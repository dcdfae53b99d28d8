"""Typed config tree (schema.py), YAML presets beside it, and the loader with dotted overrides."""
from configs.load import ConfigError, load_config, to_yaml

__all__ = ["ConfigError", "load_config", "to_yaml"]
