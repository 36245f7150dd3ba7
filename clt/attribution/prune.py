"""Pruning and scores of attribution graphs: pure functions over the adjacency matrix.

With Â = |A| normalised so that each row sums to 1 and w the logit probabilities (at logit
nodes), a node's influence is w·(Â + Â² + …) = w·((I − Â)⁻¹ − I), summed as a power series
(the graph is acyclic, so the series ends). Pruning (as circuit-tracer's ``prune_graph``):

1. keep the nodes holding the top `node_threshold` of cumulative influence (tokens and logits
   always kept), and zero the rows and columns of the others;
2. score each remaining edge Â'[t, s] · (influence'(t) + w(t)) on the re-normalised pruned matrix
   and keep the edges holding the top `edge_threshold` of the score mass (never zero-score ones);
3. repeatedly drop features and errors left without outgoing edges and features left without
   incoming edges.

Every function takes a dense or a sparse adjacency (`clt.attribution.adjacency`); the edge mask of
a sparse graph is a sparse bool tensor of the kept edges.

Scores (`graph_scores`): the replacement score is token influence / (token + error influence); the
completeness score Σ (1 − error fraction of a node's row) · (influence + w) / Σ (influence + w).

Scores of a node set (`subgraph_scores(graph, nodes)`): `graph_scores` of the graph in which every
feature node not in `nodes` is merged into the error node of its layer and position: its outgoing
edges are added to that error node's (A[:, e] += A[:, f]) and its own row and column are zeroed.
Error, token and logit nodes stay what they are (listing them changes nothing). Merging is
order-free, so merging some features first (as the graph page does for the features it does not
show) and the rest later gives the same matrix. Computed in float64 on the unpruned graph; with
every feature listed it equals `graph_scores` (up to float32 rounding there); a sparse graph is made
dense for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from clt.attribution.adjacency import (
    dense_rows,
    drop_nodes,
    entries,
    is_sparse,
    normalize_rows,
    right_multiplier,
    same_layout,
    scale_rows,
)
from clt.attribution.graph import Graph


class PruneResult(NamedTuple):
    """Which nodes and edges of a graph survive pruning."""

    node_mask: Tensor
    """Kept nodes [n_nodes], bool."""
    edge_mask: Tensor
    """Kept edges [n_nodes, n_nodes] (rows targets, columns sources), bool: dense, or sparse for a
    sparse adjacency."""
    cumulative_scores: Tensor
    """Each node's position in the cumulative influence ranking, in (0, 1] [n_nodes]."""


def influence(normalized: Tensor, weights: Tensor, max_iter: int = 10_000) -> Tensor:
    """weights·(Â + Â² + …) for a row-normalised acyclic Â [n, n] and weights [n]."""
    multiply = right_multiplier(normalized)
    current = multiply(weights)
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = multiply(current)
        total += current
    raise RuntimeError(f"influence did not converge after {max_iter} steps: the graph has a cycle")


def node_influence(adjacency: Tensor, logit_weights: Tensor) -> Tensor:
    """Influence of every node on the weighted logits [n_nodes]."""
    return influence(normalize_rows(adjacency), logit_weights)


def edge_influence(adjacency: Tensor, logit_weights: Tensor) -> Tensor:
    """Score of every edge: Â[t, s] · (influence(t) + logit weight(t)) [n_nodes, n_nodes]."""
    normalized = normalize_rows(adjacency)
    target_weight = influence(normalized, logit_weights) + logit_weights
    return scale_rows(normalized, target_weight)


