"""Automatic supernodes: features at one position that play the same part in a graph.

Two features are *alike* when they sit at the same token position and either carry the same
non-empty label or their signed edge profiles — the row of their inputs and the column of their
outputs, restricted to the nodes considered — have cosine similarity ≥ `min_similarity`. Groups are
built greedily (complete link): the most influential feature not yet grouped starts a group, and
every later feature alike to all its members joins it (up to `max_size`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from clt.attribution.adjacency import dense_rows
from clt.attribution.graph import Graph
from clt.attribution.prune import feature_indices, node_influence


def suggest_supernodes(
    graph: Graph,
    nodes: Sequence[int | str],
    *,
    labels: Mapping[str, str] | None = None,
    min_similarity: float = 0.8,
    max_size: int = 8,
) -> list[tuple[str, list[str]]]:
    """Groups (label, member node ids) of alike features among `nodes` (module docstring), each of
    at least two members, the group holding the most influential feature first."""
    if not 0.0 < min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
    if max_size < 2:
        raise ValueError(f"max_size must be at least 2, got {max_size}")
    labels = labels or {}
    features = feature_indices(graph, nodes)
    if len(features) < 2:
        return []
    universe = torch.tensor(sorted({graph.node_index(n) if isinstance(n, str) else int(n) for n in nodes}))
    A = graph.adjacency
    profiles = torch.cat([dense_rows(A, features)[:, universe], dense_rows(A, universe)[:, features].T], dim=1)
    profiles = profiles.double()
    profiles = profiles / profiles.norm(dim=1, keepdim=True).clamp(min=1e-30)
    similar = (profiles @ profiles.T) >= min_similarity - 1e-12
    ids = [graph.node(int(i)).id for i in features]
    names = [labels.get(i, "").strip() for i in ids]
    same_label = torch.tensor([[a != "" and a == b for b in names] for a in names])
    positions = graph.features[features, 1]
    alike = (similar | same_label) & (positions[:, None] == positions[None, :])
    order = node_influence(A, graph.logit_weights())[features].argsort(descending=True).tolist()
    grouped: set[int] = set()
    groups = []
    for first in order:
        if first in grouped:
            continue
        members = [first]
        for other in order:
            free = other not in grouped and other not in members and len(members) < max_size
            if free and all(alike[other, m] for m in members):
                members.append(other)
        if len(members) > 1:
            grouped.update(members)
            groups.append((_group_label(graph, [names[m] for m in members], int(positions[first])), members))
    return [(label, [ids[m] for m in members]) for label, members in groups]


def _group_label(graph: Graph, names: list[str], pos: int) -> str:
    """The members' most common label, else "N features at “token”"."""
    counts = Counter(n for n in names if n)
    if counts:
        return counts.most_common(1)[0][0]
    token = graph.tokens[pos]
    return f"{len(names)} features at “{token.strip() or repr(token)}”"


__all__ = ["suggest_supernodes"]
