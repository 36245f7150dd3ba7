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

import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

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
        else:
            self.rows = torch.zeros(n_rows, n_cols)

    def next_rows(self, count: int) -> Tensor:
        """A zeroed float32 buffer [count, n_cols] for the next `count` rows; `commit` stores it."""
        if not self.split:
            return self.rows[self.done : self.done + count]
        return torch.zeros(count, self.n_cols)

    def commit(self, rows: Tensor) -> None:
        """Store the rows of the buffer `next_rows` gave."""
        if self.split:
            bits = rows.view(torch.int32)
            self.upper[self.done : self.done + len(rows)] = bits >> 16
            self.file.write((bits & 0xFFFF).to(torch.uint16).numpy().tobytes())
        self.done += len(rows)

    def magnitudes(self, width: int) -> Iterator[tuple[int, int, Tensor]]:
        """(first row, end row, |rows[first:end, :width]| as float32) over the stored rows, a chunk at a time."""
        step = max(1, self.chunk_bytes // (4 * max(width, 1)))
        for lo in range(0, self.done, step):
            hi = min(lo + step, self.done)
            if self.split:
                yield lo, hi, self.upper[lo:hi, :width].view(torch.bfloat16).float().abs_()
            else:
                yield lo, hi, self.rows[lo:hi, :width].abs()

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
            self.file.seek(lo * self.n_cols * 2)
            lower = np.fromfile(self.file, dtype=np.uint16, count=(hi - lo) * self.n_cols)
            if len(lower) != (hi - lo) * self.n_cols:
                raise OSError(f"the temporary row file is short: {self.file.name} lost rows {lo}..{hi}")
            lower = torch.from_numpy(lower.reshape(hi - lo, self.n_cols))[:, cols].to(torch.int32)
            bits = (self.upper[lo:hi, cols].to(torch.int32) << 16) | lower
            yield lo, hi, bits.view(torch.float32)

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the rows (and delete the temporary file)."""
        if self.split:
            self.file.close()
            self.upper = torch.empty(0, dtype=torch.int16)
        else:
            self.rows = torch.empty(0)


__all__ = ["SPLIT_BYTES_PER_ENTRY", "RowStore"]
