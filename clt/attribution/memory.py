"""The memory plan of `attribute`: an estimate by part, and the batch size and pattern storage that fit.

Parts (bytes): the process's resident memory when the plan is made (the loaded model and
transcoder, the clean run of the prompt, the runtime; without /proc: the weights and the clean
run); the transcoder's decoder rows and the index arrays of the feature edges; the attention
patterns (kept: at most L·heads·n(n + block)/2 floats; else the queries and keys, and one block
rebuilt at a time); the rows computed so far (visited targets × columns, as float32 or as a split
store's upper halves — `clt.attribution.rowstore` — or one batch when every feature is visited);
the batch's working tensors (a few copies of batch × n × d, or for the autograd path the prompt
copied batch-size times with its patterns); and the finished graph (dense N², or sparse: at most
rows × kept columns entries of 8 bytes).

With ``max_memory_gb`` the plan keeps the patterns and the rows in memory if everything fits at
``batch_size``, else splits the rows, else rebuilds the patterns per batch (rows in memory, then
split), else lowers the batch size (the smaller of the two pattern storages, rows in memory where
they fit) until the estimate fits; without it the batch size is ``batch_size``, the patterns are
kept when they take at most `KEEP_PATTERNS_BYTES`, and the rows are split only when the estimate
passes the memory the system has available. A split store also needs as many bytes free in the
temporary folder as it keeps in memory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from torch import Tensor, nn

from clt.attribution.adjacency import DENSE_LIMIT_BYTES
from clt.attribution.replacement import PromptState, ReplacementModel
from clt.attribution.rowstore import SPLIT_BYTES_PER_ENTRY

GiB = 2**30
KEEP_PATTERNS_BYTES = GiB
"""Without a memory budget, attention patterns are kept whole up to this size."""
BLOCK_SIZE = 256
"""Query rows per attention-pattern block."""
CHUNK_BYTES = 64 * 2**20
"""Most bytes of gathered decoder rows per matmul of the feature edges."""


@dataclasses.dataclass
class MemoryPlan:
    """Batch size, pattern storage and graph layout of one `attribute` call, with the estimate."""

    batch_size: int
    """Targets per batched pass."""
    keep_patterns: bool
    """Attention patterns computed once and kept (else rebuilt block by block for each batch)."""
    block_size: int
    """Query rows per pattern block."""
    sparse: bool
    """The graph's adjacency is sparse CSR (else dense)."""
    linear: bool
    """Rows from the linear maps (else the autograd path, the prompt copied batch-size times)."""
    split_rows: bool
    """The visited rows are kept split: upper halves in memory, lower halves on disk."""
    parts: dict[str, int]
    """Estimated bytes of each part (module docstring)."""
    disk: int = 0
    """Bytes of the split store's temporary file."""

    @property
    def total(self) -> int:
        """Estimated peak bytes."""
        return sum(self.parts.values())

    def describe(self) -> str:
        """One line: the estimate by part, the batch size and the pattern storage."""
        parts = ", ".join(f"{name} {size / GiB:.2f}" for name, size in self.parts.items())
        if not self.linear:
            how = "autograd path (the prompt copied batch-size times)"
        elif self.keep_patterns:
            how = "linear path, attention patterns kept"
        else:
            how = f"linear path, attention patterns rebuilt in blocks of {self.block_size} query rows"
        layout = "sparse" if self.sparse else "dense"
        rows = f", rows split (lower halves: {self.disk / GiB:.2f} GiB on disk)" if self.split_rows else ""
        return (
            f"estimated peak memory {self.total / GiB:.2f} GiB ({parts}); batch {self.batch_size}, {how}, "
            f"{layout} adjacency{rows}"
        )


