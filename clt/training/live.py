"""LiveActivations: training batches computed by the live model's forward, through a shuffle buffer.

No store is written: tokens per hour are bounded by the forward pass, not the disk. The corpus is
tokenised once; each epoch visits its documents in a seeded order and cuts them into context
windows; consecutive windows form *chunks* of ``chunk_windows`` windows, and each chunk is
forwarded once (one nnsight trace per ``extractor.batch_size`` windows).

Mixing: the buffer holds K = ``buffer_tokens / chunk tokens`` chunks. Each row of chunk j is
assigned by a seeded permutation to one of the K *cycles* j, j+1, …, j+K−1, and cycle c is the
seeded shuffle of the rows assigned to it (from chunks c−K+1 … c). Batches cut the concatenated
cycles. So batch i is a deterministic function of (seed, i); only K chunks are in memory (the
buffer); and a run resumed at batch i re-runs the forward of at most K chunks, with no record of
the skipped batches (cycle sizes follow from the window lengths alone).

The normalisation statistics are those of the first buffer fill (chunks 0 … K−1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from clt.data.corpus import TokenWindow, load_texts
from clt.store import ActivationBatch, NormStats, RunningStats
from clt.store.reader import rank_rows

logger = logging.getLogger(__name__)

_BUFFER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """Where batch `batch` of a live stream starts: its cycle and row offset, and the corpus place."""

    batch: int
    cycle: int
    offset: int
    """Rows of the cycle before the batch."""
    epoch: int
    """Corpus epoch of the cycle's newest chunk."""
    windows_read: int
    """Context windows forwarded up to and including the cycle's newest chunk (all epochs)."""


