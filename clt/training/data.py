"""ActivationStore: MLP inputs/outputs per layer, in memory or sharded on disk, with statistics.

On disk a store is a folder::

    manifest.json          version, model, layers, d_model, dtype, compression, output_site,
                           token count, shard list, state
    stats.safetensors      running sums for the normalisation statistics (float64)
    shard_00000.safetensors  inputs [n, L, d], outputs [n, L, d], token_ids [n], positions [n],
                             window_ids [n]   (format: `clt.training.shards`)

Formats: float16/bfloat16/float32 or int8 codes with per-token-and-layer scales; shards plain
(memory-mapped when read) or zstd-compressed (``.safetensors.zst``); with ``output_site='mlp_in'``
the targets are the MLP inputs and no ``outputs`` are written (a transcoder trained on it is an
SAE). Readers always get float tensors, and the statistics are those of the values they get.
Version 1 stores (float, plain, mlp_out) are still read.

Every file is written to a temporary name and renamed, and the manifest is rewritten after each
shard, so an interrupted extraction leaves a valid store that resumes where it stopped. Shards
are written straight from the buffered batches (no concatenated copy).

Batches are a deterministic function of ``(seed, batch index)``: each epoch permutes the shard
order, concatenates groups of ``shuffle_shards`` shards into a shuffle buffer and permutes its
rows. Resuming at batch ``start`` therefore needs no data from the skipped batches.

A store still being written can be *followed* (``ActivationStore.open(path, follow=...)``):
training starts after the first shard; epoch 0 then takes the shards in the order they are
written (groups of ``shuffle_shards``, rows permuted in each group), waiting for each group, and
later epochs shuffle as above. The normalisation statistics are those of the shards present when
the store was opened. Several writers (``StoreWriter(part=(rank, count))``) can fill one folder
with disjoint shards and partial manifests; `merge_store` (run by the last one to finish) joins them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from clt.config.transcoder import OUTPUT_SITES
from clt.files import atomic_save_tensors, atomic_write_text, read_tensors
from clt.training.shards import (
    COMPRESSIONS,
    FLOAT_DTYPES,
    STORE_DTYPES,
    decode,
    encode,
    load_shard,
    save_shard,
    shard_name,
    zstandard,
)

logger = logging.getLogger(__name__)

STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
STATS_FILE = "stats.safetensors"
DTYPES = FLOAT_DTYPES
FORMAT_DEFAULTS = {"compression": "none", "output_site": "mlp_out"}
"""Format fields added in version 2, with the values every version 1 store has."""
_POLL_S = 0.05
_META_KEYS = ("token_ids", "positions", "window_ids")
_MANIFEST_KEYS = ("layers", "d_model", "dtype", "n_tokens", "shards", "complete", "state")
_STATS_ROWS = 32
"""Rows per float32 block in `RunningStats.update` (32 x 30 layers x 576 x 4 bytes = 2.2 MB)."""


class StoreError(ValueError):
    """A store is missing, corrupt or used inconsistently; the message says how to fix it."""


class ActivationBatch(NamedTuple):
    """One training batch of raw (unnormalised) activations."""

    inputs: torch.Tensor
    """MLP inputs x, [batch, layers, d_model]."""
    outputs: torch.Tensor
    """MLP outputs y, [batch, layers, d_model]."""


@dataclasses.dataclass
class NormStats:
    """Per-layer standardisation: (a - mean) / std, for MLP inputs and outputs ([layers, d_model])."""

    input_mean: torch.Tensor
    input_std: torch.Tensor
    output_mean: torch.Tensor
    output_std: torch.Tensor

    @classmethod
    def identity(cls, num_layers: int, d_model: int) -> NormStats:
        """Mean 0 and std 1: no standardisation."""
        zeros, ones = torch.zeros(num_layers, d_model), torch.ones(num_layers, d_model)
        return cls(zeros, ones, zeros.clone(), ones.clone())


class RunningStats:
    """Streaming sums (float64) from which per-layer means and scales are derived."""

    def __init__(self, num_layers: int, d_model: int) -> None:
        shape = (num_layers, d_model)
        self.sums = {k: torch.zeros(shape, dtype=torch.float64) for k in ("in_sum", "in_sq", "out_sum", "out_sq")}
        self.sums["count"] = torch.zeros((), dtype=torch.float64)

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Add a batch [n, L, d] of inputs and outputs.

        Rows are summed in float32 in blocks of `_STATS_ROWS` (small enough to stay in cache; the
        squares of float16/bfloat16 values are exact in float32) and the block sums in float64.
        """
        for prefix, values in (("in", inputs), ("out", outputs)):
            total, squares = self.sums[f"{prefix}_sum"].view(-1), self.sums[f"{prefix}_sq"].view(-1)
            rows = values.reshape(values.shape[0], -1)
            buffer = torch.empty((min(_STATS_ROWS, rows.shape[0]), rows.shape[1]), dtype=torch.float32)
            for block in rows.split(_STATS_ROWS):
                part = buffer[: block.shape[0]]
                part.copy_(block)
                total += part.sum(0)
                squares += part.square_().sum(0)
        self.sums["count"] += inputs.shape[0]

    def add(self, other: RunningStats) -> None:
        """Add the sums of another `RunningStats` (of other rows)."""
        for key, value in other.sums.items():
            self.sums[key] += value

    def finite(self) -> bool:
        """Whether every sum is finite (a NaN/inf anywhere in the rows makes its column's sums non-finite)."""
        return all(bool(torch.isfinite(value).all()) for value in self.sums.values())

    def norm_stats(self, per_dim: bool = False) -> NormStats:
        """Means per dimension; scale per layer (RMS of the centred activations) or per dimension."""
        n = float(self.sums["count"])
        if n < 2:
            raise StoreError("normalisation statistics need at least 2 tokens")
        out = []
        for prefix in ("in", "out"):
            mean = self.sums[f"{prefix}_sum"] / n
            var = (self.sums[f"{prefix}_sq"] / n - mean.square()).clamp_min(0)
            if not per_dim:
                var = var.mean(-1, keepdim=True).expand_as(var)
            out += [mean.float(), var.sqrt().clamp_min(1e-6).float().contiguous()]
        return NormStats(*out)


