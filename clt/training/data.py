"""ActivationStore: MLP inputs/outputs per layer, in memory or sharded on disk, with statistics.

On disk a store is a folder::

    manifest.json          version, model, layers, d_model, dtype, token count, shard list, state
    stats.safetensors      running sums for the normalisation statistics (float64)
    shard_00000.safetensors  inputs [n, L, d], outputs [n, L, d], token_ids [n], positions [n],
                             window_ids [n]

Every file is written to a temporary name and renamed, and the manifest is rewritten after each
shard, so an interrupted extraction leaves a valid store that resumes where it stopped. Shards
are written straight from the buffered batches (no concatenated copy) and read memory-mapped.

Batches are a deterministic function of ``(seed, batch index)``: each epoch permutes the shard
order, concatenates groups of ``shuffle_shards`` shards into a shuffle buffer and permutes its
rows. Resuming at batch ``start`` therefore needs no data from the skipped batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from clt.files import atomic_save_tensors, atomic_write_text, read_tensors

logger = logging.getLogger(__name__)

STORE_VERSION = 1
MANIFEST = "manifest.json"
STATS_FILE = "stats.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_META_KEYS = ("token_ids", "positions", "window_ids")
_MANIFEST_KEYS = ("layers", "d_model", "dtype", "n_tokens", "shards", "complete", "state")
_STATS_ROWS = 32
"""Rows per float32 block in `RunningStats.update` (32 x 30 layers x 576 x 4 bytes = 2.2 MB)."""
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32"}


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


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path, StoreError, missing="the store is incomplete; re-run the extraction to resume it",
                        corrupt="delete it and its entry will be re-extracted when you resume the extraction")


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
    ) -> None:
        if not shards or sum(shard_sizes) == 0:
            raise StoreError("the activation store is empty: extract some tokens first")
        self.shards, self.shard_sizes = shards, shard_sizes
        self.layers, self.d_model = list(layers), d_model
        self.stats, self.batch_size, self.normalize = stats, batch_size, normalize
        self.model_name, self.dtype, self.path = model_name, dtype, path
        self.shuffle_shards = max(1, shuffle_shards)
        self.extra = extra or {}
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None

    # construction ------------------------------------------------------------------------

    @classmethod
    def from_nnsight_activations(
        cls, activations_dict: dict[str, Any], batch_size: int = 64, normalize: bool = True
    ) -> ActivationStore:
        """An in-memory store from `ActivationExtractor.extract_from_dataset`'s dict."""
        inputs, outputs = _stack(activations_dict, "inputs"), _stack(activations_dict, "outputs")
        if inputs.shape != outputs.shape or inputs.ndim != 3:
            raise StoreError(
                f"inputs {tuple(inputs.shape)} and outputs {tuple(outputs.shape)} must both be [tokens, layers, d_model]"
            )
        default_layers = sorted(activations_dict["inputs"]) if isinstance(activations_dict["inputs"], dict) else range(inputs.shape[1])
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
        dtype = next(k for k, v in DTYPES.items() if v == inputs.dtype) if inputs.dtype in DTYPES.values() else "float32"
        return cls([shard], [n], layers=layers, d_model=inputs.shape[2], stats=stats, batch_size=batch_size,
                   normalize=normalize, model_name=activations_dict.get("model_name"), dtype=dtype)

    @classmethod
    def open(cls, path: str | Path, *, batch_size: int = 64, normalize: bool = True, shuffle_shards: int = 4) -> ActivationStore:
        """Open a store folder written by `StoreWriter` (complete or not)."""
        manifest = read_manifest(Path(path))
        path = Path(path)
        stats = RunningStats(len(manifest["layers"]), manifest["d_model"])
        stats.sums = _load_safetensors(path / STATS_FILE)
        shards = [path / s["file"] for s in manifest["shards"]]
        if not manifest["complete"]:
            logger.warning("store %s is incomplete (%d tokens); resume the extraction to finish it", path, manifest["n_tokens"])
        return cls(shards, [s["n_tokens"] for s in manifest["shards"]], layers=manifest["layers"],
                   d_model=manifest["d_model"], stats=stats, batch_size=batch_size, normalize=normalize,
                   model_name=manifest.get("model_name"), dtype=manifest["dtype"], path=path,
                   shuffle_shards=shuffle_shards, extra=manifest.get("extra", {}))

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

    def nbytes(self) -> int:
        """Bytes used by the activations on disk (or in memory)."""
        if self.path is not None:
            return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))
        return sum(t.numel() * t.element_size() for s in self.shards for t in s.values())  # type: ignore[union-attr]

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "memory"
        return (f"ActivationStore({self.n_tokens} tokens, layers={_span(self.layers)}, d_model={self.d_model}, "
                f"dtype={self.dtype}, shards={len(self.shards)}, at {where})")

    # reading -------------------------------------------------------------------------------

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of one shard (the last one read is cached)."""
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        source = self.shards[index]
        data = _load_safetensors(source) if isinstance(source, Path) else source
        if data["inputs"].shape != (self.shard_sizes[index], self.num_layers, self.d_model):
            raise StoreError(f"shard {index} has shape {tuple(data['inputs'].shape)}, expected "
                             f"{(self.shard_sizes[index], self.num_layers, self.d_model)}: the store is corrupt")
        self._cache = (index, data)
        return data

    def tensors(self, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All (or the first `max_tokens`) inputs and outputs as float32 [n, L, d], in store order."""
        n = self.n_tokens if max_tokens is None else max(0, min(max_tokens, self.n_tokens))
        out = [torch.empty((n, self.num_layers, self.d_model)) for _ in range(2)]
        total = 0
        for i in range(len(self.shards)):
            if total >= n:
                break
            data = self.shard(i)
            take = min(self.shard_sizes[i], n - total)
            for tensor, key in zip(out, ("inputs", "outputs")):
                tensor[total : total + take] = data[key][:take]  # converts while copying
            total += take
        return out[0], out[1]

    def _window_plan(self, epoch: int, seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.shards), generator=g).tolist()
        w = self.shuffle_shards
        return [order[i : i + w] for i in range(0, len(order), w)]

    def _window_rows(self, epoch: int, window: int, shard_ids: list[int], seed: int) -> torch.Tensor:
        n = sum(self.shard_sizes[s] for s in shard_ids)
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_007 + window)
        return torch.randperm(n, generator=g)

    def _gather(self, pieces: list[tuple[list[int], torch.Tensor]], lo: int, hi: int, dtype: torch.dtype,
                opened: dict[int, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows lo..hi of the batch made of `pieces` (a window's shards, row indices into their concatenation)."""
        out = [torch.empty((hi - lo, self.num_layers, self.d_model), dtype=dtype) for _ in range(2)]
        position = filled = 0
        for shard_ids, idx in pieces:
            position, idx = position + len(idx), idx[max(lo - position, 0) : max(hi - position, 0)]
            for shard_id in shard_ids:
                if shard_id not in opened:
                    opened[shard_id] = self.shard(shard_id)
            block = slice(filled, filled + len(idx))
            filled += len(idx)
            if len(shard_ids) == 1:  # the rows land in one block: gather, then convert into place
                for tensor, key in zip(out, ("inputs", "outputs")):
                    tensor[block] = opened[shard_ids[0]][key][idx]
                continue
            starts = [0]
            for s in shard_ids[:-1]:
                starts.append(starts[-1] + self.shard_sizes[s])
            which = torch.searchsorted(torch.tensor(starts), idx, right=True) - 1
            places = []  # per shard: positions in the batch, rows in the shard
            for j, start in enumerate(starts):
                where = (which == j).nonzero().squeeze(1)
                places.append((where, idx[where] - start))
            for tensor, key in zip(out, ("inputs", "outputs")):
                stage = torch.empty((len(idx), *tensor.shape[1:]), dtype=opened[shard_ids[0]][key].dtype)
                for shard_id, (where, rows) in zip(shard_ids, places):  # gather in the stored dtype
                    stage[where] = opened[shard_id][key][rows]
                tensor[block] = stage  # converts
        return out[0], out[1]

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

        With ``world_size > 1`` each rank gets a disjoint slice of every global batch. Rows are
        gathered straight from the shards (memory-mapped files) into the batch, converted on the
        way when the batch is built on the CPU, and in the store's dtype (half the bytes to move)
        when it goes to an accelerator.
        """
        batch_size = batch_size or self.batch_size
        if batch_size % world_size:
            raise StoreError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        position = start * batch_size
        epoch, offset = divmod(position, self.n_tokens)
        lo = rank * (batch_size // world_size)
        hi = lo + batch_size // world_size
        gather_dtype = dtype if torch.device(device).type == "cpu" else DTYPES.get(self.dtype, dtype)
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
                        yield ActivationBatch(inputs.to(device=device, dtype=dtype, non_blocking=True),
                                              outputs.to(device=device, dtype=dtype, non_blocking=True))
            epoch += 1

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.batches()

    def save(self, path: str | Path, *, dtype: str | None = None, shard_tokens: int = 4096) -> ActivationStore:
        """Write this store to a folder (e.g. an in-memory store) and return the disk store."""
        writer = StoreWriter(path, layers=self.layers, d_model=self.d_model, model_name=self.model_name,
                             dtype=dtype or self.dtype, shard_tokens=shard_tokens)
        for i in range(len(self.shards)):
            data = self.shard(i)
            for lo in range(0, self.shard_sizes[i], shard_tokens):
                rows = {k: v[lo : lo + shard_tokens] for k, v in data.items()}
                writer.add(rows.pop("inputs"), rows.pop("outputs"), **rows)
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
                    raise StoreError(f"{where}: the model overflowed, or the values exceed float16's range (65504); "
                                     "store them as bfloat16 or float32 (store_dtype=...)")
                raise StoreError(f"{where}: the model overflowed; extract in float32 (dtype=torch.float32) "
                                 "or check the model weights")
    raise StoreError("the squares of the activations overflow float32 (|a| > 1e19): check the model weights")


def _span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[0] + len(layers))) and len(layers) > 3:
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a store folder, checked."""
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(f"{path} is not an activation store (no {MANIFEST}); create one with `clt extract`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{file} is corrupt ({err}); restore it or re-extract into a new folder") from err
    if not isinstance(manifest, dict) or manifest.get("version") != STORE_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise StoreError(f"{file} has version {version}, this clt reads version {STORE_VERSION}")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise StoreError(f"{file} is corrupt (no {', '.join(missing)}); restore it or re-extract into a new folder")
    return manifest


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
    """Writes activations into a store folder shard by shard, atomically; resumes an existing one."""

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
    ) -> None:
        if dtype not in DTYPES:
            raise StoreError(f"unknown store dtype '{dtype}'; use one of {sorted(DTYPES)}")
        self.path = writable_folder(path)
        self.shard_tokens = shard_tokens
        self.stats = RunningStats(len(layers), d_model)
        self.manifest: dict[str, Any] = {
            "version": STORE_VERSION, "model_name": model_name, "layers": list(layers), "d_model": d_model,
            "dtype": dtype, "n_tokens": 0, "shards": [], "complete": False, "state": {}, "extra": extra or {},
        }
        if (self.path / MANIFEST).exists():
            old = read_manifest(self.path)
            if not resume:
                raise StoreError(f"{self.path} already holds a store; choose another folder or resume it")
            for key in ("model_name", "layers", "d_model", "dtype"):
                if old[key] != self.manifest[key]:
                    raise StoreError(f"cannot resume {self.path}: its {key} is {old[key]!r}, this run's is "
                                     f"{self.manifest[key]!r}; use the same settings or a new folder")
            self.manifest = old
            self.stats.sums = _load_safetensors(self.path / STATS_FILE)
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

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor, *, token_ids: torch.Tensor,
            positions: torch.Tensor, window_ids: torch.Tensor) -> None:
        """Buffer rows [n, L, d]; `flush` writes them (the producer flushes every ~shard_tokens)."""
        expected = (len(self.manifest["layers"]), self.manifest["d_model"])
        if inputs.ndim != 3 or tuple(inputs.shape[1:]) != expected or inputs.shape != outputs.shape:
            raise StoreError(f"activations must be [n, {expected[0]}, {expected[1]}]; got inputs "
                             f"{tuple(inputs.shape)} and outputs {tuple(outputs.shape)}")
        dtype = DTYPES[self.manifest["dtype"]]
        stored = inputs.to(dtype), outputs.to(dtype)
        stats = RunningStats(*expected)
        stats.update(*stored)
        _check_finite(stats, self.manifest["layers"], (inputs, outputs), stored)
        self._buffer.append({"inputs": stored[0], "outputs": stored[1], "token_ids": token_ids.long(),
                             "positions": positions.int(), "window_ids": window_ids.long()})
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
        name = f"shard_{len(self.manifest['shards']):05d}.safetensors"
        _save_concatenated({k: [b[k] for b in self._buffer] for k in self._buffer[0]}, self.path / name)
        self.stats.add(self._buffer_stats)
        atomic_save_tensors(self.stats.sums, self.path / STATS_FILE)
        self.manifest["shards"].append({"file": name, "n_tokens": self._buffered})
        self.manifest["n_tokens"] += self._buffered
        self._buffer, self._buffered = [], 0
        self._buffer_stats = RunningStats(len(self.manifest["layers"]), self.manifest["d_model"])
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(json.dumps(self.manifest, indent=1), self.path / MANIFEST)

    def finish(self, *, batch_size: int = 64, normalize: bool = True, state: dict[str, Any] | None = None) -> ActivationStore:
        """Write what is buffered, mark the store complete and open it."""
        self.flush(state or self.manifest["state"])
        self.manifest["complete"] = True
        self._write_manifest()
        return ActivationStore.open(self.path, batch_size=batch_size, normalize=normalize)


def _save_concatenated(parts: dict[str, list[torch.Tensor]], path: Path) -> None:
    """Save ``{name: torch.cat(parts[name])}`` as safetensors, atomically, without building the concatenation."""
    if sys.byteorder != "little":
        atomic_save_tensors({k: torch.cat(v) for k, v in parts.items()}, path)
        return
    parts = dict(sorted(parts.items(), key=lambda item: -item[1][0].element_size()))  # aligned offsets
    header: dict[str, Any] = {}
    offset = 0
    for key, tensors in parts.items():
        shape = [sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]]
        size = sum(t.numel() for t in tensors) * tensors[0].element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[tensors[0].dtype], "shape": shape,
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for tensors in parts.values():
            for tensor in tensors:
                file.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    tmp.replace(path)


def tokens_to_gib(n_tokens: int, num_layers: int, d_model: int, dtype: str = "float16") -> float:
    """Disk size of a store of n_tokens, in GiB (activations only)."""
    return n_tokens * num_layers * d_model * 2 * DTYPES[dtype].itemsize / 2**30


__all__ = ["ActivationBatch", "ActivationStore", "NormStats", "RunningStats", "StoreError", "StoreWriter",
           "writable_folder"]
