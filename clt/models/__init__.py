"""Transcoders: the cross-layer (or per-layer) transcoder and its activation functions."""

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
from clt.models.transcoder import CheckpointError, CLTOutput, CrossLayerTranscoder

__all__ = [
    "BatchTopK",
    "CLTOutput",
    "CheckpointError",
    "CrossLayerTranscoder",
    "JumpReLUFunction",
    "StepFunction",
    "batchtopk",
    "export_circuit_tracer",
    "jumprelu",
    "load_circuit_tracer",
    "rectangle",
    "relu",
    "step",
    "topk",
]
