"""Dictionaries: the cross-layer (or per-layer) transcoder, SAE and MOLT modes, activations."""

from clt.models.activations import (
    BatchTopK,
    JumpReLUFunction,
    StepFunction,
    batchtopk,
    jumprelu,
    rectangle,
    relu,
    step,
    topk,
)
from clt.models.export import export_circuit_tracer, load_circuit_tracer
from clt.models.molt import MixtureOfLinearTransforms
from clt.models.transcoder import (
    CheckpointError,
    CLTOutput,
    CrossLayerTranscoder,
    UnsupportedDictionaryError,
)

__all__ = [
    "BatchTopK",
    "CLTOutput",
    "CheckpointError",
    "CrossLayerTranscoder",
    "JumpReLUFunction",
    "MixtureOfLinearTransforms",
    "StepFunction",
    "UnsupportedDictionaryError",
    "batchtopk",
    "export_circuit_tracer",
    "jumprelu",
    "load_circuit_tracer",
    "rectangle",
    "relu",
    "step",
    "topk",
]
