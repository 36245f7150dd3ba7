"""Writing a store folder: StoreWriter (shard by shard, atomically, resumable) and merging several writers.

Every file is written to a temporary name and renamed, and the manifest is rewritten after each
shard, so an interrupted extraction leaves a valid store that resumes where it stopped. Shards
are written straight from the buffered batches (no concatenated copy). Several writers
(``StoreWriter(part=(rank, count))``) can fill one folder with disjoint shards and partial
manifests; `merge_store` (run by the last one to finish) joins them.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from clt.config.constants import COMPRESSIONS, STORE_DTYPES, check_choice, check_output_site
from clt.files import atomic_save_tensors
from clt.store.format import StoreError, encode, load_tensors, save_shard, shard_name, zstandard
from clt.store.manifest import (
    FORMAT_KEYS,
    MANIFEST,
    STATS_FILE,
    STORE_VERSION,
    part_manifests,
    part_names,
    parts_complete,
    read_manifest,
    write_manifest,
)
from clt.store.reader import ActivationStore
from clt.store.stats import RunningStats, check_stats_finite

logger = logging.getLogger(__name__)


def writable_folder(path: str | Path) -> Path:
    """Create the folder `path` if needed and check that files can be written in it (StoreError if not)."""
    path = Path(path)
    fix = "choose another folder (output_dir=..., --output-dir) or make this one writable"
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise StoreError(f"cannot write the activation store to {path}: {existing} is a file, not a folder; {fix}")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".clt-write-test-"):
            pass
    except OSError as err:
        raise StoreError(f"cannot write the activation store to {path}: {err.strerror or err}; {fix}") from err
    return path


class StoreWriter:
    """Writes activations into a store folder shard by shard, atomically; resumes an existing one.

    With ``part=(rank, count)`` it is one of `count` writers filling the folder: it writes its own
    shards, statistics and partial manifest, and `finish` merges the parts once all are complete.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        layers: list[int],
        d_model: int,
        model_name: str | None = None,
        dtype: str = "float16",
        shard_tokens: int = 8192,
        extra: dict[str, Any] | None = None,
        resume: bool = True,
        compression: str = "none",
        output_site: str = "mlp_out",
        part: tuple[int, int] | None = None,
    ) -> None:
        check_choice("dtype", dtype, STORE_DTYPES, StoreError)
        check_choice("compression", compression, COMPRESSIONS, StoreError)
        check_output_site(output_site, StoreError)
        if compression == "zstd":
            zstandard()  # fail before extracting anything when it is missing
        rank, count = part or (0, 1)
        if count < 1 or not 0 <= rank < count:
            raise StoreError(f"writer rank {rank} is out of range for {count} writers: use 0 <= rank < {count}")
        self.path = writable_folder(path)
        self.shard_tokens = shard_tokens
        self.part = part
        self._manifest_name, stats_name, self._prefix = (
            part_names(rank, count) if part else (MANIFEST, STATS_FILE, "shard_")
        )
        self.stats = RunningStats(len(layers), d_model)
        self.manifest: dict[str, Any] = {
            "version": STORE_VERSION,
            "model_name": model_name,
            "layers": list(layers),
            "d_model": d_model,
            "dtype": dtype,
            "compression": compression,
            "output_site": output_site,
            "n_tokens": 0,
            "shards": [],
            "complete": False,
            "state": {},
            "extra": extra or {},
        }
        if part:
            self.manifest.update(part=[rank, count], stats_file=stats_name)
            if (self.path / MANIFEST).exists():
                raise StoreError(f"{self.path} already holds a merged store; open it, or extract into a new folder")
        elif part_manifests(self.path) and not (self.path / MANIFEST).exists():
            raise StoreError(
                f"{self.path} is being written by several writers; resume them with the same "
                "writer_rank/num_writers, or run merge_store(path) once they have finished"
            )
        if (self.path / self._manifest_name).exists():
            old = read_manifest(self.path, self._manifest_name)
            if not resume:
                raise StoreError(f"{self.path} already holds a store; choose another folder or resume it")
            for key in FORMAT_KEYS:
                if old[key] != self.manifest[key]:
                    raise StoreError(
                        f"cannot resume {self.path}: its {key} is {old[key]!r}, this run's is "
                        f"{self.manifest[key]!r}; use the same settings or a new folder"
                    )
            self.manifest = {**old, "version": STORE_VERSION}
            self.stats.sums = load_tensors(self.path / stats_name)
        self._stats_file = self.path / stats_name
        if int(self.stats.sums["count"]) != self.manifest["n_tokens"]:
            self._recount()
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._buffered = 0
        self._buffer_stats = RunningStats(len(layers), d_model)

    @property
    def n_tokens(self) -> int:
        """Tokens written to shards so far."""
        return self.manifest["n_tokens"]

    @property
    def state(self) -> dict[str, Any]:
        """Progress of the producer as of the last shard written (for resuming)."""
        return self.manifest["state"]

    @property
    def complete(self) -> bool:
        """Whether `finish` was called on this store."""
        return self.manifest["complete"]

    def add(
        self,
        inputs: torch.Tensor,
        outputs: torch.Tensor | None,
        *,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        window_ids: torch.Tensor,
    ) -> None:
        """Buffer rows [n, L, d] (outputs None for an mlp_in store); `flush` writes them (every ~shard_tokens)."""
        expected = (len(self.manifest["layers"]), self.manifest["d_model"])
        mlp_in = self.manifest["output_site"] == "mlp_in"
        if mlp_in and outputs is not None and outputs is not inputs:
            raise StoreError("this store records MLP inputs only (output_site='mlp_in'): pass outputs=None")
        if not mlp_in and outputs is None:
            raise StoreError("this store records MLP outputs (output_site='mlp_out'): pass them as outputs")
        targets = inputs if outputs is None else outputs
        if inputs.ndim != 3 or tuple(inputs.shape[1:]) != expected or inputs.shape != targets.shape:
            raise StoreError(
                f"activations must be [n, {expected[0]}, {expected[1]}]; got inputs "
                f"{tuple(inputs.shape)} and outputs {tuple(targets.shape)}"
            )
        row = {"token_ids": token_ids.long(), "positions": positions.int(), "window_ids": window_ids.long()}
        seen = []  # the values a reader gets back
        for key, values in (("inputs", inputs),) if mlp_in else (("inputs", inputs), ("outputs", outputs)):
            stored, decoded = encode(values, self.manifest["dtype"])  # type: ignore[arg-type]
            row.update({key + suffix: tensor for suffix, tensor in stored.items()})
            seen.append(decoded)
        stats = RunningStats(*expected)
        stats.update(seen[0], seen[-1])
        check_stats_finite(stats, self.manifest["layers"], (inputs, targets), (seen[0], seen[-1]))
        self._buffer.append(row)
        self._buffer_stats.add(stats)
        self._buffered += inputs.shape[0]

    def flush(self, state: dict[str, Any]) -> None:
        """Write all buffered rows as one shard and record the producer's `state` with it."""
        if self._buffered:
            self._write_shard()
        self.manifest["state"] = state
        self._write_manifest()

    def flush_if_full(self, state: dict[str, Any]) -> None:
        """Flush once at least `shard_tokens` rows are buffered."""
        if self._buffered >= self.shard_tokens:
            self.flush(state)

    def _write_shard(self) -> None:
        name = shard_name(len(self.manifest["shards"]), self.manifest["compression"], self._prefix)
        save_shard(
            {k: [b[k] for b in self._buffer] for k in self._buffer[0]}, self.path / name, self.manifest["compression"]
        )
        self.stats.add(self._buffer_stats)
        atomic_save_tensors(self.stats.sums, self._stats_file)
        self.manifest["shards"].append({"file": name, "n_tokens": self._buffered})
        self.manifest["n_tokens"] += self._buffered
        self._buffer, self._buffered = [], 0
        self._buffer_stats = RunningStats(len(self.manifest["layers"]), self.manifest["d_model"])
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_manifest(self.manifest, self.path, self._manifest_name)

    def _recount(self) -> None:
        """Rebuild the statistics from the listed shards: a crash between writing the statistics
        and the manifest left them counting a shard the manifest does not list."""
        logger.warning(
            "%s: the statistics count %d rows but the manifest lists %d; recomputing them from the shards",
            self.path,
            int(self.stats.sums["count"]),
            self.manifest["n_tokens"],
        )
        self.stats = RunningStats(len(self.manifest["layers"]), self.manifest["d_model"])
        if self.manifest["shards"]:
            store = ActivationStore.open(self.path, normalize=False, manifest=self._manifest_name)
            for index in range(len(store.shards)):
                data = store.shard(index)
                self.stats.update(data["inputs"], data["outputs"])
        atomic_save_tensors(self.stats.sums, self._stats_file)

    def finish(
        self, *, batch_size: int = 64, normalize: bool = True, state: dict[str, Any] | None = None
    ) -> ActivationStore:
        """Write what is buffered, mark the store (or this writer's part) complete and open it.

        The last writer of a multi-writer store to finish merges the parts and opens the merged store;
        the others open their own part.
        """
        self.flush(state or self.manifest["state"])
        self.manifest["complete"] = True
        self._write_manifest()
        if self.part and parts_complete(self.path, self.part[1]):
            return merge_store(self.path, batch_size=batch_size, normalize=normalize)
        return ActivationStore.open(self.path, batch_size=batch_size, normalize=normalize, manifest=self._manifest_name)


