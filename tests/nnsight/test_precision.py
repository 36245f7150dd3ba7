"""The forward's dtype: the automatic choice, the cached model kept exact, and bf16's measured error."""

from __future__ import annotations

import pytest
import torch

from clt.nnsight import precision
from clt.nnsight.loading import load_model


def test_loading_in_another_dtype_leaves_the_cached_float32_model_exact():
    model, _ = load_model("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    low, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    assert next(low.parameters()).dtype == torch.bfloat16
    again, _ = load_model("tiny-llama")
    assert all(torch.equal(v, before[k]) for k, v in again.state_dict().items())


def test_model_dtype_names(monkeypatch):
    assert precision.resolve_model_dtype("float32") == torch.float32
    assert precision.resolve_model_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="model_dtype 'bf16' is not one of"):
        precision.resolve_model_dtype("bf16")
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN told not to use bf16 instructions
    try:
        assert precision.resolve_model_dtype("auto") == torch.float32
    finally:
        precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    precision.cpu_has_native_bf16.cache_clear()
    expected = torch.bfloat16 if precision.cpu_has_native_bf16() else torch.float32
    assert precision.resolve_model_dtype("auto") == expected


def test_bf16_forward_error_is_a_few_bf16_steps():
    """bf16 rounds every product and sum to 8 significant bits (relative step 2^-8): activations move
    by a few steps over three layers — far above float32 rounding, far below an error."""
    from clt.nnsight.extractors import ActivationExtractor

    extractor = ActivationExtractor("tiny-llama", context_length=32)
    windows = list(extractor.windows("pydoc"))[:6]
    error = precision.forward_error(extractor, windows, torch.bfloat16)
    step = torch.finfo(torch.bfloat16).eps  # 2^-7: the spacing just above 1
    assert len(error.inputs) == len(error.outputs) == 3
    assert 0.02 * step < min(error.inputs + error.outputs) and error.max < 4 * step
    same = precision.forward_error(extractor, windows, torch.float32)
    assert same.max < 1e-6  # the oracle itself: the same model in float32 agrees with itself