def plan_memory(
    rm: ReplacementModel,
    state: PromptState,
    *,
    n_active: int,
    decoder_writes: int,
    n_rows: int,
    n_cols: int,
    n_nodes: int,
    direct: bool,
    linear: bool,
    batch_size: int,
    max_memory_gb: float | None,
    row_store: str = "auto",
) -> MemoryPlan:
    """The plan for a prompt with `n_active` active features writing `decoder_writes` (feature,
    target layer) pairs, `n_rows` targets, rows of `n_cols` columns and a graph of `n_nodes` nodes;
    `direct`: every feature is visited (rows go straight to the graph); `row_store`: 'memory',
    'split' or 'auto' (module docstring)."""
    n, d, M = len(state.input_ids), rm.layout.d_model, rm.n_layers
    heads, kv_heads, head_dim = _heads(rm.model, d)
    sparse = n_nodes * n_nodes * 4 > DENSE_LIMIT_BYTES
    fixed = {
        "resident": _resident_bytes(rm, state),
        "decoders": sum(w.numel() for w in rm.transcoder.W_dec) * 4,
        "edge index": decoder_writes * 12 + n_active * 40,
        "graph": n_nodes * n_nodes * 4 if not sparse else n_rows * n_nodes * 8,
    }
    block = min(BLOCK_SIZE, n)
    kept = M * heads * sum(min(block, n - q0) * min(q0 + block, n) for q0 in range(0, n, block)) * 4
    rebuilt = M * (heads + kv_heads) * n * head_dim * 4 + 3 * heads * block * n * 4

    def patterns(keep: bool) -> int:
        return (kept if keep else rebuilt) if linear else 0

    def working(batch: int, split: bool) -> int:
        buffer = batch * n_cols * 4 if direct or split else 0  # rows written outside the store
        if linear:
            return 7 * batch * n * d * 4 + buffer + CHUNK_BYTES * (d + batch) // d
        return batch * M * (heads * n * n * 4 * 2 + 12 * n * d * 4) + batch * n_cols * 4

    def plan(batch: int, keep: bool, split: bool) -> MemoryPlan:
        stored = 0 if direct else n_rows * n_cols * (SPLIT_BYTES_PER_ENTRY if split else 4)
        parts = {**fixed, "rows": stored + 2 * CHUNK_BYTES, "patterns": patterns(keep), "batch": working(batch, split)}
        disk = n_rows * n_cols * SPLIT_BYTES_PER_ENTRY if split else 0
        return MemoryPlan(batch, keep, block, sparse, linear, split, parts, disk)

    stores = [False, True] if row_store == "auto" and not direct else [row_store == "split" and not direct]

    def first_fit(batch: int, keep: bool, limit: float | None) -> MemoryPlan:
        """The first row store (in memory before split) whose plan fits `limit`, else the smallest."""
        plans = [plan(batch, keep, split) for split in stores]
        fitting = [p for p in plans if limit is None or p.total <= limit]
        return fitting[0] if fitting else min(plans, key=lambda p: p.total)

    if max_memory_gb is None:
        available = _available_bytes()
        limit = None if available is None else available + fixed["resident"]
        return _checked_disk(first_fit(batch_size, kept <= KEEP_PATTERNS_BYTES, limit))
    budget = max_memory_gb * GiB
    for keep in (True, False):
        chosen = first_fit(batch_size, keep, budget)
        if chosen.total <= budget:
            return _checked_disk(chosen)
    keep = kept <= rebuilt  # a smaller batch, with whichever pattern storage is smaller
    least = first_fit(1, keep, budget)
    if least.total > budget:
        raise MemoryError(
            f"attribution needs about {least.total / GiB:.2f} GiB even at batch size 1 but max_memory_gb "
            f"is {max_memory_gb:g} ({least.describe()}); raise max_memory_gb, lower max_feature_nodes, "
            + ("use row_store='split' or 'auto', " if row_store == "memory" and not direct else "")
            + "or shorten the prompt"
        )
    low, high = 1, batch_size  # the largest batch that fits: working memory grows with the batch
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if first_fit(middle, keep, budget).total <= budget else (low, middle - 1)
    return _checked_disk(first_fit(low, keep, budget))


def _checked_disk(plan: MemoryPlan) -> MemoryPlan:
    """The plan, once the temporary folder is known to hold a split store's file."""
    if plan.disk:
        folder = tempfile.gettempdir()
        free = shutil.disk_usage(folder).free
        if free < plan.disk:
            raise OSError(
                f"the split row store needs {plan.disk / GiB:.2f} GiB in the temporary folder {folder}, which has "
                f"{free / GiB:.2f} GiB free; set TMPDIR to a folder with more space, or give attribution more "
                "memory (max_memory_gb) with row_store='memory'"
            )
    return plan


def _available_bytes() -> int | None:
    """Memory the system has available now (Linux /proc/meminfo), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _heads(model: nn.Module, d: int) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dimension) from a model's config (1, 1, d if unknown)."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    return int(heads), int(kv_heads), int(head_dim)


def _resident_bytes(rm: ReplacementModel, state: PromptState) -> int:
    """The process's resident memory now (Linux), else the bytes of the weights and the clean run."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        tensors = [t for t in vars(state).values() if isinstance(t, Tensor)]
        return _bytes(rm.model) + _bytes(rm.transcoder) + sum(t.numel() * t.element_size() for t in tensors)


def _bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["BLOCK_SIZE", "CHUNK_BYTES", "KEEP_PATTERNS_BYTES", "MemoryPlan", "plan_memory"]
