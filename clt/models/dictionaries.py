"""`load_dictionary`: a transcoder from any format this project reads, from a folder or a cached hub id.

Formats (`FORMATS`, tried in this order; `detect_format` names the one a folder holds):

- ``clt``: this project's ``save_pretrained`` folder (``config.json`` + ``model.safetensors``), a
  `clt train` run folder (``transcoder/``) or a single ``.safetensors`` file (`clt.save`);
- ``circuit-tracer``: transcoder sets (``layer_{i}.safetensors``, or the files a ``config.yaml``
  lists under ``transcoders``, ``hf://`` ones from the local cache) and cross-layer transcoders
  (``W_enc_{i}``/``W_dec_{i}.safetensors``) with ``config.yaml`` (`clt.models.export`);
- ``sparsify``: EleutherAI sparsify's hookpoint folders (``cfg.json`` + ``sae.safetensors``, one
  folder or a folder of them; `clt.models.sparsify_files`);
- ``saelens``: SAELens SAEs and transcoders (``cfg.json`` + ``sae_weights.safetensors``, one folder
  or a folder of them; `clt.models.saelens_files`).

Where from: a local path, else a Hugging Face hub id ``owner/repo[/path/in/repo][@revision]`` that is
already in the local cache (nothing is downloaded: the offline rule and how-to-provide message of
models, `clt.files.cached_hub_folder`). circuit-tracer's legacy names ``gemma`` and ``llama`` stand
for their hub repositories. Nothing is unpickled and no remote code runs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from clt.files import NotAvailableOfflineError, cached_hub_folder
from clt.models import saelens_files, sparsify_files
from clt.models.circuit_tracer_files import CONFIG_FILE as CT_CONFIG
from clt.models.circuit_tracer_files import PLT_KIND, detect_kind, read_config, write_config
from clt.models.export import load_circuit_tracer
from clt.models.saving import CheckpointError
from clt.models.transcoder import CrossLayerTranscoder

DICTIONARY_PROVIDE = "a local folder (sparsify, SAELens, circuit-tracer or `save_pretrained`)"
HUB_ALIASES = {"gemma": "mwhanna/gemma-scope-transcoders", "llama": "mntss/transcoder-Llama-3.2-1B"}
"""circuit-tracer's legacy transcoder names and the hub repositories they stand for."""


class UnknownFormatError(CheckpointError):
    """A folder holds no dictionary in a format this project reads."""


@dataclasses.dataclass(frozen=True)
class DictionaryFormat:
    """A format `load_dictionary` reads: how to recognise a folder of it and how to load one."""

    name: str
    files: str
    """What a folder of this format holds (for error messages)."""
    detect: Callable[[Path], bool]
    load: Callable[[Path, str | Path | None], CrossLayerTranscoder]
    """Reads a folder (the hub cache folder as the second argument, for files it refers to)."""


