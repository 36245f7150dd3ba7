"""Interactive plotly figure of an attribution graph; standalone HTML page with click highlighting.

Layout: x is the token position (tick labels are the prompt tokens), y the row: token embeddings
at the bottom, model layers 0..L-1 above them, logits at the top. Nodes sharing a (position, row)
cell are spread horizontally inside it. Colour and marker symbol show the node kind, marker size
grows with influence (`prune.node_influence`, plus the probability for logits); edges are line
segments, blue for positive and red for negative weights, thicker for larger |weight|.

A slider switches between the pruned graphs of several node thresholds (`thresholds`); each
threshold owns its own traces and only the active one is visible. In the HTML page
(`save_graph_html`), clicking a node dims everything outside its upstream and/or downstream set
(buttons choose which); clicking it again, double-clicking or moving the slider resets.

All text from the graph (tokens, labels, contexts) is HTML-escaped before it reaches the figure.
"""

from __future__ import annotations

import html
import inspect
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clt.attribution.adjacency import mask_entries, same_layout, values_at
from clt.attribution.graph import Graph, Node
from clt.attribution.prune import PruneResult, edge_influence, node_influence, prune
from clt.files import atomic_write_text
from clt.viz.click import click_script

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from clt.interp.features import FeatureCard

NODE_META = "nodes"
"""`meta` of every trace that draws node markers (one trace per node kind and threshold)."""
EDGE_META = "edges"
"""`meta` of the edge traces (lines only, no markers)."""
HIGHLIGHT_META = "highlight"
"""`meta` of the two edge traces the click script fills (lines only, empty until a click)."""
DEFAULT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
DEFAULT_MAX_EDGES = 2000
"""Most edges drawn per threshold (the strongest by edge influence)."""

_KIND_STYLE = {  # colour, marker symbol, legend name
    "token": ("#54a24b", "square", "token embedding"),
    "feature": ("#f58518", "circle", "feature"),
    "error": ("#8c8c8c", "diamond", "error"),
    "logit": ("#4c78a8", "hexagon", "logit"),
}
_EDGE_COLOURS = {1: "#2166ac", -1: "#d6604d"}
_EDGE_WIDTHS = (0.6, 1.6, 3.2)
_EDGE_OPACITY = 0.55
_NODE_OPACITY = 0.9
_DIM_NODES = 0.15
_DIM_EDGES = 0.06
_CELL_WIDTH = 0.8
_MIN_SIZE, _MAX_EXTRA_SIZE = 6.0, 20.0


def token_label(token: str) -> str:
    """How a token is shown in the figure: HTML-escaped, newlines as ↵ and tabs as ⇥."""
    return html.escape(token.replace("\n", "↵").replace("\t", "⇥"), quote=False)


def graph_figure(
    graph: Graph,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    labels: Mapping[str, str] | None = None,
    cards: Mapping[str, FeatureCard] | None = None,
    title: str | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_edges: int | None = DEFAULT_MAX_EDGES,
) -> go.Figure:
    """The pruned graph as a plotly figure with a node-threshold slider (module docstring).

    `labels` maps node ids to labels; `cards` (e.g. `FeatureCards`) gives feature labels and top
    contexts for the hover text; `title` is plain text (escaped). The slider starts at
    `node_threshold`, which is added to `thresholds` when missing. At most `max_edges` edges are
    drawn per threshold (those with the highest edge influence; None draws all): a pruned graph of
    thousands of features keeps tens of thousands of edges, more than anyone can read.

    Node markers: the visible traces whose ``meta == "nodes"``; in Python
    ``sum(len(t.x) for t in fig.data if t.meta == "nodes" and t.visible)`` equals the number of
    nodes kept by ``prune(graph, node_threshold, edge_threshold)``. In the rendered page each
    marker is one ``path.point`` under ``.scatterlayer g.trace.scatter`` (edge and highlight
    traces are lines and draw none; hidden traces of other thresholds are not rendered), so
    ``document.querySelectorAll('.scatterlayer .trace.scatter path.point').length`` counts them.
    """
    return _figure(graph, node_threshold, edge_threshold, labels, cards, title, thresholds, max_edges)[0]


def graph_html(graph: Graph, **kwargs: Any) -> str:
    """A standalone HTML page (plotly.js inline, click highlighting) of `graph_figure`."""
    fig, data = _build(graph, **kwargs)
    return fig.to_html(
        include_plotlyjs=True,
        full_html=True,
        post_script=click_script(data),
        config={"displaylogo": False, "responsive": True},
    )


