"""Dictionaries: the cross-layer (or per-layer) transcoder, SAE and MOLT modes, activations, and the
readers and writers of other libraries' formats (`load_dictionary`)."""

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
from clt.models.dictionaries import FORMATS, UnknownFormatError, detect_format, load_dictionary
from clt.models.export import export_circuit_tracer, load_circuit_tracer
from clt.models.molt import MixtureOfLinearTransforms
from clt.models.saelens_files import export_saelens, load_saelens
from clt.models.sparsify_files import export_sparsify, load_sparsify
from clt.models.transcoder import (
    CheckpointError,
    CLTOutput,
    CrossLayerTranscoder,
    UnsupportedDictionaryError,
)

__all__ = [
    "FORMATS",
    "BatchTopK",
    "CLTOutput",
    "CheckpointError",
    "CrossLayerTranscoder",
    "JumpReLUFunction",
    "MixtureOfLinearTransforms",
    "StepFunction",
    "UnknownFormatError",
    "UnsupportedDictionaryError",
    "batchtopk",
    "detect_format",
    "export_circuit_tracer",
    "export_saelens",
    "export_sparsify",
    "jumprelu",
    "load_circuit_tracer",
    "load_dictionary",
    "load_saelens",
    "load_sparsify",
    "rectangle",
    "relu",
    "step",
    "topk",
]