_MISSING = "the store is incomplete; re-run the extraction to resume it"
_CORRUPT = "delete it and its entry will be re-extracted when you resume the extraction"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path, StoreError, missing=_MISSING, corrupt=_CORRUPT)


class ActivationStore:
    """MLP activations of a model, per token and layer, with shuffled batches and statistics."""

    def __init__(
        self,
        shards: list[dict[str, torch.Tensor] | Path],
        shard_sizes: list[int],
        *,
        layers: list[int],
        d_model: int,
        stats: RunningStats,
        batch_size: int = 64,
        normalize: bool = True,
        model_name: str | None = None,
        dtype: str = "float32",
        path: Path | None = None,
        shuffle_shards: int = 4,
        extra: dict[str, Any] | None = None,
        output_site: str = "mlp_out",
        compression: str = "none",
    ) -> None:
        if not shards or sum(shard_sizes) == 0:
            raise StoreError("the activation store is empty: extract some tokens first")
        if output_site not in OUTPUT_SITES:
            raise StoreError(f"unknown output_site '{output_site}'; use one of {OUTPUT_SITES}")
        self.shards, self.shard_sizes = shards, shard_sizes
        self.layers, self.d_model = list(layers), d_model
        self.stats, self.batch_size, self.normalize = stats, batch_size, normalize
        self.model_name, self.dtype, self.path = model_name, dtype, path
        self.output_site, self.compression = output_site, compression
        self.shuffle_shards = max(1, shuffle_shards)
        self.extra = extra or {}
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._follow: _Follow | None = None
        self._written_order = False

    # construction ------------------------------------------------------------------------

    @classmethod
    def from_nnsight_activations(
        cls, activations_dict: dict[str, Any], batch_size: int = 64, normalize: bool = True
    ) -> ActivationStore:
        """An in-memory store from `ActivationExtractor.extract_from_dataset`'s dict."""
        inputs, outputs = _stack(activations_dict, "inputs"), _stack(activations_dict, "outputs")
        if inputs.shape != outputs.shape or inputs.ndim != 3:
            raise StoreError(
                f"inputs {tuple(inputs.shape)} and outputs {tuple(outputs.shape)} must both be "
                "[tokens, layers, d_model]"
            )
        default_layers = (
            sorted(activations_dict["inputs"])
            if isinstance(activations_dict["inputs"], dict)
            else range(inputs.shape[1])
        )
        layers = list(activations_dict.get("layers", default_layers))
        if len(layers) != inputs.shape[1]:
            raise StoreError(f"'layers' lists {len(layers)} layers but the activations have {inputs.shape[1]}")
        stats = RunningStats(len(layers), inputs.shape[2])
        stats.update(inputs, outputs)
        _check_finite(stats, layers, (inputs, outputs))
        n = inputs.shape[0]
        shard = {"inputs": inputs, "outputs": outputs}
        for key in _META_KEYS:
            shard[key] = activations_dict.get(key, torch.full((n,), -1, dtype=torch.int64))
        dtype = (
            next(k for k, v in DTYPES.items() if v == inputs.dtype) if inputs.dtype in DTYPES.values() else "float32"
        )
        return cls(
            [shard],
            [n],
            layers=layers,
            d_model=inputs.shape[2],
            stats=stats,
            batch_size=batch_size,
            normalize=normalize,
            model_name=activations_dict.get("model_name"),
            dtype=dtype,
            output_site=activations_dict.get("output_site", "mlp_out"),
        )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        batch_size: int = 64,
        normalize: bool = True,
        shuffle_shards: int = 4,
        follow: bool | Any = False,
        timeout: float = 600.0,
        manifest: str = MANIFEST,
    ) -> ActivationStore:
        """Open a store folder written by `StoreWriter` (complete or not).

        `follow` (True, or the producer: a thread or process with ``is_alive()``) opens a store that
        is still being written: it waits for the first shard, and `batches`/`tensors` then wait for
        the rest, raising StoreError when the producer has died or no shard came for `timeout` s.
        `manifest` names another manifest file, e.g. one writer's part (``manifest.part0of2.json``).
        """
        path = Path(path)
        if follow is not False:
            _wait(
                lambda: (path / manifest).is_file() and bool(read_manifest(path, manifest)["shards"]),
                _producer(follow),
                timeout,
                f"no shard of {path} was written",
            )
        data = read_manifest(path, manifest)
        stats = RunningStats(len(data["layers"]), data["d_model"])
        stats.sums = _load_safetensors(path / data.get("stats_file", STATS_FILE))
        if not data["complete"] and follow is False:
            logger.warning(
                "store %s is incomplete (%d tokens); resume the extraction to finish it", path, data["n_tokens"]
            )
        store = cls(
            [path / s["file"] for s in data["shards"]],
            [s["n_tokens"] for s in data["shards"]],
            layers=data["layers"],
            d_model=data["d_model"],
            stats=stats,
            batch_size=batch_size,
            normalize=normalize,
            model_name=data.get("model_name"),
            dtype=data["dtype"],
            path=path,
            shuffle_shards=shuffle_shards,
            extra=data.get("extra", {}),
            output_site=data["output_site"],
            compression=data["compression"],
        )
        if follow is not False:
            store._written_order = True
            if not data["complete"]:
                store._follow = _Follow(manifest, _producer(follow), timeout)
        return store

    # properties ----------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Number of tokens (rows) in the store."""
        return sum(self.shard_sizes)

    @property
    def num_layers(self) -> int:
        """Number of layers recorded."""
        return len(self.layers)

    def __len__(self) -> int:
        return self.n_tokens

    def norm_stats(self) -> NormStats:
        """Standardisation statistics (identity when the store was opened with normalize=False)."""
        if not self.normalize:
            return NormStats.identity(self.num_layers, self.d_model)
        return self.stats.norm_stats()

    @property
    def following(self) -> bool:
        """Whether the store is still being written (opened with `follow`, and its manifest not complete)."""
        return not self._refresh()

    def nbytes(self) -> int:
        """Bytes used by the activations and statistics on disk (or by the activations in memory)."""
        if self.path is not None:
            stats = self.path / STATS_FILE
            return sum(p.stat().st_size for p in self.shards) + (stats.stat().st_size if stats.is_file() else 0)  # type: ignore[union-attr]
        return sum(t.numel() * t.element_size() for s in self.shards for t in s.values())  # type: ignore[union-attr]

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "memory"
        fmt = self.dtype + ("+zstd" if self.compression == "zstd" else "")
        site = ", output_site=mlp_in" if self.output_site == "mlp_in" else ""
        return (
            f"ActivationStore({self.n_tokens} tokens, layers={_span(self.layers)}, d_model={self.d_model}, "
            f"dtype={fmt}{site}, shards={len(self.shards)}, at {where})"
        )

    # following a store that is being written -----------------------------------------------

    def _refresh(self) -> bool:
        """Add the shards written since the last look; True once the store is complete."""
        follow = self._follow
        if follow is None:
            return True
        data = read_manifest(self.path, follow.manifest)  # type: ignore[arg-type]
        for entry in data["shards"][len(self.shards) :]:
            self.shards.append(self.path / entry["file"])  # type: ignore[operator]
            self.shard_sizes.append(entry["n_tokens"])
        if data["complete"]:
            self._follow = None
        return self._follow is None

    def _wait_until(self, enough: Callable[[], bool]) -> None:
        """Wait until `enough()` holds or the store is complete."""
        follow = self._follow
        if follow is not None and not enough():
            _wait(
                lambda: self._refresh() or enough(),
                follow.producer,
                follow.timeout,
                f"{self.path} got no new shard",
                progress=lambda: len(self.shards),
            )

    def wait_complete(self) -> ActivationStore:
        """Wait until a followed store is complete (returns self)."""
        self._wait_until(lambda: False)
        return self

    # reading -------------------------------------------------------------------------------

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        """The stored tensors of one shard (int8 codes and scales as stored; the last one read is cached)."""
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        source = self.shards[index]
        data = (
            load_shard(source, StoreError, missing=_MISSING, corrupt=_CORRUPT) if isinstance(source, Path) else source
        )
        expected = (self.shard_sizes[index], self.num_layers, self.d_model)
        for key in self._stored_keys:
            if key not in data or data[key].shape != expected:
                got = tuple(data[key].shape) if key in data else "nothing"
                raise StoreError(f"shard {index} has {key} of shape {got}, expected {expected}: the store is corrupt")
        self._cache = (index, data)
        return data

    @property
    def _stored_keys(self) -> tuple[str, ...]:
        return ("inputs",) if self.output_site == "mlp_in" else ("inputs", "outputs")

    def _values(self, data: dict[str, torch.Tensor], key: str, rows: Any = None) -> torch.Tensor:
        """Rows of a loaded shard's inputs or outputs as floats (the outputs of an mlp_in store are its inputs)."""
        return decode(data, "inputs" if self.output_site == "mlp_in" else key, rows)

    def metadata(self, index: int) -> dict[str, torch.Tensor]:
        """Per-row token_ids, positions and window_ids of one shard (activations not decoded)."""
        return {k: v for k, v in self._load(index).items() if k in _META_KEYS}

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of one shard: float inputs/outputs [n, L, d] (int8 decoded to float32) and metadata."""
        data = self._load(index)
        out = self.metadata(index)
        out["inputs"] = self._values(data, "inputs")
        out["outputs"] = out["inputs"] if self.output_site == "mlp_in" else self._values(data, "outputs")
        return out

    def tensors(self, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All (or the first `max_tokens`) inputs and outputs as float32 [n, L, d], in store order."""
        self._wait_until(lambda: max_tokens is not None and self.n_tokens >= max_tokens)
        n = self.n_tokens if max_tokens is None else max(0, min(max_tokens, self.n_tokens))
        out = [torch.empty((n, self.num_layers, self.d_model)) for _ in range(2)]
        total = 0
        for i in range(len(self.shards)):
            if total >= n:
                break
            data = self._load(i)
            take = min(self.shard_sizes[i], n - total)
            for tensor, key in zip(out, ("inputs", "outputs")):
                tensor[total : total + take] = self._values(data, key, slice(0, take))  # converts while copying
            total += take
        return out[0], out[1]

    def _window_plan(self, epoch: int, seed: int) -> Iterator[list[int]]:
        """Groups of shards read together: in written order (waiting for them) in epoch 0 of a followed store."""
        w = self.shuffle_shards
        if epoch == 0 and self._written_order:
            first = 0
            while True:
                self._wait_until(lambda needed=first + w: len(self.shards) >= needed)
                if first >= len(self.shards):
                    return
                yield list(range(first, min(first + w, len(self.shards))))
                first += w
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.shards), generator=g).tolist()
        yield from (order[i : i + w] for i in range(0, len(order), w))

    def _window_rows(self, epoch: int, window: int, shard_ids: list[int], seed: int) -> torch.Tensor:
        n = sum(self.shard_sizes[s] for s in shard_ids)
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_007 + window)
        return torch.randperm(n, generator=g)

    def _gather(
        self,
        pieces: list[tuple[list[int], torch.Tensor]],
        lo: int,
        hi: int,
        dtype: torch.dtype,
        opened: dict[int, dict[str, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows lo..hi of the batch made of `pieces` (a window's shards, row indices into their concatenation)."""
        keys = self._stored_keys
        out = [torch.empty((hi - lo, self.num_layers, self.d_model), dtype=dtype) for _ in keys]
        position = filled = 0
        for shard_ids, idx in pieces:
            position, idx = position + len(idx), idx[max(lo - position, 0) : max(hi - position, 0)]
            for shard_id in shard_ids:
                if shard_id not in opened:
                    opened[shard_id] = self._load(shard_id)
            block = slice(filled, filled + len(idx))
            filled += len(idx)
            if len(shard_ids) == 1:  # the rows land in one block: gather, then convert into place
                for tensor, key in zip(out, keys):
                    tensor[block] = self._values(opened[shard_ids[0]], key, idx)
                continue
            starts = [0]
            for s in shard_ids[:-1]:
                starts.append(starts[-1] + self.shard_sizes[s])
            which = torch.searchsorted(torch.tensor(starts), idx, right=True) - 1
            places = []  # per shard: positions in the batch, rows in the shard
            for j, start in enumerate(starts):
                where = (which == j).nonzero().squeeze(1)
                places.append((where, idx[where] - start))
            for tensor, key in zip(out, keys):
                parts = [self._values(opened[shard_id], key, rows) for shard_id, (_, rows) in zip(shard_ids, places)]
                stage = torch.empty((len(idx), *tensor.shape[1:]), dtype=parts[0].dtype)
                for (where, _), part in zip(places, parts):  # gather in the stored (or decoded) dtype
                    stage[where] = part
                tensor[block] = stage  # converts
        return out[0], out[-1] if len(out) > 1 else out[0].clone()

    def batches(
        self,
        batch_size: int | None = None,
        *,
        seed: int = 0,
        start: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[ActivationBatch]:
        """Endless shuffled batches; batch i depends only on (seed, i). `start` skips batches unread.

        On a followed store, epoch 0 waits for the shards as they are written (see the module docstring).

        With ``world_size > 1`` each rank gets a disjoint slice of every global batch. Rows are
        gathered straight from the shards (memory-mapped files) into the batch, converted on the
        way when the batch is built on the CPU, and in the store's dtype (half the bytes to move)
        when it goes to an accelerator (from pinned memory, without blocking, on CUDA).
        """
        batch_size = batch_size or self.batch_size
        if batch_size % world_size:
            raise StoreError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        position = start * batch_size
        epoch, offset = (0, position) if self.following else divmod(position, self.n_tokens)
        lo = rank * (batch_size // world_size)
        hi = lo + batch_size // world_size
        gather_dtype = dtype if torch.device(device).type == "cpu" else DTYPES.get(self.dtype, dtype)
        pinned = torch.device(device).type == "cuda"
        pending: list[tuple[list[int], torch.Tensor]] = []
        pending_rows = 0
        opened: dict[int, dict[str, torch.Tensor]] = {}  # the shards of the current (and previous) window
        while True:
            for window, shard_ids in enumerate(self._window_plan(epoch, seed)):
                size = sum(self.shard_sizes[s] for s in shard_ids)
                if offset >= size:
                    offset -= size
                    continue
                perm = self._window_rows(epoch, window, shard_ids, seed)[offset:]
                offset = 0
                opened = {s: v for s, v in opened.items() if any(s in p for p, _ in pending)}
                begin = 0
                while begin < len(perm):
                    idx = perm[begin : begin + batch_size - pending_rows]
                    begin += len(idx)
                    pending.append((shard_ids, idx))
                    pending_rows += len(idx)
                    if pending_rows == batch_size:
                        inputs, outputs = self._gather(pending, lo, hi, gather_dtype, opened)
                        pending, pending_rows = [], 0
                        if pinned:  # page-locked: the copy to the GPU does not block
                            inputs, outputs = inputs.pin_memory(), outputs.pin_memory()
                        yield ActivationBatch(
                            inputs.to(device=device, dtype=dtype, non_blocking=True),
                            outputs.to(device=device, dtype=dtype, non_blocking=True),
                        )
            epoch += 1

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.batches()

    def save(
        self, path: str | Path, *, dtype: str | None = None, compression: str | None = None, shard_tokens: int = 4096
    ) -> ActivationStore:
        """Write this store to a folder (e.g. an in-memory store, or in another format) and return the disk store."""
        writer = StoreWriter(
            path,
            layers=self.layers,
            d_model=self.d_model,
            model_name=self.model_name,
            dtype=dtype or self.dtype,
            shard_tokens=shard_tokens,
            output_site=self.output_site,
            compression=compression or self.compression,
        )
        for i in range(len(self.shards)):
            data = self.shard(i)
            for lo in range(0, self.shard_sizes[i], shard_tokens):
                rows = {k: v[lo : lo + shard_tokens] for k, v in data.items()}
                outputs = rows.pop("outputs")
                writer.add(rows.pop("inputs"), None if self.output_site == "mlp_in" else outputs, **rows)
                writer.flush_if_full({"rows_done": lo + len(rows["token_ids"])})
        return writer.finish(batch_size=self.batch_size, normalize=self.normalize)


def _stack(activations: dict[str, Any], key: str) -> torch.Tensor:
    if key not in activations:
        raise StoreError(f"the activations dict has no '{key}' entry; expected keys 'inputs', 'outputs', 'layers'")
    value = activations[key]
    if isinstance(value, dict):
        if not value:
            raise StoreError(f"'{key}' is empty: no layers were extracted")
        value = torch.stack([value[k] for k in sorted(value)], dim=1)
    if not isinstance(value, torch.Tensor):
        raise StoreError(f"'{key}' must be a tensor [tokens, layers, d_model] or a dict layer -> [tokens, d_model]")
    if value.shape[0] == 0:
        raise StoreError("the activations contain no tokens: is the corpus empty?")
    return value


def _check_finite(stats: RunningStats, layers: list[int], *pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Raise if `stats` (of the last pair) are not finite, naming the first pair and layer with a NaN/inf."""
    if stats.finite():
        return
    for inputs, outputs in pairs:
        for name, values in (("input", inputs), ("output", outputs)):
            bad = ~torch.isfinite(values)
            if bad.any():
                layer = layers[int(bad.any(-1).any(0).nonzero()[0])]
                where = f"NaN/inf in MLP {name} activations of layer {layer}"
                if values.dtype == torch.float16:
                    raise StoreError(
                        f"{where}: the model overflowed, or the values exceed float16's range (65504); "
                        "store them as bfloat16 or float32 (store_dtype=...)"
                    )
                raise StoreError(
                    f"{where}: the model overflowed; extract in float32 (dtype=torch.float32) "
                    "or check the model weights"
                )
    raise StoreError("the squares of the activations overflow float32 (|a| > 1e19): check the model weights")


def _span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[0] + len(layers))) and len(layers) > 3:
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def read_manifest(path: Path, name: str = MANIFEST) -> dict[str, Any]:
    """The manifest `name` of a store folder, checked (a version 1 one gets version 2's format defaults)."""
    file = path / name
    if not file.is_file():
        if name == MANIFEST and _part_manifests(path):
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


def _part_manifests(path: Path) -> list[Path]:
    return sorted(path.glob("manifest.part*of*.json"))


def part_names(rank: int, count: int) -> tuple[str, str, str]:
    """(manifest, statistics file, shard prefix) of writer `rank` of `count` writing one store."""
    return f"manifest.part{rank}of{count}.json", f"stats.part{rank}of{count}.safetensors", f"shard_p{rank}_"


@dataclasses.dataclass
class _Follow:
    """How a followed store looks for new shards."""

    manifest: str
    producer: Any
    timeout: float


def _producer(follow: Any) -> Any:
    if follow is True:
        return None
    if not callable(getattr(follow, "is_alive", None)):
        raise StoreError(f"follow must be True or the producer (a thread or process with is_alive()), got {follow!r}")
    return follow


def _wait(
    ready: Callable[[], bool], producer: Any, timeout: float, what: str, progress: Callable[[], int] | None = None
) -> None:
    """Poll until `ready()`; StoreError when the producer died or `progress()` stood still for `timeout` s."""
    deadline, last = time.monotonic() + timeout, progress() if progress else None
    while not ready():
        if producer is not None and not producer.is_alive() and not ready():
            error = getattr(producer, "error", None)
            cause = f"it failed with {error!r}" if error is not None else "see its log"
            raise StoreError(
                f"the extraction writing the store stopped before finishing it ({cause}); fix the cause "
                "and resume the extraction: the shards written so far are kept"
            )
        if progress is not None and progress() != last:
            deadline, last = time.monotonic() + timeout, progress()
        if time.monotonic() > deadline:
            raise StoreError(
                f"{what} within {timeout:g} s: is the extraction still running? Resume it, or open "
                "the store with a longer timeout"
            )
        time.sleep(_POLL_S)


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
        if dtype not in STORE_DTYPES:
            raise StoreError(f"unknown store dtype '{dtype}'; use one of {list(STORE_DTYPES)}")
        if compression not in COMPRESSIONS:
            raise StoreError(f"unknown compression '{compression}'; use one of {list(COMPRESSIONS)}")
        if output_site not in OUTPUT_SITES:
            raise StoreError(f"unknown output_site '{output_site}'; use one of {list(OUTPUT_SITES)}")
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
        elif _part_manifests(self.path) and not (self.path / MANIFEST).exists():
            raise StoreError(
                f"{self.path} is being written by several writers; resume them with the same "
                "writer_rank/num_writers, or run merge_store(path) once they have finished"
            )
        if (self.path / self._manifest_name).exists():
            old = read_manifest(self.path, self._manifest_name)
            if not resume:
                raise StoreError(f"{self.path} already holds a store; choose another folder or resume it")
            for key in ("model_name", "layers", "d_model", "dtype", "compression", "output_site"):
                if old[key] != self.manifest[key]:
                    raise StoreError(
                        f"cannot resume {self.path}: its {key} is {old[key]!r}, this run's is "
                        f"{self.manifest[key]!r}; use the same settings or a new folder"
                    )
            self.manifest = {**old, "version": STORE_VERSION}
            self.stats.sums = _load_safetensors(self.path / stats_name)
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
        _check_finite(stats, self.manifest["layers"], (inputs, targets), (seen[0], seen[-1]))
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
        atomic_write_text(json.dumps(self.manifest, indent=1), self.path / self._manifest_name)

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
        if self.part and _parts_complete(self.path, self.part[1]):
            return merge_store(self.path, batch_size=batch_size, normalize=normalize)
        return ActivationStore.open(self.path, batch_size=batch_size, normalize=normalize, manifest=self._manifest_name)


def _parts_complete(path: Path, count: int) -> bool:
    names = [part_names(rank, count)[0] for rank in range(count)]
    return all((path / name).is_file() and read_manifest(path, name)["complete"] for name in names)


def merge_store(path: str | Path, *, batch_size: int = 64, normalize: bool = True) -> ActivationStore:
    """Join the parts written by several writers into one store (shards by rank, statistics summed)."""
    path = Path(path)
    files = _part_manifests(path)
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
    for key in ("model_name", "layers", "d_model", "dtype", "compression", "output_site", "extra"):
        for other in parts[1:]:
            if other[key] != first[key]:
                raise StoreError(
                    f"cannot merge {path}: writer {other['part'][0]} has {key} {other[key]!r} but "
                    f"writer 0 has {first[key]!r}; re-extract that part with the same settings"
                )
    stats = RunningStats(len(first["layers"]), first["d_model"])
    for part in parts:
        other = RunningStats(len(first["layers"]), first["d_model"])
        other.sums = _load_safetensors(path / part["stats_file"])
        stats.add(other)
    atomic_save_tensors(stats.sums, path / STATS_FILE)
    manifest = {
        key: first[key] for key in ("model_name", "layers", "d_model", "dtype", "compression", "output_site", "extra")
    }
    manifest.update(
        version=STORE_VERSION,
        n_tokens=sum(m["n_tokens"] for m in parts),
        shards=[s for m in parts for s in m["shards"]],
        complete=True,
        state={"writers": count, "parts": [m["state"] for m in parts]},
    )
    atomic_write_text(json.dumps(manifest, indent=1), path / MANIFEST)
    return ActivationStore.open(path, batch_size=batch_size, normalize=normalize)


def tokens_to_gib(n_tokens: int, num_layers: int, d_model: int, dtype: str = "float16") -> float:
    """Disk size of an uncompressed store of n_tokens, in GiB (activations and int8 scales)."""
    per_row = d_model + 4 if dtype == "int8" else d_model * DTYPES[dtype].itemsize
    return n_tokens * num_layers * per_row * 2 / 2**30


__all__ = [
    "ActivationBatch",
    "ActivationStore",
    "NormStats",
    "RunningStats",
    "StoreError",
    "StoreWriter",
    "merge_store",
    "writable_folder",
]
