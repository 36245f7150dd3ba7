"""circuit-tracer's on-disk transcoder layout: file and tensor names, and reading or writing one layer.

circuit-tracer (decoderesearch/circuit-tracer 0.5.0) reads two layouts, one file set per model
layer m = 0..M-1 (F features, d = d_model), plus a ``config.yaml``:

- Per-layer transcoders (``transcoder/single_layer_transcoder.py``: ``load_transcoder``,
  ``SingleLayerTranscoder.to_safetensors``): ``layer_{m}.safetensors`` with ``W_enc`` [F, d]
  (pre-activations ``x @ W_enc.T + b_enc``), ``b_enc`` [F], ``W_dec`` [F, d] (output
  ``a @ W_dec + b_dec``), ``b_dec`` [d], ``activation_function.threshold`` [F] (JumpReLU; ReLU
  when absent) and ``W_skip`` [d_out, d_in] (adds ``x @ W_skip.T``) when there is a skip.
  ``load_transcoder`` loads every key with a strict ``load_state_dict``: no other key may appear.
- Cross-layer transcoder (``transcoder/cross_layer_transcoder.py``: ``load_clt``,
  ``_load_state_dict``, ``to_safetensors``): ``W_enc_{m}.safetensors`` with ``W_enc_{m}`` [F, d],
  ``b_enc_{m}`` [F], ``b_dec_{m}`` [d] and ``threshold_{m}`` [F] (JumpReLU), and
  ``W_dec_{m}.safetensors`` with ``W_dec_{m}`` [F, M - m, d] (decoders to layers m..M-1).
- ``config.yaml`` (``utils/caching.py``: ``load_transcoders_from_cache``): ``model_kind``
  (``transcoder_set`` or ``cross_layer_transcoder``), ``feature_input_hook``,
  ``feature_output_hook`` and optionally ``scan``.

`read_layer` and `write_layer` use the same names for both layouts: ``W_enc``, ``b_enc``,
``b_dec``, ``W_dec`` ([F, d] in a transcoder set, [F, M - m, d] in a CLT), ``threshold``,
``W_skip`` and ``k`` (circuit-tracer's TopK transcoder sets). This module is the one reader and
writer of these files (`clt.models.export` and `clt.sparse.weights` both use it); every write is
atomic (write, then rename).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from torch import Tensor

from clt.files import atomic_save_tensors, atomic_write_text
from clt.models.saving import CheckpointError

CONFIG_FILE = "config.yaml"
PLT_KIND = "transcoder_set"
CLT_KIND = "cross_layer_transcoder"
FILES = {PLT_KIND: ("layer_{}.safetensors",), CLT_KIND: ("W_enc_{}.safetensors", "W_dec_{}.safetensors")}
"""File name patterns of each layout, the layer's main file first."""
_FILE_RE = re.compile(r"^(layer|W_enc|W_dec)_(\d+)\.safetensors$")
_REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec")


def _names(kind: str, m: int) -> dict[str, dict[str, str]]:
    """Layer m's files, each with its tensors: layout-neutral name → name stored in the file."""
    if kind == PLT_KIND:
        keys = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip", "k")
        return {f"layer_{m}.safetensors": {k: "activation_function.threshold" if k == "threshold" else k for k in keys}}
    return {
        f"W_enc_{m}.safetensors": {k: f"{k}_{m}" for k in ("W_enc", "b_enc", "b_dec", "threshold")},
        f"W_dec_{m}.safetensors": {"W_dec": f"W_dec_{m}"},
    }


def is_layer_file(name: str) -> bool:
    """Whether a file name is one of the layouts' per-layer files."""
    return _FILE_RE.match(name) is not None


def layer_files(folder: Path, pattern: str) -> dict[int, Path]:
    """The files in `folder` named by `pattern` (one of `FILES`' patterns), by layer index."""
    regex = re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")
    return {int(match.group(1)): p for p in folder.iterdir() if (match := regex.match(p.name))}


def detect_kind(folder: Path) -> str | None:
    """The layout of the layer files in `folder` (PLT_KIND or CLT_KIND); None when it holds neither."""
    return next((kind for kind, patterns in FILES.items() if layer_files(folder, patterns[0])), None)


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.yaml`` as a dict (empty when there is none)."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise CheckpointError(f"{file} is not valid YAML ({err}); export the folder again") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a mapping; export the folder again")
    return config


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """Write the folder's ``config.yaml`` atomically (keys in the given order)."""
    atomic_write_text(yaml.safe_dump(config, sort_keys=False), folder / CONFIG_FILE)


def read_layer(
    folder: Path, kind: str, m: int, *, device: str | torch.device = "cpu", decoder: bool = True
) -> dict[str, Tensor]:
    """Layer m's tensors under the module's layout-neutral names; W_dec only with `decoder` (a CLT's
    ``W_dec_{m}`` file may be absent: W_dec is then left out). Raises CheckpointError naming the file."""
    out: dict[str, Tensor] = {}
    for position, (name, keys) in enumerate(_names(kind, m).items()):
        file = folder / name
        if position > 0 and not (decoder and file.is_file()):
            continue
        wanted = {k: v for k, v in keys.items() if decoder or k != "W_dec"}
        out |= _read_file(file, wanted, device)
    if kind == CLT_KIND and "W_dec" in out and out["W_dec"].ndim != 3:
        raise CheckpointError(
            f"{folder / f'W_dec_{m}.safetensors'}: W_dec_{m} has shape {list(out['W_dec'].shape)}; "
            "expected [F, n_out, d]"
        )
    return out


def _read_file(file: Path, keys: dict[str, str], device: str | torch.device) -> dict[str, Tensor]:
    """The tensors `keys` names (neutral → stored) that `file` holds; the required ones must be there."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; copy the complete folder or write it again")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            stored = set(handle.keys())
            missing = [v for k, v in keys.items() if k in _REQUIRED and v not in stored]
            if missing:
                raise CheckpointError(
                    f"{file} has no tensor {missing[0]!r} (missing {missing}); it holds {sorted(stored)}: "
                    "not a circuit-tracer transcoder file, write it again"
                )
            return {k: handle.get_tensor(v) for k, v in keys.items() if v in stored}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file (corrupt or truncated: {err}); "
            "copy it again or write the folder again"
        ) from err


def write_layer(folder: Path, kind: str, m: int, tensors: dict[str, Tensor | None]) -> list[str]:
    """Write layer m's tensors (layout-neutral names; None entries left out) atomically; returns the
    names of the files written."""
    files = _names(kind, m)
    unknown = sorted(set(tensors) - {k for keys in files.values() for k in keys})
    if unknown:
        raise ValueError(f"a {kind} file holds no {unknown}; give {sorted(_REQUIRED)} and optional ones")
    for name, keys in files.items():
        part = {keys[k]: v.detach().cpu().contiguous() for k, v in tensors.items() if k in keys and v is not None}
        atomic_save_tensors(part, folder / name, {"format": "pt"})
    return list(files)


__all__ = [
    "CLT_KIND",
    "CONFIG_FILE",
    "FILES",
    "PLT_KIND",
    "detect_kind",
    "is_layer_file",
    "layer_files",
    "read_config",
    "read_layer",
    "write_config",
    "write_layer",
]
