"""Stage configs: dataclasses with a docstring per field, validated, JSON/YAML round trips."""

from clt.config.attribution import AttributionConfig
from clt.config.base import ConfigBase, ConfigError
from clt.config.extraction import ExtractionConfig
from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig

__all__ = ["AttributionConfig", "CLTConfig", "ConfigBase", "ConfigError", "ExtractionConfig", "TrainingConfig"]
