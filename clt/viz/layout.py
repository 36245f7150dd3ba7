"""Where the nodes of a graph sit: columns are token positions, rows are layers.

x is the token position (tick labels are the prompt tokens); y is the row: token embeddings at the
bottom (0), model layers 0..L-1 above them (1..L). The logits sit in their own column right of the
last position (x = n_tokens), stacked downwards from the top row (L + 1), likeliest first. Nodes
sharing a (position, row) cell are packed into a small grid inside it, most influential first, error
nodes last. Marker sizes grow with the square root of influence (plus probability for logits).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from clt.attribution.graph import Graph, Node
from clt.viz.text import token_label

CELL_WIDTH = 0.84
"""Share of a column's width that the nodes of one cell use."""
ROW_BAND = 0.72
"""Share of a row's height that the nodes of one cell use."""
MIN_SIZE, MAX_EXTRA_SIZE, ERROR_SIZE = 6.0, 18.0, 5.0


def row_of(graph: Graph, node: Node) -> int:
    """The node's row: 0 for token embeddings, layer + 1 for features and errors, L + 1 for logits."""
    if node.kind == "token":
        return 0
    if node.kind == "logit":
        return graph.n_layers + 1
    return int(node.layer) + 1


def node_positions(graph: Graph, indices: Sequence[int], influence: Sequence[float]) -> dict[int, tuple[float, float]]:
    """(x, y) of each node index in `indices` (module docstring); `influence` is indexed by node index."""
    cells: dict[tuple[int, int], list[Node]] = defaultdict(list)
    logits = []
    for index in indices:
        node = graph.node(index)
        if node.kind == "logit":
            logits.append(node)
        else:
            cells[(node.pos, row_of(graph, node))].append(node)
    out: dict[int, tuple[float, float]] = {}
    for (pos, row), members in cells.items():
        members.sort(key=lambda n: (n.kind == "error", -influence[n.index], n.index))
        n = len(members)
        columns = max(1, math.ceil(math.sqrt(2.5 * n)))
        rows = math.ceil(n / columns)
        for k, node in enumerate(members):
            r, c = divmod(k, columns)
            width = min(columns, n - r * columns)  # the last sub-row is centred
            dx = CELL_WIDTH * ((c + 0.5) / width - 0.5) if width > 1 else 0.0
            dy = ROW_BAND * (0.5 - (r + 0.5) / rows) if rows > 1 else 0.0
            out[node.index] = (pos + dx, row + dy)
    top = graph.n_layers + 1
    step = min(1.0, top / max(len(logits), 1))
    for k, node in enumerate(sorted(logits, key=lambda n: n.index)):
        out[node.index] = (float(graph.n_tokens), top - k * step)
    return out


def max_cell_rows(graph: Graph, positions: dict[int, tuple[float, float]]) -> int:
    """The most sub-rows any cell uses (for the figure's height)."""
    per_cell: dict[tuple[int, int], set[float]] = defaultdict(set)
    for index, (_, y) in positions.items():
        node = graph.node(index)
        if node.kind != "logit":
            per_cell[(node.pos, row_of(graph, node))].add(round(y, 6))
    return max((len(v) for v in per_cell.values()), default=1)


def marker_sizes(weights: Sequence[float]) -> list[float]:
    """Marker size of each weight (influence + logit probability): sqrt-scaled to the largest."""
    top = max([w for w in weights if w > 0], default=1.0)
    return [MIN_SIZE + MAX_EXTRA_SIZE * math.sqrt(max(w, 0.0) / top) for w in weights]


def axes(graph: Graph, sub_rows: int = 1) -> dict[str, Any]:
    """Plotly layout entries for the axes (tokens × rows), the logits column's label and the height."""
    n_rows = graph.n_layers + 2
    return {
        "xaxis": {
            "tickmode": "array",
            "tickvals": list(range(graph.n_tokens)),
            "ticktext": [token_label(t) for t in graph.tokens],
            "range": [-0.6, graph.n_tokens + 0.6],
            "showgrid": False,
            "zeroline": False,
        },
        "yaxis": {
            "tickmode": "array",
            "tickvals": list(range(n_rows)),
            "ticktext": ["embeddings", *(f"layer {i}" for i in range(graph.n_layers)), "logits"],
            "range": [-0.6, n_rows - 0.4],
            "showgrid": True,
            "gridcolor": "#eeeeee",
            "zeroline": False,
        },
        "annotations": [
            {
                "text": "<b>logits</b>",
                "x": graph.n_tokens,
                "y": -0.55,
                "xref": "x",
                "yref": "y",
                "showarrow": False,
                "font": {"color": "#4c78a8"},
            }
        ],
        "shapes": [
            {
                "type": "line",
                "x0": graph.n_tokens - 0.5,
                "x1": graph.n_tokens - 0.5,
                "y0": -0.6,
                "y1": n_rows - 0.4,
                "line": {"color": "#cccccc", "dash": "dot", "width": 1},
            }
        ],
        "height": max(560, (24 + 12 * min(sub_rows, 6)) * n_rows + 160),
    }


__all__ = ["CELL_WIDTH", "ROW_BAND", "axes", "marker_sizes", "max_cell_rows", "node_positions", "row_of"]