class _CorpusTokens:
    """The corpus tokenised lazily, document by document as the stream reaches it, and the seeded
    window order of each epoch (so a run starts without tokenising millions of tokens first)."""

    def __init__(self, texts: list[str], tokenizer: Any, context_length: int, prepend_bos: bool, seed: int) -> None:
        from clt.data.corpus import bos_id

        self.body = context_length - 1 if prepend_bos else context_length
        if self.body < 1:
            raise ValueError(f"context_length={context_length} leaves no room for tokens")
        self.prefix = (bos_id(tokenizer),) if prepend_bos else ()
        self.texts, self.tokenizer, self.seed = texts, tokenizer, seed
        self._docs: list[torch.Tensor | None] = [None] * len(texts)
        self._epoch: tuple[int, list[int], list[tuple[int, int]]] | None = None  # epoch, order, windows so far
        self._epoch_windows: int | None = None
        digest = hashlib.sha1()
        for text in texts:
            digest.update(hashlib.sha1(text.encode()).digest())
        self.fingerprint = digest.hexdigest()[:12]

    def doc(self, index: int) -> torch.Tensor:
        """Token ids of document `index` (tokenised on first use)."""
        ids = self._docs[index]
        if ids is None:
            ids = torch.tensor(
                self.tokenizer(self.texts[index], add_special_tokens=False)["input_ids"], dtype=torch.int32
            )
            self._docs[index] = ids
        return ids

    @property
    def windows_per_epoch(self) -> int:
        """Context windows of one epoch (tokenises the whole corpus the first time)."""
        if self._epoch_windows is None:
            self._epoch_windows = sum(-(-len(self.doc(d)) // self.body) for d in range(len(self.texts)))
            if self._epoch_windows == 0:
                raise ValueError("the corpus holds no tokens")
        return self._epoch_windows

    @property
    def n_tokens(self) -> int:
        """Tokens of the corpus (tokenises the whole corpus the first time)."""
        return sum(len(self.doc(d)) for d in range(len(self.texts)))

    def _windows(self, epoch: int, needed: int) -> list[tuple[int, int]]:
        """(document, start) of the first `needed` windows of an epoch (fewer at its end)."""
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            self._epoch = (epoch, torch.randperm(len(self.texts), generator=g).tolist(), [])
        _, order, windows = self._epoch
        while len(windows) < needed and order:
            d = order.pop(0)
            windows += [(d, s) for s in range(0, len(self.doc(d)), self.body)]
        return windows

    def places(self, first: int, count: int) -> list[tuple[int, int]]:
        """(document, start) of windows first … first+count−1 of the endless stream of epochs."""
        epoch, index = 0, first
        while len(windows := self._windows(epoch, index + 1)) <= index:  # `first` lies in a later epoch
            if not windows:
                raise ValueError("the corpus holds no tokens")
            epoch, index = epoch + 1, index - len(windows)
        places: list[tuple[int, int]] = []
        while len(places) < count:
            places += self._windows(epoch, index + count - len(places))[index : index + count - len(places)]
            epoch, index = epoch + 1, 0
        return places

    def length(self, document: int, start: int) -> int:
        """Tokens of a window (BOS included when prepended)."""
        return len(self.prefix) + min(self.body, len(self.doc(document)) - start)

    def window(self, document: int, start: int) -> TokenWindow:
        """The context window of `document` starting at token `start` (BOS prepended when set)."""
        ids = self.doc(document)[start : start + self.body].tolist()
        return TokenWindow(self.prefix + tuple(ids), document, start)


class LiveActivations:
    """Endless shuffled batches of MLP inputs/outputs from the live model (see the module docstring).

    It stands in for an `ActivationStore` wherever the trainer takes one.
    """

    def __init__(
        self,
        extractor: Any,
        corpus: Any = "stdlib",
        *,
        buffer_tokens: int = 32_768,
        chunk_windows: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        normalize: bool = True,
        buffer_dtype: str = "auto",
        text_field: str = "text",
    ) -> None:
        if buffer_tokens <= 0:
            raise ValueError(f"buffer_tokens must be positive, got {buffer_tokens}")
        if buffer_dtype != "auto" and buffer_dtype not in _BUFFER_DTYPES:
            raise ValueError(f"buffer_dtype {buffer_dtype!r} is not 'auto' or one of {sorted(_BUFFER_DTYPES)}")
        self.extractor, self.seed, self.batch_size, self.normalize = extractor, seed, batch_size, normalize
        self.corpus = corpus if isinstance(corpus, str) else type(corpus).__name__
        self.layers, self.d_model = list(extractor.layers), extractor.d_model
        self.model_name, self.output_site = extractor.model_name, "mlp_out"
        model_dtype = next(extractor.model.parameters()).dtype
        if buffer_dtype == "auto":
            buffer_dtype = "bfloat16" if model_dtype == torch.bfloat16 else "float16"
        self.dtype = buffer_dtype
        self._torch_dtype = _BUFFER_DTYPES[buffer_dtype]
        self.tokens = _CorpusTokens(
            load_texts(corpus, text_field=text_field),
            extractor.tokenizer,
            extractor.context_length,
            extractor.prepend_bos,
            seed,
        )
        self._bos_dropped = int(extractor.prepend_bos and extractor.exclude_bos)
        window_tokens = extractor.context_length - self._bos_dropped
        if chunk_windows is None:  # about 4096 tokens, and at least 8 chunks in the buffer where it can
            chunk_windows = min(4096, buffer_tokens // 8) // window_tokens
            chunk_windows = max(extractor.batch_size, chunk_windows // extractor.batch_size * extractor.batch_size)
        self.chunk_windows = chunk_windows
        chunk_tokens = self.chunk_windows * window_tokens
        self.buffer_chunks = max(1, round(buffer_tokens / chunk_tokens))
        self.buffer_tokens = self.buffer_chunks * chunk_tokens
        self._rows: dict[int, int] = {}
        self._chunks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.chunks_forwarded = 0
        """Chunks run through the model so far (re-runs after a resume included)."""
        self._stats = self._first_fill_stats()

    # the store interface ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Number of recorded layers."""
        return len(self.layers)

    @property
    def n_tokens(self) -> int:
        """Tokens in one epoch of the corpus (rows the stream yields per epoch)."""
        return self.tokens.n_tokens

    def norm_stats(self) -> NormStats:
        """Per-layer standardisation from the first rows of the stream (identity when not normalising)."""
        if not self.normalize:
            return NormStats.identity(self.num_layers, self.d_model)
        return self._stats

    @property
    def extra(self) -> dict[str, Any]:
        """The extraction settings (as a store records them)."""
        e = self.extractor
        return {
            "corpus": self.corpus,
            "context_length": e.context_length,
            "prepend_bos": e.prepend_bos,
            "exclude_bos": e.exclude_bos,
        }

    def token_windows(self, count: int) -> list[TokenWindow]:
        """The first `count` context windows of the stream (for objectives that run the model on text)."""
        return [self.tokens.window(d, s) for d, s in self.tokens.places(0, count)]

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to resume on the same stream."""
        return {
            "source": "live",
            "model": self.model_name,
            "corpus": self.corpus,
            "corpus_fingerprint": self.tokens.fingerprint,
            "seed": self.seed,
            "chunk_windows": self.chunk_windows,
            "buffer_chunks": self.buffer_chunks,
            "context_length": self.extractor.context_length,
            "layers": self.layers,
        }

    def __repr__(self) -> str:
        return (
            f"LiveActivations({self.model_name}, corpus={self.corpus!r} ({len(self.tokens.texts):,} documents), "
            f"buffer {self.buffer_tokens:,} tokens in {self.buffer_chunks} chunks, {self.dtype})"
        )

    def batches(
        self, batch_size: int | None = None, *, seed: int | None = None, start: int = 0, **placement: Any
    ) -> Iterator[ActivationBatch]:
        """Endless batches; batch i depends only on (seed, i). `start` resumes at batch `start`.

        `placement`: ``device``, ``dtype``, and ``rank``/``world_size`` (this rank's rows of every
        batch), as for `ActivationStore.batches`."""
        batch_size = batch_size or self.batch_size
        if seed is not None and seed != self.seed:
            raise ValueError(f"this stream was built with seed {self.seed}; the trainer asks for {seed}")
        lo, hi = rank_rows(batch_size, placement.get("rank", 0), placement.get("world_size", 1))
        device, dtype = placement.get("device", "cpu"), placement.get("dtype", torch.float32)
        where = self.position(start, batch_size)
        cycle, offset = where.cycle, where.offset
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        have = 0
        while True:
            inputs, outputs = self._cycle(cycle)
            while offset < inputs.shape[0]:
                take = min(batch_size - have, inputs.shape[0] - offset)
                pending.append((inputs[offset : offset + take], outputs[offset : offset + take]))
                have += take
                offset += take
                if have == batch_size:
                    x = torch.cat([p[0] for p in pending])[lo:hi]
                    y = torch.cat([p[1] for p in pending])[lo:hi]
                    pending, have = [], 0
                    yield ActivationBatch(x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype))
            cycle, offset = cycle + 1, 0

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.batches()

    # positions ---------------------------------------------------------------------------------

    def position(self, batch: int, batch_size: int | None = None) -> StreamPosition:
        """The cycle and row offset where batch `batch` starts, and the corpus place of that cycle."""
        rows = batch * (batch_size or self.batch_size)
        cycle = 0
        while True:
            size = self.cycle_size(cycle)
            if rows < size:
                break
            rows -= size
            cycle += 1
        windows_read = (cycle + 1) * self.chunk_windows
        epoch = 0 if self.tokens._epoch_windows is None else (windows_read - 1) // self.tokens.windows_per_epoch
        return StreamPosition(batch, cycle, rows, epoch, windows_read)

    def cycle_size(self, cycle: int) -> int:
        """Rows of cycle `cycle`: from each chunk j in c−K+1..c, the rows its permutation gives to c."""
        K = self.buffer_chunks
        total = 0
        for j in range(max(0, cycle - K + 1), cycle + 1):
            n, k = self.chunk_rows(j), cycle - j
            total += max(0, (n - k + K - 1) // K)
        return total

    def chunk_rows(self, chunk: int) -> int:
        """Rows (kept tokens) of chunk `chunk`, from its window lengths (no forward needed)."""
        if chunk not in self._rows:
            places = self.tokens.places(chunk * self.chunk_windows, self.chunk_windows)
            self._rows[chunk] = sum(self.tokens.length(d, s) - self._bos_dropped for d, s in places)
        return self._rows[chunk]

    def _chunk_windows(self, chunk: int) -> list[TokenWindow]:
        places = self.tokens.places(chunk * self.chunk_windows, self.chunk_windows)
        return [self.tokens.window(d, s) for d, s in places]

    # forward and mixing ------------------------------------------------------------------------

    def _forward(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and outputs [rows, L, d] of one chunk, in the buffer dtype."""
        windows = self._chunk_windows(chunk)
        step = self.extractor.batch_size
        parts = [
            self.extractor.activations(windows[lo : lo + step], dtype=self._torch_dtype)
            for lo in range(0, len(windows), step)
        ]
        self.chunks_forwarded += 1
        inputs = torch.cat([p["inputs"] for p in parts])
        outputs = torch.cat([p["outputs"] for p in parts])
        if not (bool(torch.isfinite(inputs).all()) and bool(torch.isfinite(outputs).all())):
            raise FloatingPointError(
                f"the model's forward gave NaN/inf activations in chunk {chunk}; run the forward in float32 "
                "(model_dtype='float32') or check the model"
            )
        return inputs, outputs

    def _chunk(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        if chunk not in self._chunks:
            self._chunks[chunk] = self._forward(chunk)
        return self._chunks[chunk]

    def _slots(self, chunk: int, rows: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * chunk)
        return torch.randperm(rows, generator=g) % self.buffer_chunks

    def _cycle(self, cycle: int) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.buffer_chunks
        for old in [j for j in self._chunks if j < cycle - K + 1]:
            del self._chunks[old]
        xs, ys = [], []
        for j in range(max(0, cycle - K + 1), cycle + 1):
            inputs, outputs = self._chunk(j)
            rows = (self._slots(j, inputs.shape[0]) == cycle - j).nonzero().squeeze(1)
            xs.append(inputs.index_select(0, rows))
            ys.append(outputs.index_select(0, rows))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * cycle + 1)
        x, y = torch.cat(xs), torch.cat(ys)
        order = torch.randperm(x.shape[0], generator=g)
        return x[order], y[order]

    def _first_fill_stats(self) -> NormStats:
        """Statistics of the first buffer fill (chunks 0 … K−1, which the stream needs first anyway)."""
        stats = RunningStats(self.num_layers, self.d_model)
        for chunk in range(self.buffer_chunks):
            stats.update(*self._chunk(chunk))
        if not stats.finite():
            raise FloatingPointError("the first rows of the stream hold NaN/inf activations; check the model")
        return stats.norm_stats()


__all__ = ["LiveActivations", "StreamPosition"]
