"""Stage configs: dataclasses with a docstring per field, validated, JSON/YAML round trips; shared constants."""

from clt.config.attribution import AttributionConfig
from clt.config.base import ConfigBase, ConfigError
from clt.config.constants import (
    COMPRESSIONS,
    DEFAULT_MODEL,
    FLOAT_DTYPE_NAMES,
    OUTPUT_SITES,
    STORE_DTYPES,
    check_choice,
    check_output_site,
    layer_span,
)
from clt.config.extraction import ExtractionConfig
from clt.config.intervention import InterventionConfig
from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_MODEL",
    "FLOAT_DTYPE_NAMES",
    "OUTPUT_SITES",
    "STORE_DTYPES",
    "AttributionConfig",
    "CLTConfig",
    "ConfigBase",
    "ConfigError",
    "ExtractionConfig",
    "InterventionConfig",
    "TrainingConfig",
    "check_choice",
    "check_output_site",
    "layer_span",
]
