"""Stage configs: dataclasses with a docstring per field, validated, JSON/YAML round trips."""

from clt.config.base import ConfigBase, ConfigError
from clt.config.extraction import ExtractionConfig

__all__ = ["ConfigBase", "ConfigError", "ExtractionConfig"]
