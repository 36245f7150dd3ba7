"""Atomic, pickle-free file I/O shared by every stage: write to a temporary name, then rename."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write `text` to `path` so a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically (tensors are made contiguous)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def read_tensors(path: str | Path, error: type[Exception], *, missing: str, corrupt: str,
                 missing_error: type[Exception] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, raising `error` (`missing_error` if absent) with the fix hint when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise (missing_error or error)(f"{path} is missing: {missing}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{path} is corrupt or truncated ({err}); {corrupt}") from err
