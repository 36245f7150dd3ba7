"""Atomic, pickle-free file I/O shared by every stage: write to a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary name beside `path` to write to; renamed onto `path` when the block ends,
    removed if it raises. Unique per call, so concurrent writers of one file never share it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")  # default permissions
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write `text` to `path` so a crash leaves either the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors atomically (tensors are made contiguous)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_tensors(
    path: str | Path,
    error: type[Exception],
    *,
    missing: str,
    corrupt: str,
    missing_error: type[Exception] | None = None,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file, raising `error` (`missing_error` if absent) with the fix hint when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise (missing_error or error)(f"{path} is missing: {missing}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{path} is corrupt or truncated ({err}); {corrupt}") from err
