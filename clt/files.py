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


# ----------------------------------------------------------------- offline Hugging Face cache


class NotAvailableOfflineError(FileNotFoundError):
    """Something named by a hub id is neither a local path nor in the local Hugging Face cache;
    the message says how to provide it."""


def offline_message(what: str, name: str, provide: str, err: BaseException | None = None) -> str:
    """The one how-to-provide message for a `what` (model, dictionary) not available offline."""
    cause = f" ({err.__class__.__name__}: {str(err).splitlines()[0]})" if err is not None and str(err) else ""
    return (
        f"{what} '{name}' is not available offline. Provide it as {provide} and pass its path, "
        f"or pre-download it into the Hugging Face cache (on a machine with internet: "
        f"`huggingface-cli download {name.split('@')[0]}`, then copy ~/.cache/huggingface/hub){cause}"
    )


def cached_hub_folder(name: str, *, what: str, provide: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder of hub id `name` (``owner/repo[/path/in/repo][@revision]``) in the Hugging
    Face cache, never downloading (the offline rule of `clt.nnsight.loading.load_model`); raises
    NotAvailableOfflineError with `offline_message` when the repository or the path is not cached."""
    from huggingface_hub import snapshot_download

    ref, _, revision = name.partition("@")
    parts = ref.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise NotAvailableOfflineError(offline_message(what, name, provide))
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        root = Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir, local_files_only=True))
    except (OSError, ValueError) as err:  # LocalEntryNotFoundError, HFValidationError
        raise NotAvailableOfflineError(offline_message(what, name, provide, err)) from err
    folder = root / sub if sub else root
    if not folder.exists():
        raise NotAvailableOfflineError(
            offline_message(what, name, provide, FileNotFoundError(f"the cached {repo_id} has no '{sub}'"))
        )
    return folder
