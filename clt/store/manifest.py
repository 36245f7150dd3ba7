"""The manifest of a store folder: version, format, shard list and progress; partial manifests of several writers.

``manifest.json`` holds version, model, layers, d_model, dtype, compression, output_site, token
count, shard list, ``complete`` and the producer's ``state``. Writer r of w writes
``manifest.partRofW.json`` and ``stats.partRofW.safetensors`` until the parts are merged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clt.files import atomic_write_text
from clt.store.format import StoreError

STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
STATS_FILE = "stats.safetensors"
FORMAT_DEFAULTS = {"compression": "none", "output_site": "mlp_out"}
"""Format fields added in version 2, with the values every version 1 store has."""
FORMAT_KEYS = ("model_name", "layers", "d_model", "dtype", "compression", "output_site")
"""Fields that must agree between a store and a run resuming it, or between the parts of one store."""
_MANIFEST_KEYS = ("layers", "d_model", "dtype", "n_tokens", "shards", "complete", "state")


def read_manifest(path: Path, name: str = MANIFEST) -> dict[str, Any]:
    """The manifest `name` of a store folder, checked (a version 1 one gets version 2's format defaults)."""
    file = path / name
    if not file.is_file():
        if name == MANIFEST and part_manifests(path):
            raise StoreError(
                f"{path} is being written by several writers and is not merged yet; wait for them "
                "to finish (the last one merges) or run merge_store(path)"
            )
        raise StoreError(f"{path} is not an activation store (no {name}); create one with `clt extract`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{file} is corrupt ({err}); restore it or re-extract into a new folder") from err
    if not isinstance(manifest, dict) or manifest.get("version") not in READABLE_VERSIONS:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise StoreError(f"{file} has version {version}, this clt reads versions {READABLE_VERSIONS}")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise StoreError(f"{file} is corrupt (no {', '.join(missing)}); restore it or re-extract into a new folder")
    for key, default in FORMAT_DEFAULTS.items():
        manifest.setdefault(key, default)
    return manifest


def write_manifest(manifest: dict[str, Any], path: Path, name: str = MANIFEST) -> None:
    """Write the manifest `name` of the store folder `path` atomically."""
    atomic_write_text(json.dumps(manifest, indent=1), path / name)


def part_manifests(path: Path) -> list[Path]:
    """The partial manifests of the writers filling the store folder `path`."""
    return sorted(path.glob("manifest.part*of*.json"))


def part_names(rank: int, count: int) -> tuple[str, str, str]:
    """(manifest, statistics file, shard prefix) of writer `rank` of `count` writing one store."""
    return f"manifest.part{rank}of{count}.json", f"stats.part{rank}of{count}.safetensors", f"shard_p{rank}_"


def parts_complete(path: Path, count: int) -> bool:
    """Whether all `count` writers of the store folder `path` have finished their parts."""
    names = [part_names(rank, count)[0] for rank in range(count)]
    return all((path / name).is_file() and read_manifest(path, name)["complete"] for name in names)