def merge_store(path: str | Path, *, batch_size: int = 64, normalize: bool = True) -> ActivationStore:
    """Join the parts written by several writers into one store (shards by rank, statistics summed)."""
    path = Path(path)
    files = part_manifests(path)
    if not files:
        raise StoreError(
            f"{path} holds no partial manifests (manifest.partRofW.json) to merge; write them with "
            "extract(..., writer_rank=r, num_writers=w)"
        )
    parts = sorted((read_manifest(path, f.name) for f in files), key=lambda m: m["part"][0])
    count = parts[0]["part"][1]
    if any(m["part"][1] != count for m in parts):
        raise StoreError(
            f"{path} holds parts of different writer counts {sorted({m['part'][1] for m in parts})}; "
            "delete the parts of the run you do not want and merge again"
        )
    missing = sorted(set(range(count)) - {m["part"][0] for m in parts})
    unfinished = [m["part"][0] for m in parts if not m["complete"]]
    if missing or unfinished:
        raise StoreError(
            f"cannot merge {path}: writers {missing or unfinished} of {count} have not "
            f"{'started' if missing else 'finished'}; run (or resume) them with writer_rank=r, "
            f"num_writers={count}, then merge"
        )
    first = parts[0]
    for key in (*FORMAT_KEYS, "extra"):
        for other in parts[1:]:
            if other[key] != first[key]:
                raise StoreError(
                    f"cannot merge {path}: writer {other['part'][0]} has {key} {other[key]!r} but "
                    f"writer 0 has {first[key]!r}; re-extract that part with the same settings"
                )
    stats = RunningStats(len(first["layers"]), first["d_model"])
    for part in parts:
        other = RunningStats(len(first["layers"]), first["d_model"])
        other.sums = load_tensors(path / part["stats_file"])
        stats.add(other)
    atomic_save_tensors(stats.sums, path / STATS_FILE)
    manifest = {key: first[key] for key in (*FORMAT_KEYS, "extra")}
    manifest.update(
        version=STORE_VERSION,
        n_tokens=sum(m["n_tokens"] for m in parts),
        shards=[s for m in parts for s in m["shards"]],
        complete=True,
        state={"writers": count, "parts": [m["state"] for m in parts]},
    )
    write_manifest(manifest, path)
    return ActivationStore.open(path, batch_size=batch_size, normalize=normalize)
