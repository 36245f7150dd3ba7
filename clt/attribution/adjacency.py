"""Adjacency matrices dense or sparse: the few operations graphs, pruning and exports need.

A graph's adjacency is a dense [N, N] tensor for short prompts and a sparse CSR tensor (int32 or
int64 indices, float32 values, only nonzero entries, columns sorted within each row) when the dense
matrix would be large (`DENSE_LIMIT_BYTES`). Every function here takes either layout and gives the
same numbers; masks of edges follow the adjacency's layout (a dense bool matrix, or a sparse COO
bool tensor holding only the kept edges).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

DENSE_LIMIT_BYTES = 256 * 2**20
"""`attribute` returns a sparse adjacency when the dense float32 matrix would take more than this."""


def is_sparse(matrix: Tensor) -> bool:
    """Whether a matrix is sparse (CSR or COO) rather than a dense tensor."""
    return matrix.layout != torch.strided


def csr_matrix(rows: Tensor, cols: Tensor, values: Tensor, n: int) -> Tensor:
    """A sparse CSR [n, n] matrix from entries sorted by (row, column)."""
    return csr_from_counts(torch.bincount(rows.long(), minlength=n), cols, values)


def csr_from_counts(counts: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """A sparse CSR [n, n] matrix from the entries per row [n] and the entries' columns and values
    (sorted by row, then column); int32 indices where they fit."""
    n = len(counts)
    index = torch.int32 if len(values) < 2**31 - 1 and n < 2**31 - 1 else torch.int64
    crow = torch.zeros(n + 1, dtype=index)
    crow[1:] = counts.cumsum(0)
    return sparse_csr(crow, cols.to(index), values, (n, n))


def sparse_csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """torch's CSR tensor (without its 'beta' warning; the caller guarantees sorted valid indices)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def entries(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, columns, values) of the nonzero entries in row-major order (indices int64)."""
    if not is_sparse(matrix):
        rows, cols = matrix.nonzero(as_tuple=True)
        return rows, cols, matrix[rows, cols]
    if matrix.layout == torch.sparse_coo:
        matrix = matrix.coalesce()
        rows, cols = matrix.indices()
        values = matrix.values()
    else:
        crow = matrix.crow_indices().long()
        rows = torch.repeat_interleave(torch.arange(len(crow) - 1), crow.diff())
        cols, values = matrix.col_indices().long(), matrix.values()
    keep = values != 0
    return rows[keep], cols[keep], values[keep]


def same_layout(matrix: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """A matrix of `matrix`'s shape and layout holding these entries (sorted row-major), 0 elsewhere."""
    n = matrix.shape[0]
    if not is_sparse(matrix):
        out = torch.zeros(matrix.shape, dtype=values.dtype)
        out[rows, cols] = values
        return out
    if values.dtype == torch.bool:
        return torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, matrix.shape, check_invariants=False
        ).coalesce()
    return csr_matrix(rows, cols, values, n)


def mask_entries(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, columns) of the True entries of an edge mask (dense bool or sparse), row-major."""
    rows, cols, values = entries(mask)
    return rows, cols


def right_multiplier(matrix: Tensor) -> Callable[[Tensor], Tensor]:
    """v ↦ v @ matrix for many vectors v [n]: a sparse matrix is transposed into CSR once, and each
    product is then one sparse matrix-vector product."""
    if not is_sparse(matrix):
        return lambda vector: vector @ matrix
    rows, cols, values = entries(matrix)
    order = torch.argsort(cols * matrix.shape[0] + rows)
    transposed = csr_matrix(cols[order], rows[order], values[order], matrix.shape[1])
    by_dtype: dict[torch.dtype, Tensor] = {}

    def multiply(vector: Tensor) -> Tensor:
        dtype = torch.promote_types(vector.dtype, values.dtype)
        if dtype not in by_dtype:
            by_dtype[dtype] = transposed if transposed.dtype == dtype else transposed.to(dtype)
        return torch.mv(by_dtype[dtype], vector.to(dtype))

    return multiply


def normalize_rows(adjacency: Tensor) -> Tensor:
    """|A| with each row scaled to sum to 1 (all-zero rows stay zero), in A's layout."""
    if not is_sparse(adjacency):
        absolute = adjacency.abs()
        return absolute / absolute.sum(dim=1, keepdim=True).clamp(min=1e-10)
    rows, cols, values = entries(adjacency)
    absolute = values.abs()
    sums = torch.zeros(adjacency.shape[0], dtype=absolute.dtype).index_add_(0, rows, absolute)
    return csr_matrix(rows, cols, absolute / sums.clamp(min=1e-10)[rows], adjacency.shape[0])