def _threshold(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score among the top scores that hold `fraction` of the total."""
    if not len(scores):
        return scores.new_tensor(float("inf"))
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


def prune(
    graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98, *, node_scores: Tensor | None = None
) -> PruneResult:
    """Node and edge masks keeping `node_threshold` of node and `edge_threshold` of edge influence
    (`node_scores`: the graph's `node_influence`, when already computed for another threshold)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    A = graph.adjacency
    weights = graph.logit_weights()
    n_fixed = graph.n_tokens + graph.n_logits  # tokens and logits: always kept, at the end
    n_sources = graph.n_nodes - n_fixed  # features and errors
    n_features = graph.n_features

    scores = node_influence(A, weights) if node_scores is None else node_scores
    node_mask = scores >= _threshold(scores, node_threshold)
    node_mask[n_sources:] = True

    edge_scores = edge_influence(drop_nodes(A, node_mask), weights)
    rows, cols, values = entries(edge_scores)  # only positive scores: zeros move no threshold
    threshold = _threshold(values, edge_threshold)
    keep = values >= threshold

    previous = torch.zeros_like(node_mask)
    while not torch.equal(previous, node_mask):
        previous = node_mask.clone()
        keep &= node_mask[rows] & node_mask[cols]
        has_out = torch.zeros_like(node_mask).index_fill_(0, cols[keep], True)
        has_in = torch.zeros_like(node_mask).index_fill_(0, rows[keep], True)
        node_mask[:n_sources] &= has_out[:n_sources]  # has outgoing edges
        node_mask[:n_features] &= has_in[:n_features]  # has incoming edges
    keep &= node_mask[rows] & node_mask[cols]
    edge_mask = same_layout(A, rows[keep], cols[keep], torch.ones(int(keep.sum()), dtype=torch.bool))

    ordered, order = scores.sort(descending=True)
    cumulative = torch.zeros_like(scores)
    cumulative[order] = ordered.cumsum(0) / ordered.sum()
    return PruneResult(node_mask, edge_mask, cumulative)


def scores_of(adjacency: Tensor, logit_weights: Tensor, errors: slice, tokens: slice) -> tuple[float, float]:
    """(replacement, completeness) score of an adjacency whose error and token nodes are the given slices."""
    normalized = normalize_rows(adjacency)
    node_scores = influence(normalized, logit_weights)
    token_influence = node_scores[tokens].sum()
    error_influence = node_scores[errors].sum()
    output_influence = node_scores + logit_weights
    non_error = 1 - _error_fraction(normalized, errors)
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(token_influence / (token_influence + error_influence)), float(completeness)


def replacement_score(graph: Graph) -> float:
    """Token influence / (token influence + error influence) on the logits (1: no error paths)."""
    return graph_scores(graph)[0]


def completeness_score(graph: Graph) -> float:
    """Σ (1 − error fraction of a node's inputs) · (influence + logit weight) / Σ (influence + weight)."""
    return graph_scores(graph)[1]


def _error_fraction(normalized: Tensor, errors: slice) -> Tensor:
    """Each row's share of normalised input from the error nodes `errors` [n_nodes] (dense or sparse)."""
    if not is_sparse(normalized):
        return normalized[:, errors].sum(dim=-1)
    rows, cols, values = entries(normalized)
    from_errors = (cols >= errors.start) & (cols < errors.stop)
    return torch.zeros(normalized.shape[0], dtype=values.dtype).index_add_(0, rows[from_errors], values[from_errors])


def graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score) of an unpruned graph."""
    return scores_of(graph.adjacency, graph.logit_weights(), graph.error_slice, graph.token_slice)


def feature_indices(graph: Graph, nodes: Iterable[int | str]) -> Tensor:
    """Sorted indices of the feature nodes among `nodes` (node indices or ids; other kinds are left out)."""
    indices = {graph.node_index(n) if isinstance(n, str) else int(n) for n in nodes}
    for index in indices:
        if not 0 <= index < graph.n_nodes:
            raise IndexError(f"node index {index} is out of range [0, {graph.n_nodes})")
    return torch.tensor(sorted(i for i in indices if i < graph.n_features), dtype=torch.long)


def error_nodes_of(graph: Graph, features: Tensor) -> Tensor:
    """Index of the error node at each feature's layer and position."""
    return graph.error_slice.start + graph.features[features, 0] * graph.n_tokens + graph.features[features, 1]


def merged_rows(graph: Graph, rows: Tensor, merged: Tensor) -> Tensor:
    """Rows `rows` [r, n_nodes] (float64) of the adjacency with the features `merged` merged into
    their error nodes (module docstring)."""
    block = dense_rows(graph.adjacency, rows).double()
    if merged.numel():
        block.index_add_(1, error_nodes_of(graph, merged), block[:, merged])
        block[:, merged] = 0
        block[torch.isin(rows, merged)] = 0
    return block


def subgraph_scores(graph: Graph, nodes: Iterable[int | str]) -> tuple[float, float]:
    """(replacement, completeness) score of the subgraph of `nodes` (ids or indices): every feature
    not among them is merged into its error node (module docstring); float64."""
    kept = torch.zeros(graph.n_features, dtype=torch.bool)
    kept[feature_indices(graph, nodes)] = True
    merged = (~kept).nonzero().squeeze(1)
    adjacency = merged_rows(graph, torch.arange(graph.n_nodes), merged)
    return scores_of(adjacency, graph.logit_weights().double(), graph.error_slice, graph.token_slice)


__all__ = [
    "PruneResult",
    "completeness_score",
    "edge_influence",
    "error_nodes_of",
    "feature_indices",
    "graph_scores",
    "influence",
    "merged_rows",
    "node_influence",
    "normalize_rows",
    "prune",
    "replacement_score",
    "scores_of",
    "subgraph_scores",
]
