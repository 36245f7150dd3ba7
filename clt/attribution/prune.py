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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from clt.attribution.adjacency import (
    drop_nodes,
    entries,
    is_sparse,
    normalize_rows,
    same_layout,
    scale_rows,
    vector_matrix,
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
    current = vector_matrix(weights, normalized)
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = vector_matrix(current, normalized)
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


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Node and edge masks keeping `node_threshold` of node and `edge_threshold` of edge influence."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    A = graph.adjacency
    weights = graph.logit_weights()
    n_fixed = graph.n_tokens + graph.n_logits  # tokens and logits: always kept, at the end
    n_sources = graph.n_nodes - n_fixed  # features and errors
    n_features = graph.n_features

    scores = node_influence(A, weights)
    node_mask = scores >= _threshold(scores, node_threshold)
    node_mask[n_sources:] = True

    edge_scores = edge_influence(drop_nodes(A, node_mask), weights)
    threshold = _threshold(edge_scores.values() if is_sparse(A) else edge_scores.flatten(), edge_threshold)
    rows, cols, values = entries(edge_scores)  # only positive scores
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


def replacement_score(graph: Graph) -> float:
    """Token influence / (token influence + error influence) on the logits (1: no error paths)."""
    node_scores = node_influence(graph.adjacency, graph.logit_weights())
    tokens = node_scores[graph.token_slice].sum()
    errors = node_scores[graph.error_slice].sum()
    return float(tokens / (tokens + errors))


def completeness_score(graph: Graph) -> float:
    """Σ (1 − error fraction of a node's inputs) · (influence + logit weight) / Σ (influence + weight)."""
    normalized = normalize_rows(graph.adjacency)
    weights = graph.logit_weights()
    output_influence = influence(normalized, weights) + weights
    non_error = 1 - _error_fraction(normalized, graph)
    return float((non_error * output_influence).sum() / output_influence.sum())


def _error_fraction(normalized: Tensor, graph: Graph) -> Tensor:
    """Each row's share of normalised input from error nodes [n_nodes]."""
    if not is_sparse(normalized):
        return normalized[:, graph.error_slice].sum(dim=-1)
    rows, cols, values = entries(normalized)
    errors = (cols >= graph.error_slice.start) & (cols < graph.error_slice.stop)
    return torch.zeros(graph.n_nodes, dtype=values.dtype).index_add_(0, rows[errors], values[errors])


def graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score) of an unpruned graph."""
    return replacement_score(graph), completeness_score(graph)


__all__ = [
    "PruneResult",
    "completeness_score",
    "edge_influence",
    "graph_scores",
    "influence",
    "node_influence",
    "normalize_rows",
    "prune",
    "replacement_score",
]
