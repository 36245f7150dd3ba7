"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint is a folder ``step_{N:08d}/`` holding ``transcoder/`` (save_pretrained, unfolded),
``optimizer.safetensors``, ``state.safetensors`` (RNG and feature-activity counters) and
``trainer_state.json``. It is written under a temporary name and renamed when complete, so a
crash mid-write never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clt.models.transcoder import CrossLayerTranscoder

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the run that tries to resume it."""


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state as flat tensors plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, entries in state["state"].items()
        for name, value in entries.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, state["param_groups"]


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> None:
    """Restore what `optimizer_tensors` saved."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    directory: Path,
    step: int,
    model: CrossLayerTranscoder,
    optimizer_state: tuple[dict[str, torch.Tensor], list[dict[str, Any]]],
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically (optimizer_state: `optimizer_tensors`) and keep the newest `keep`."""
    final = directory / f"step_{step:08d}"
    tmp = directory / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "transcoder")
    opt_tensors, groups = optimizer_state
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups}, indent=1))
    if final.exists():  # the same step again (a resumed run's end): swap by renames, never delete first
        old = directory / f".old_step_{step:08d}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    for stale in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir() and _STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def load_checkpoint(
    path: Path,
) -> tuple[CrossLayerTranscoder, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(transcoder, optimizer tensors, state tensors, trainer state) of a checkpoint folder."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        model = CrossLayerTranscoder.from_pretrained(path / "transcoder")
        return model, load_file(str(path / "optimizer.safetensors")), load_file(str(path / "state.safetensors")), state
    except (OSError, ValueError) as err:
        raise CheckpointMismatchError(
            f"checkpoint {path} is unreadable ({err}); delete it to resume from the previous one"
        ) from err