def scale_rows(matrix: Tensor, scale: Tensor) -> Tensor:
    """matrix · scale[:, None], in the matrix's layout."""
    if not is_sparse(matrix):
        return matrix * scale[:, None]
    rows, cols, values = entries(matrix)
    return csr_matrix(rows, cols, values * scale[rows], matrix.shape[0])


def drop_nodes(matrix: Tensor, keep: Tensor) -> Tensor:
    """The matrix with the rows and columns of nodes outside `keep` [n] (bool) set to zero."""
    if not is_sparse(matrix):
        out = matrix.clone()
        out[~keep] = 0
        out[:, ~keep] = 0
        return out
    rows, cols, values = entries(matrix)
    inside = keep[rows] & keep[cols]
    return csr_matrix(rows[inside], cols[inside], values[inside], matrix.shape[0])


def values_at(matrix: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """matrix[rows, cols] for index vectors (0 where a sparse matrix has no entry)."""
    if not is_sparse(matrix):
        return matrix[rows, cols]
    if matrix.layout == torch.sparse_coo:
        rows, cols_all, values_all = entries(matrix)
        matrix = csr_matrix(rows, cols_all, values_all, matrix.shape[0])
    crow, col, values = matrix.crow_indices().long(), matrix.col_indices().long(), matrix.values()
    out = torch.zeros(len(rows), dtype=values.dtype)
    for row in rows.unique().tolist():
        lo, hi = int(crow[row]), int(crow[row + 1])
        where = (rows == row).nonzero().squeeze(1)
        found = torch.searchsorted(col[lo:hi], cols[where]).clamp(max=max(hi - lo - 1, 0))
        hit = col[lo:hi][found] == cols[where] if hi > lo else torch.zeros(len(where), dtype=torch.bool)
        out[where[hit]] = values[lo:hi][found[hit]]
    return out


def dense_rows(matrix: Tensor, rows: Tensor) -> Tensor:
    """matrix[rows] as a dense block [len(rows), n] (a sparse matrix is never densified whole)."""
    if not is_sparse(matrix):
        return matrix[rows]
    if matrix.layout != torch.sparse_csr:
        entry_rows, entry_cols, entry_values = entries(matrix)
        matrix = csr_matrix(entry_rows, entry_cols, entry_values, matrix.shape[0])
    crow, col, values = matrix.crow_indices().long(), matrix.col_indices().long(), matrix.values()
    starts, counts = crow[rows], crow[rows + 1] - crow[rows]
    owner = torch.repeat_interleave(torch.arange(len(rows)), counts)
    index = torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts)[owner] + starts[owner]
    out = torch.zeros(len(rows), matrix.shape[1], dtype=values.dtype)
    out[owner, col[index]] = values[index]
    return out


def count_nonzeros(matrix: Tensor, rows: Tensor, cols: Tensor, chunk: int = 4096) -> Tensor:
    """Nonzero entries of each of `rows` within the columns `cols` [len(rows)] (dense or sparse)."""
    if not is_sparse(matrix):
        parts = [(matrix[part][:, cols] != 0).sum(1) for part in rows.split(chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    entry_rows, entry_cols, _ = entries(matrix)
    in_cols = torch.zeros(matrix.shape[1], dtype=torch.long).index_fill_(0, cols, 1)
    per_row = torch.zeros(matrix.shape[0], dtype=torch.long).index_add_(0, entry_rows, in_cols[entry_cols])
    return per_row[rows]


def to_dense(matrix: Tensor) -> Tensor:
    """The matrix as a dense tensor (a copy only when it is sparse)."""
    return matrix.to_dense() if is_sparse(matrix) else matrix


__all__ = [
    "DENSE_LIMIT_BYTES",
    "count_nonzeros",
    "csr_from_counts",
    "csr_matrix",
    "dense_rows",
    "drop_nodes",
    "entries",
    "is_sparse",
    "mask_entries",
    "normalize_rows",
    "right_multiplier",
    "same_layout",
    "scale_rows",
    "sparse_csr",
    "to_dense",
    "values_at",
]
