"""Saving and loading dictionaries: a `save_pretrained` folder (`config.json` + `model.safetensors`)
or one safetensors file with the config in its metadata (`save`); never pickle, writes atomic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import Tensor

from clt.config.transcoder import CLTConfig
from clt.files import atomic_save_tensors, read_tensors

if TYPE_CHECKING:
    from clt.models.transcoder import CrossLayerTranscoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_META_KEY = "clt_config"


class CheckpointError(ValueError):
    """A transcoder file is corrupt, truncated or does not match its config."""


class PretrainedIO:
    """HF-style I/O of a dictionary with a `cfg` whose class `from_config` builds (`CrossLayerTranscoder`)."""

    cfg: CLTConfig

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` (unfolded: statistics saved as buffers)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cfg.save(directory / CONFIG_NAME)
        atomic_save_tensors(self._tensors(), directory / WEIGHTS_NAME, {"format": "pt"})
        return directory

    def save(self, path: str | Path) -> Path:
        """Save to one safetensors file with the config in its metadata (any suffix: .pt,
        .safetensors, ...; never pickle), or to a `save_pretrained` folder if `path` has none."""
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            return self.save_pretrained(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt", _META_KEY: json.dumps(self.cfg.to_dict())}
        atomic_save_tensors(self._tensors(), path, metadata)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> CrossLayerTranscoder:
        """Load a dictionary written by `save_pretrained` (a folder) or by `save` (a single file)."""
        path = Path(path)
        if path.is_file():
            return cls._from_tensors(*_read_single_file(path), device, path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no transcoder at {path}: expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(save_pretrained) or a single file written by save"
            )
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing; save the transcoder with save_pretrained")
        weights = path / WEIGHTS_NAME
        return cls._from_tensors(CLTConfig.load(config_path), _read_safetensors(weights), device, weights)

    load = from_pretrained
    """The seed's name of `from_pretrained` (a single file written by `save` or a folder)."""

    def _tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    @classmethod
    def _from_tensors(
        cls, cfg: CLTConfig, tensors: dict[str, Tensor], device: str | torch.device | None, source: Path
    ) -> CrossLayerTranscoder:
        model = cls.from_config(cfg)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{source} does not match its config (missing {missing}, "
                f"unexpected {unexpected}); config and weights come from "
                "different transcoders"
            )
        for name, value in expected.items():
            if tuple(tensors[name].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source}: '{name}' has shape {list(tensors[name].shape)}"
                    f" but the config implies {list(value.shape)}; config and "
                    "weights come from different transcoders"
                )
        model.load_state_dict(tensors)
        return model if device is None else model.to(device)


def _read_single_file(path: Path) -> tuple[CLTConfig, dict[str, Tensor]]:
    """The config (from the metadata) and tensors of a file written by `save`."""
    tensors = _read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise CheckpointError(
            f"{path} has no '{_META_KEY}' metadata: it was not written by "
            "CrossLayerTranscoder.save (use from_pretrained for a folder)"
        )
    try:
        values = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path}: the config in its metadata is not valid JSON ({err}); save the transcoder again"
        ) from err
    return CLTConfig.from_dict(values), tensors


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    return read_tensors(
        path,
        CheckpointError,
        missing="save the transcoder again",
        corrupt="re-save the transcoder or copy the file again",
        missing_error=FileNotFoundError,
    )


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CheckpointError", "PretrainedIO"]
