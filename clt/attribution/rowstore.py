"""The visited rows of `attribute` until its graph is built: whole in memory, or split in two halves.

With ``max_feature_nodes``, features are visited in order of their influence on the logits through
the rows computed so far, so every row is kept over every column (all active features, errors,
tokens) until the last one is known: visited rows × columns floats, 17 GB for 2,058 rows of a
4,096-token prompt with 2 M active features. The graph itself needs only the visited features'
columns (and the error and token columns).

A `RowStore` keeps them either as float32 in memory, or split: the upper 16 bits of each float32 in
memory (a bfloat16 rounded toward zero: under 2⁻⁷ relative error, enough to rank features) and the
lower 16 bits appended to an unlinked temporary file (``$TMPDIR``). The graph's entries are joined
back from both halves bit for bit, so a split store gives the exact float32 rows; only the ranking
reads the rounded halves (features whose influences differ by under ~1 % may be visited in another
order).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from clt.models import native

_UPPER = 1 if sys.byteorder == "little" else 0
"""Which 16-bit half of a float32 in memory holds its sign, exponent and top 7 mantissa bits."""
SPLIT_BYTES_PER_ENTRY = 2
"""Bytes of memory per stored entry in a split store (as many again on disk)."""


class RowStore:
    """Rows [n_rows, n_cols] written a batch at a time, in visit order (module docstring)."""

    def __init__(self, n_rows: int, n_cols: int, *, split: bool, chunk_bytes: int) -> None:
        self.n_rows, self.n_cols, self.split = n_rows, n_cols, split
        self.chunk_bytes = chunk_bytes
        self.done = 0
        if split:
            self.upper = torch.empty(n_rows, n_cols, dtype=torch.int16)
            self.file = tempfile.TemporaryFile(prefix="clt-rows-")  # noqa: SIM115 (closed by close())
            self.lower = torch.empty(0, dtype=torch.int16)
            self.buffer = torch.empty(0, n_cols)
        else:
            self.rows = torch.zeros(n_rows, n_cols)

    def next_rows(self, count: int) -> Tensor:
        """A zeroed float32 buffer [count, n_cols] for the next `count` rows, valid until `commit` stores it."""
        if not self.split:
            return self.rows[self.done : self.done + count]
        if len(self.buffer) < count:  # reused: a batch is committed before the next one is asked for
            self.buffer = torch.empty(count, self.n_cols)
        return self.buffer[:count].zero_()

    def commit(self, rows: Tensor) -> None:
        """Store the rows of the buffer `next_rows` gave."""
        if self.split:
            halves = rows.view(torch.int16).unflatten(1, (-1, 2))  # a float32's two 16-bit halves
            self.upper[self.done : self.done + len(rows)] = halves[..., _UPPER]
            if len(self.lower) < rows.numel():  # one buffer for every batch's lower halves
                self.lower = torch.empty(rows.numel(), dtype=torch.int16)
            lower = self.lower[: rows.numel()].view(rows.shape)
            lower.copy_(halves[..., 1 - _UPPER])
            self.file.write(lower.numpy())
        self.done += len(rows)

    def abs_weighted_sum(self, weights: Tensor, width: int) -> Tensor:
        """Σ_r weights[r] · |rows[r, :width]| over the stored rows (float32; a split store reads the
        upper halves: each term rounded toward zero, under 2⁻⁷ relative)."""
        out = torch.zeros(width)
        stored = self.upper[: self.done] if self.split else self.rows[: self.done]
        weights = weights.float().contiguous()
        if native.abs_weighted_sum(out, stored, weights):
            return out
        step = max(1, self.chunk_bytes // (4 * max(width, 1)))
        for lo in range(0, self.done, step):
            chunk = stored[lo : lo + step, :width]
            magnitudes = chunk.view(torch.bfloat16).float().abs_() if self.split else chunk.abs()
            out += weights[lo : lo + step] @ magnitudes
        return out

    def columns(self, cols: Tensor) -> Tensor:
        """The stored rows' entries in `cols` (float32; rounded toward zero in a split store)."""
        if self.split:
            return self.upper[: self.done, cols].view(torch.bfloat16).float()
        return self.rows[: self.done, cols]

    def exact(self, cols: Tensor) -> Iterator[tuple[int, int, Tensor]]:
        """(first row, end row, exact rows[first:end, cols]) over the stored rows in order, a chunk at a time."""
        step = max(1, self.chunk_bytes // (4 * self.n_cols))
        if self.split:
            self.file.flush()
        for lo in range(0, self.done, step):
            hi = min(lo + step, self.done)
            if not self.split:
                yield lo, hi, self.rows[lo:hi][:, cols]
                continue
            self.file.seek(lo * self.n_cols * SPLIT_BYTES_PER_ENTRY)
            lower = np.fromfile(self.file, dtype=np.int16, count=(hi - lo) * self.n_cols)
            if len(lower) != (hi - lo) * self.n_cols:
                raise OSError(f"the temporary row file is short: {self.file.name} lost rows {lo}..{hi}")
            halves = torch.empty(hi - lo, len(cols), 2, dtype=torch.int16)
            halves[..., 1 - _UPPER] = torch.from_numpy(lower.reshape(hi - lo, self.n_cols))[:, cols]
            halves[..., _UPPER] = self.upper[lo:hi, cols]
            yield lo, hi, halves.view(torch.float32).squeeze(-1)

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the rows (and delete the temporary file)."""
        if self.split:
            self.file.close()
            self.upper = self.lower = torch.empty(0, dtype=torch.int16)
            self.buffer = torch.empty(0)
        else:
            self.rows = torch.empty(0)


__all__ = ["SPLIT_BYTES_PER_ENTRY", "RowStore"]