def save_graph_html(graph: Graph, path: str | Path, **kwargs: Any) -> Path:
    """Write `graph_html(graph, **kwargs)` to `path` (atomically); it opens offline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(graph_html(graph, **kwargs), path)
    return path


# ----------------------------------------------------------------------------- building

_DIRECTIONS = {"upstream + downstream": "both", "upstream": "up", "downstream": "down"}


def _build(graph: Graph, **kwargs: Any) -> tuple[go.Figure, dict[str, Any]]:
    """`graph_figure(graph, **kwargs)` and the data its click script needs (trace groups, links,
    node positions)."""
    bound = inspect.signature(graph_figure).bind(graph, **kwargs)
    bound.apply_defaults()
    return _figure(*bound.arguments.values())


def _figure(
    graph: Graph,
    node_threshold: float,
    edge_threshold: float,
    labels: Mapping[str, str] | None,
    cards: Mapping[str, FeatureCard] | None,
    title: str | None,
    thresholds: Sequence[float],
    max_edges: int | None,
) -> tuple[go.Figure, dict[str, Any]]:
    """The figure and the data its click script needs (trace groups, links, node positions)."""
    import plotly.graph_objects as go

    levels = sorted({float(t) for t in thresholds} | {float(node_threshold)})
    for value in levels:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"node thresholds must be in [0, 1], got {value}")
    active = levels.index(float(node_threshold))
    influence = node_influence(graph.adjacency, graph.logit_weights())
    weight = (influence + graph.logit_weights()).clamp(min=0).tolist()
    top = max(weight) or 1.0
    sizes = [_MIN_SIZE + _MAX_EXTRA_SIZE * math.sqrt(w / top) for w in weight]
    nodes = graph.nodes
    hover = [_hover(n, float(influence[n.index]), *_annotation(n, labels, cards)) for n in nodes]

    traces: list[Any] = []
    groups: list[dict[str, Any]] = []
    spans: list[range] = []
    for level in levels:
        result = _capped(graph, prune(graph, node_threshold=level, edge_threshold=edge_threshold), max_edges)
        new, group = _threshold_traces(graph, nodes, result, sizes, hover, len(traces))
        spans.append(range(len(traces), len(traces) + len(new)))
        traces.extend(new)
        groups.append(group)
    highlight = [len(traces), len(traces) + 1]
    for sign in (1, -1):
        traces.append(
            go.Scatter(
                x=[],
                y=[],
                mode="lines",
                meta=HIGHLIGHT_META,
                hoverinfo="skip",
                showlegend=False,
                line={"color": _EDGE_COLOURS[sign], "width": 2.4},
            )
        )
    visible = [[i in span for i in range(highlight[0])] + [True, True] for span in spans]
    for trace, shown in zip(traces, visible[active]):
        trace.visible = shown
    fig = go.Figure(traces)
    title = _default_title(graph, edge_threshold) if title is None else html.escape(title, quote=False)
    fig.update_layout(**_layout(graph, title, levels, visible, active))
    data = {
        "groups": groups,
        "highlight": highlight,
        "directions": _DIRECTIONS,
        "edgeOpacity": _EDGE_OPACITY,
        "nodeOpacity": _NODE_OPACITY,
        "dimNodes": _DIM_NODES,
        "dimEdges": _DIM_EDGES,
    }
    return fig, data


def _capped(graph: Graph, result: PruneResult, max_edges: int | None) -> PruneResult:
    """`result` with only its `max_edges` edges of highest edge influence."""
    count = int(result.edge_mask.sum())
    if max_edges is None or count <= max_edges:
        return result
    if max_edges < 0:
        raise ValueError(f"max_edges must be None (all) or >= 0, got {max_edges}")
    rows, cols = mask_entries(result.edge_mask)
    scores = values_at(edge_influence(graph.adjacency, graph.logit_weights()), rows, cols)
    top = scores.topk(max_edges).indices.sort().values
    edge_mask = same_layout(result.edge_mask, rows[top], cols[top], torch.ones(len(top), dtype=torch.bool))
    return result._replace(edge_mask=edge_mask)


def _layout(graph: Graph, title: str, levels: list[float], visible: list[list[bool]], active: int) -> dict[str, Any]:
    """Axes (tokens × rows), the threshold slider and the highlight-direction buttons."""
    n_rows = graph.n_layers + 2
    steps = [
        {"label": f"{level:g}", "method": "update", "args": [{"visible": shown}, {}]}
        for level, shown in zip(levels, visible)
    ]
    buttons = [{"label": label, "method": "skip", "args": [None]} for label in _DIRECTIONS]
    return {
        "title": {"text": title, "x": 0.01, "y": 1.0, "yref": "container", "yanchor": "top", "pad": {"t": 12}},
        "xaxis": {
            "tickmode": "array",
            "tickvals": list(range(graph.n_tokens)),
            "ticktext": [token_label(t) for t in graph.tokens],
            "range": [-0.6, graph.n_tokens - 0.4],
            "showgrid": False,
            "zeroline": False,
        },
        "yaxis": {
            "tickmode": "array",
            "tickvals": list(range(n_rows)),
            "ticktext": ["embeddings", *(f"layer {i}" for i in range(graph.n_layers)), "logits"],
            "range": [-0.6, n_rows - 0.2],
            "showgrid": True,
            "zeroline": False,
        },
        "height": max(560, 70 * n_rows + 300),
        "plot_bgcolor": "white",
        "hovermode": "closest",
        "margin": {"t": 140, "b": 170},
        "sliders": [
            {"active": active, "currentvalue": {"prefix": "node threshold: "}, "pad": {"t": 90}, "steps": steps}
        ],
        "updatemenus": [
            {
                "type": "buttons",
                "direction": "right",
                "x": 0.0,
                "xanchor": "left",
                "y": 1.0,
                "yanchor": "bottom",
                "showactive": True,
                "active": 0,
                "pad": {"l": 150},
                "buttons": buttons,
            }
        ],
        "annotations": [
            {
                "text": "click a node to highlight:",
                "showarrow": False,
                "xref": "paper",
                "yref": "paper",
                "x": 0.0,
                "xanchor": "left",
                "y": 1.012,
                "yanchor": "bottom",
            }
        ],
    }


def _threshold_traces(
    graph: Graph, nodes: list[Node], result: PruneResult, sizes: list[float], hover: list[str], offset: int
) -> tuple[list[Any], dict[str, Any]]:
    """Edge and node traces of one pruned graph, and their indices, links and node positions."""
    import plotly.graph_objects as go

    kept = result.node_mask.nonzero().squeeze(1).tolist()
    positions = _positions(graph, [nodes[i] for i in kept])
    edges = graph.edges_df(node_mask=result.node_mask, edge_mask=result.edge_mask)
    top = float(edges["weight"].abs().max()) if len(edges) else 1.0
    segments: dict[tuple[int, int], tuple[list[float | None], list[float | None]]] = defaultdict(lambda: ([], []))
    links = []
    columns = (edges["target"].tolist(), edges["source"].tolist(), edges["weight"].tolist())
    for t, s, w in zip(*columns):
        sign = 1 if w > 0 else -1
        bucket = min(len(_EDGE_WIDTHS) - 1, int(len(_EDGE_WIDTHS) * math.sqrt(abs(w) / top)))
        xs, ys = segments[(sign, bucket)]
        xs += [positions[s][0], positions[t][0], None]
        ys += [positions[s][1], positions[t][1], None]
        links.append([nodes[s].id, nodes[t].id, sign])
    traces = []
    for (sign, bucket), (xs, ys) in sorted(segments.items()):
        line = {"color": _EDGE_COLOURS[sign], "width": _EDGE_WIDTHS[bucket]}
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                meta=EDGE_META,
                hoverinfo="skip",
                showlegend=False,
                opacity=_EDGE_OPACITY,
                line=line,
            )
        )
    edge_indices = list(range(offset, offset + len(traces)))
    node_indices = []
    for kind, (colour, symbol, name) in _KIND_STYLE.items():
        members = [i for i in kept if nodes[i].kind == kind]
        if not members:
            continue
        node_indices.append(offset + len(traces))
        logit = kind == "logit"
        traces.append(
            go.Scatter(
                x=[positions[i][0] for i in members],
                y=[positions[i][1] for i in members],
                mode="markers+text" if logit else "markers",
                meta=NODE_META,
                name=name,
                customdata=[nodes[i].id for i in members],
                hovertext=[hover[i] for i in members],
                hovertemplate="%{hovertext}<extra></extra>",
                textposition="top center",
                text=[token_label(nodes[i].token) for i in members] if logit else None,
                marker={
                    "color": colour,
                    "symbol": symbol,
                    "size": [sizes[i] for i in members],
                    "opacity": _NODE_OPACITY,
                    "line": {"color": "#333333", "width": 0.6},
                },
            )
        )
    group = {
        "nodes": node_indices,
        "edges": edge_indices,
        "links": links,
        "pos": {nodes[i].id: list(positions[i]) for i in kept},
    }
    return traces, group


def _row(graph: Graph, node: Node) -> int:
    if node.kind == "token":
        return 0
    if node.kind == "logit":
        return graph.n_layers + 1
    return int(node.layer) + 1


def _positions(graph: Graph, nodes: list[Node]) -> dict[int, tuple[float, float]]:
    """(x, y) of each node index; nodes sharing a cell are spread evenly across its width, and
    the logits along the top row, ending at the last position."""
    cells: dict[tuple[int, int], list[Node]] = defaultdict(list)
    for node in nodes:
        cells[(node.pos, _row(graph, node))].append(node)
    out = {}
    for (pos, row), members in cells.items():
        n = len(members)
        if row == graph.n_layers + 1:
            spread = min(0.7 * (n - 1), graph.n_tokens - 1.0)
            start = pos - spread
        else:
            spread = min(_CELL_WIDTH, 0.14 * (n - 1))
            start = pos - spread / 2
        for k, node in enumerate(members):
            out[node.index] = (start + (spread * k / (n - 1) if n > 1 else spread / 2), float(row))
    return out


def _default_title(graph: Graph, edge_threshold: float) -> str:
    prompt = graph.prompt if len(graph.prompt) <= 80 else graph.prompt[:77] + "…"
    model = f" · {html.escape(graph.model_name, quote=False)}" if graph.model_name else ""
    return f"Attribution graph: “{token_label(prompt)}”{model} · edge threshold {edge_threshold:g}"


def _annotation(
    node: Node, labels: Mapping[str, str] | None, cards: Mapping[str, FeatureCard] | None
) -> tuple[str | None, FeatureCard | None]:
    """A node's label (from `labels`, else its card's) and its feature card, where given."""
    card = None
    if cards is not None and node.kind == "feature":
        card = cards.get(f"{node.layer}/{node.feature}")
    label = labels.get(node.id) if labels is not None else None
    if label is None and card is not None:
        label = card.label
    return label, card


def _hover(node: Node, influence: float, label: str | None, card: FeatureCard | None) -> str:
    """Hover text of one node (every piece of graph or card text escaped)."""
    lines = [f"<b>{html.escape(node.id, quote=False)}</b>"]
    if label:
        lines.append(html.escape(label, quote=False))
    where = f"layer {node.layer}, " if node.layer is not None else ""
    lines.append(f"{node.kind} · {where}pos {node.pos} · token “{token_label(node.token)}”")
    if node.kind == "logit":
        lines.append(f"probability: {node.activation:.4g}")
    elif node.activation is not None:
        lines.append(f"activation: {node.activation:.4g}")
    lines.append(f"influence: {influence:.4g}")
    if card is not None and card.contexts:
        lines.append("top contexts:")
        for context in card.contexts[:3]:
            text = _context_text(context.tokens, context.focus)
            lines.append(f"  {text} ({context.activation:.3g})")
    return "<br>".join(lines)


def _context_text(tokens: Sequence[str], focus: int, radius: int = 6) -> str:
    """Up to `radius` tokens either side of the focus token, which is bold; escaped."""
    lo, hi = max(0, focus - radius), min(len(tokens), focus + radius + 1)
    parts = [f"<b>{token_label(t)}</b>" if i == focus else token_label(t) for i, t in zip(range(lo, hi), tokens[lo:hi])]
    return ("…" if lo > 0 else "") + "".join(parts) + ("…" if hi < len(tokens) else "")


__all__ = [
    "DEFAULT_MAX_EDGES",
    "DEFAULT_THRESHOLDS",
    "EDGE_META",
    "HIGHLIGHT_META",
    "NODE_META",
    "graph_figure",
    "graph_html",
    "save_graph_html",
    "token_label",
]
