"""Transcoders and models for the stage runners: from a path, a name, or what a transcoder records."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def load_transcoder(path: str | Path, device: str = "cpu") -> Any:
    """A transcoder from a `save_pretrained` folder, a training run folder or a `.safetensors` file."""
    from clt.models.transcoder import CrossLayerTranscoder

    path = Path(path)
    if path.is_file():
        return CrossLayerTranscoder.load(path).to(device).eval()
    for folder in (path, path / "transcoder", path / "final"):
        if (folder / "config.json").is_file():
            return CrossLayerTranscoder.from_pretrained(folder).to(device).eval()
    raise FileNotFoundError(
        f"no transcoder at {path}: give a save_pretrained folder (config.json + "
        "model.safetensors), a training run folder or a .safetensors file"
    )


def model_for(transcoder: Any, model: Any, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from a name/path, a pair, or the transcoder's recorded model name."""
    from clt.nnsight.loading import load_model

    if isinstance(model, tuple):
        return model
    name = model or transcoder.cfg.model_name
    if not name:
        raise ValueError("the transcoder does not record its model; pass --model (a name or path)")
    return load_model(name, device=device)
