"""Transcoders and models for the stage runners: from a path, a name, or what a transcoder records."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def load_transcoder(path: str | Path, device: str = "cpu") -> Any:
    """A transcoder (eval mode) from any source `clt.load_dictionary` reads: a `save_pretrained` folder, a
    training run folder, a `.safetensors` file, a sparsify, SAELens or circuit-tracer folder, or a hub
    id in the local Hugging Face cache."""
    from clt.models.dictionaries import load_dictionary

    return load_dictionary(path, device=device)


def model_for(transcoder: Any, model: Any, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from a name/path, a pair, or the transcoder's recorded model name."""
    from clt.nnsight.loading import load_model

    if isinstance(model, tuple):
        return model
    name = model or transcoder.cfg.model_name
    if not name:
        raise ValueError("the transcoder does not record its model; pass --model (a name or path)")
    return load_model(name, device=device)
