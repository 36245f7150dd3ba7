"""The dtype of the model's forward: bfloat16 where the hardware runs it natively, float32 elsewhere.

On a CPU with AVX512-BF16 or AMX, a bf16 forward of SmolLM2 runs several times faster than fp32
(DESIGN.md); elsewhere bf16 is emulated and slower. `forward_error` measures what bf16 costs in
accuracy: the relative error of every recorded layer's MLP input and output against fp32.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
from functools import lru_cache
from typing import Any

import torch

from clt.config.constants import MODEL_DTYPES

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ISA_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX), and oneDNN may use it."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISA_BELOW_BF16:
        return False
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in _NATIVE_BF16_FLAGS)


def resolve_model_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for a `model_dtype` setting: 'auto' picks bf16 where it runs natively."""
    if name not in MODEL_DTYPES:
        raise ValueError(f"model_dtype {name!r} is not one of {MODEL_DTYPES}")
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


@dataclasses.dataclass
class ForwardError:
    """Relative error ‖a − a_fp32‖ / ‖a_fp32‖ of a low-precision forward's MLP activations, per layer."""

    dtype: str
    inputs: list[float]
    """Per recorded layer, MLP inputs."""
    outputs: list[float]
    """Per recorded layer, MLP outputs."""

    @property
    def max(self) -> float:
        """The largest relative error over layers, inputs and outputs."""
        return max(self.inputs + self.outputs)


@torch.no_grad()
def forward_error(extractor: Any, windows: list[Any], dtype: torch.dtype = torch.bfloat16) -> ForwardError:
    """Activations of `windows` from the extractor's model cast to `dtype`, against float32."""
    from clt.nnsight.extractors import ActivationExtractor

    model = extractor.model
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("forward_error compares against the extractor's model: load it in float32")
    reference = extractor.activations(windows)
    low = copy.deepcopy(model).to(dtype)
    other = ActivationExtractor(
        extractor.model_name,
        model=low,
        tokenizer=extractor.tokenizer,
        layers=extractor.layers,
        context_length=extractor.context_length,
        batch_size=extractor.batch_size,
        prepend_bos=extractor.prepend_bos,
        exclude_bos=extractor.exclude_bos,
    )
    measured = other.activations(windows)
    errors = {}
    for key in ("inputs", "outputs"):
        diff = (measured[key].float() - reference[key].float()).square().sum((0, 2)).sqrt()
        errors[key] = (diff / reference[key].float().square().sum((0, 2)).sqrt().clamp_min(1e-12)).tolist()
    return ForwardError(str(dtype).removeprefix("torch."), errors["inputs"], errors["outputs"])


__all__ = ["MODEL_DTYPES", "ForwardError", "cpu_has_native_bf16", "forward_error", "resolve_model_dtype"]