def _clt_folder(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".safetensors":
        return path
    for folder in (path, path / "transcoder", path / "final"):
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def _load_clt(path: Path, cache_dir: str | Path | None = None) -> CrossLayerTranscoder:
    found = _clt_folder(path)
    if found is None:
        raise FileNotFoundError(f"no save_pretrained folder (config.json + model.safetensors) at {path}")
    return CrossLayerTranscoder.load(found) if found.is_file() else CrossLayerTranscoder.from_pretrained(found)


def _is_circuit_tracer(path: Path) -> bool:
    return path.is_dir() and (detect_kind(path) is not None or (path / CT_CONFIG).is_file())


def _load_circuit_tracer(path: Path, cache_dir: str | Path | None = None) -> CrossLayerTranscoder:
    """A circuit-tracer folder; a transcoder set whose ``config.yaml`` lists its layer files under
    ``transcoders`` (``hf://owner/repo/file`` in the local cache, or paths) is read from those files."""
    config = read_config(path)
    entries = config.get("transcoders")
    if not entries:
        return load_circuit_tracer(path)
    if not isinstance(entries, list) or config.get("model_kind", PLT_KIND) != PLT_KIND:
        raise CheckpointError(f"{path / CT_CONFIG}: 'transcoders' must list one file per layer of a transcoder_set")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for m, entry in enumerate(entries):
            file = _transcoder_file(path, str(entry), cache_dir)
            if file.suffix != ".safetensors":
                raise CheckpointError(
                    f"{path / CT_CONFIG}: layer {m} is {entry}, not a .safetensors file (Gemma Scope's .npz "
                    "transcoders are not read); save the set with circuit-tracer's to_safetensors and load that"
                )
            (folder / f"layer_{m}.safetensors").symlink_to(file.resolve())
        write_config(folder, {k: v for k, v in config.items() if k != "transcoders"})
        return load_circuit_tracer(folder)


def _transcoder_file(folder: Path, entry: str, cache_dir: str | Path | None) -> Path:
    if not entry.startswith("hf://"):
        return folder / entry
    ref, _, query = entry.removeprefix("hf://").partition("?")
    revision = query.removeprefix("revision=") if query.startswith("revision=") else ""
    name = ref + (f"@{revision}" if revision else "")
    return cached_hub_folder(name, what="transcoder file", provide=DICTIONARY_PROVIDE, cache_dir=cache_dir)


FORMATS: dict[str, DictionaryFormat] = {}
"""The registered formats by name, in the order `detect_format` tries them."""


def register_format(fmt: DictionaryFormat) -> None:
    """Add (or replace) a format `load_dictionary` reads."""
    FORMATS[fmt.name] = fmt


for _fmt in (
    DictionaryFormat(
        "clt",
        "config.json + model.safetensors, or a .safetensors file",
        lambda p: _clt_folder(p) is not None,
        _load_clt,
    ),
    DictionaryFormat(
        "circuit-tracer",
        "layer_{i}.safetensors or W_enc_{i}/W_dec_{i}.safetensors, with config.yaml",
        _is_circuit_tracer,
        _load_circuit_tracer,
    ),
    DictionaryFormat(
        "sparsify",
        "cfg.json + sae.safetensors per hookpoint folder",
        sparsify_files.detect,
        lambda p, _: sparsify_files.load_sparsify(p),
    ),
    DictionaryFormat(
        "saelens",
        "cfg.json + sae_weights.safetensors per SAE folder",
        saelens_files.detect,
        lambda p, _: saelens_files.load_saelens(p),
    ),
):
    register_format(_fmt)


def detect_format(path: str | Path) -> str:
    """Name of the format of a local folder or file; UnknownFormatError says what was found instead."""
    path = Path(path)
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt.name
    if path.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        found = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing (empty folder)"
    else:
        found = f"a {path.suffix or 'extensionless'} file"
    accepted = "; ".join(f"{f.name} ({f.files})" for f in FORMATS.values())
    raise UnknownFormatError(f"{path} holds no dictionary in a known format: found {found}. Accepted: {accepted}")


def resolve_dictionary(name_or_path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The local path of a dictionary: the path itself, or a cached hub id's folder (never downloads)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = HUB_ALIASES.get(str(name_or_path), str(name_or_path))
    if path.is_absolute() or name.startswith((".", "~")) or path.suffix == ".safetensors":
        accepted = "; ".join(f"{f.name} ({f.files})" for f in FORMATS.values())
        raise FileNotFoundError(
            f"no transcoder at {path}: give a folder or file of a known format ({accepted}), a `clt train` "
            "run folder, or a hub id (owner/repo[/subfolder]) in the local Hugging Face cache"
        )
    try:
        return cached_hub_folder(name, what="dictionary", provide=DICTIONARY_PROVIDE, cache_dir=cache_dir)
    except NotAvailableOfflineError as err:
        raise NotAvailableOfflineError(f"{err} (there is no local file or folder {str(path)!r} either)") from err


def load_dictionary(
    name_or_path: str | Path,
    *,
    format: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
) -> CrossLayerTranscoder:
    """A `CrossLayerTranscoder` (eval mode) from a folder, file or cached hub id in any format of
    `FORMATS` (module docstring); `format` skips detection, `cache_dir` overrides the hub cache."""
    path = resolve_dictionary(name_or_path, cache_dir=cache_dir)
    name = format if format is not None else detect_format(path)
    if name not in FORMATS:
        raise ValueError(f"format '{name}' is not one of {list(FORMATS)}")
    model = FORMATS[name].load(path, cache_dir).eval()
    return model if device is None else model.to(device)


__all__ = [
    "FORMATS",
    "DictionaryFormat",
    "UnknownFormatError",
    "detect_format",
    "load_dictionary",
    "register_format",
    "resolve_dictionary",
]
