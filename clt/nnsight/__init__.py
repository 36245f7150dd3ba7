"""nnsight-facing code: model loading and activation extraction."""

from clt.nnsight.extractors import ActivationExtractor, BackgroundExtraction, ExtractionStopped
from clt.nnsight.loading import DEFAULT_MODEL, ModelLayout, ModelNotFoundError, find_layout, load_model

__all__ = [
    "ActivationExtractor",
    "BackgroundExtraction",
    "DEFAULT_MODEL",
    "ExtractionStopped",
    "ModelLayout",
    "ModelNotFoundError",
    "find_layout",
    "load_model",
]
