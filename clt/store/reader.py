"""ActivationStore: MLP inputs/outputs per layer, in memory or in a store folder, as shuffled batches.

On disk a store is a folder (written by `clt.store.writer.StoreWriter`)::

    manifest.json          version, model, layers, d_model, dtype, compression, output_site,
                           token count, shard list, state          (`clt.store.manifest`)
    stats.safetensors      running sums for the normalisation statistics (float64; `clt.store.stats`)
    shard_00000.safetensors  inputs [n, L, d], outputs [n, L, d], token_ids [n], positions [n],
                             window_ids [n]   (format: `clt.store.format`)

Formats: float16/bfloat16/float32 or int8 codes with per-token-and-layer scales; shards plain
(memory-mapped when read) or zstd-compressed (``.safetensors.zst``); with ``output_site='mlp_in'``
the targets are the MLP inputs and no ``outputs`` are written (a transcoder trained on it is an
SAE). Readers always get float tensors, and the statistics are those of the values they get.
Version 1 stores (float, plain, mlp_out) are still read.

Batches are a deterministic function of ``(seed, batch index)``: each epoch permutes the shard
order, concatenates groups of ``shuffle_shards`` shards into a shuffle buffer and permutes its
rows. Resuming at batch ``start`` therefore needs no data from the skipped batches.

A store still being written can be *followed* (``ActivationStore.open(path, follow=...)``):
training starts after the first shard; epoch 0 then takes the shards in the order they are
written (groups of ``shuffle_shards``, rows permuted in each group), waiting for each group, and
later epochs shuffle as above. The normalisation statistics are those of the shards present when
the store was opened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from clt.config.constants import check_output_site, layer_span
from clt.store.follow import Follow, producer_of, wait_for
from clt.store.format import FLOAT_DTYPES, META_KEYS, StoreError, decode, load_shard, load_tensors
from clt.store.manifest import MANIFEST, STATS_FILE, read_manifest
from clt.store.stats import NormStats, RunningStats, check_stats_finite

logger = logging.getLogger(__name__)


class ActivationBatch(NamedTuple):
    """One training batch of raw (unnormalised) activations."""

    inputs: torch.Tensor
    """MLP inputs x, [batch, layers, d_model]."""
    outputs: torch.Tensor
    """MLP outputs y, [batch, layers, d_model]."""


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
        check_output_site(output_site, StoreError)
        self.shards, self.shard_sizes = shards, shard_sizes
        self.layers, self.d_model = list(layers), d_model
        self.stats, self.batch_size, self.normalize = stats, batch_size, normalize
        self.model_name, self.dtype, self.path = model_name, dtype, path
        self.output_site, self.compression = output_site, compression
        self.shuffle_shards = max(1, shuffle_shards)
        self.extra = extra or {}
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._follow: Follow | None = None
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
        check_stats_finite(stats, layers, (inputs, outputs))
        n = inputs.shape[0]
        shard = {"inputs": inputs, "outputs": outputs}
        for key in META_KEYS:
            shard[key] = activations_dict.get(key, torch.full((n,), -1, dtype=torch.int64))
        dtype = (
            next(k for k, v in FLOAT_DTYPES.items() if v == inputs.dtype)
            if inputs.dtype in FLOAT_DTYPES.values()
            else "float32"
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
            wait_for(
                lambda: (path / manifest).is_file() and bool(read_manifest(path, manifest)["shards"]),
                producer_of(follow),
                timeout,
                f"no shard of {path} was written",
            )
        data = read_manifest(path, manifest)
        stats = RunningStats(len(data["layers"]), data["d_model"])
        stats.sums = load_tensors(path / data.get("stats_file", STATS_FILE))
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
                store._follow = Follow(manifest, producer_of(follow), timeout)
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
            f"ActivationStore({self.n_tokens} tokens, layers={layer_span(self.layers)}, d_model={self.d_model}, "
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
            wait_for(
                lambda: self._refresh() or enough(),
                follow.producer,
                follow.timeout,
                f"{self.path} got no new shard",
                progress=lambda: len(self.shards),
            )

    # reading -------------------------------------------------------------------------------

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        """The stored tensors of one shard (int8 codes and scales as stored; the last one read is cached)."""
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        source = self.shards[index]
        data = load_shard(source) if isinstance(source, Path) else source
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
        return {k: v for k, v in self._load(index).items() if k in META_KEYS}

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
        lo, hi = rank_rows(batch_size, rank, world_size)
        position = start * batch_size
        epoch, offset = (0, position) if self.following else divmod(position, self.n_tokens)
        gather_dtype = dtype if torch.device(device).type == "cpu" else FLOAT_DTYPES.get(self.dtype, dtype)
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
        from clt.store.writer import StoreWriter

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


def rank_rows(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of every global batch that rank `rank` of `world_size` takes (data parallel)."""
    if batch_size % world_size:
        raise StoreError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    lo = rank * (batch_size // world_size)
    return lo, lo + batch_size // world_size
