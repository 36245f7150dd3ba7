"""Shared fixtures: tiny random models (fixed seed) and, for `slow` tests, the default model."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    """(name, model, tokenizer) for each tiny architecture."""
    from clt.nnsight.models import load_model

    model, tokenizer = load_model(request.param)
    return request.param, model, tokenizer


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer) of the tiny Llama."""
    from clt.nnsight.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default model, SmolLM2-135M (slow to load: ~15 s)."""
    from clt.nnsight.models import load_model

    return load_model("smollm2-135m")
