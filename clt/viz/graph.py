"""Interactive plotly figure of an attribution graph (for notebooks); the graph page is `clt.viz.page`.

Layout (`clt.viz.layout`): x is the token position, y the row (embeddings, layers, logits in their
own column right of the last position). Colour and marker symbol show the node kind, marker size
grows with influence (`prune.node_influence`, plus the probability for logits); edges are line
segments, blue for positive and red for negative weights, thicker for larger |weight|.

A slider switches between the pruned graphs of several node thresholds (`thresholds`); each
threshold owns its own traces and only the active one is visible.

All text from the graph (tokens, labels, contexts) is HTML-escaped before it reaches the figure.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from clt.attribution.adjacency import mask_entries, same_layout, values_at
from clt.attribution.graph import Graph, Node
from clt.attribution.prune import PruneResult, edge_influence, node_influence, prune
from clt.viz.layout import axes, marker_sizes, max_cell_rows, node_positions
from clt.viz.text import token_label

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from clt.interp.features import FeatureCard

NODE_META = "nodes"
"""`meta` of every trace that draws node markers (one trace per node kind and threshold)."""
EDGE_META = "edges"
"""`meta` of the edge traces (lines only, no markers)."""
DEFAULT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
DEFAULT_MAX_EDGES = 2000
"""Most edges drawn per threshold (the strongest by edge influence)."""

KIND_STYLE = {  # colour, marker symbol, legend name
    "token": ("#54a24b", "square", "token embedding"),
    "feature": ("#f58518", "circle", "feature"),
    "error": ("#b0b0b0", "diamond", "error"),
    "logit": ("#4c78a8", "hexagon", "logit"),
}
EDGE_COLOURS = {1: "#2166ac", -1: "#d6604d"}
_EDGE_WIDTHS = (0.6, 1.6, 3.2)
_EDGE_OPACITY = 0.55
_NODE_OPACITY = 0.9


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

    `labels` maps node ids to labels; `cards` (e.g. `FeatureCards`, keyed ``"{model layer}/{feature}"``)
    gives feature labels and top contexts for the hover text; `title` is plain text (escaped). The
    slider starts at `node_threshold`, which is added to `thresholds` when missing. At most
    `max_edges` edges are drawn per threshold (those with the highest edge influence; None draws
    all): a pruned graph of thousands of features keeps tens of thousands of edges.

    Node markers: the visible traces whose ``meta == "nodes"``; in Python
    ``sum(len(t.x) for t in fig.data if t.meta == "nodes" and t.visible)`` equals the number of
    nodes kept by ``prune(graph, node_threshold, edge_threshold)``.
    """
    import plotly.graph_objects as go

    levels = threshold_levels(node_threshold, thresholds)
    active = levels.index(float(node_threshold))
    influence = node_influence(graph.adjacency, graph.logit_weights())
    sizes = marker_sizes((influence + graph.logit_weights()).tolist())
    nodes = graph.nodes
    hover = [_hover(n, float(influence[n.index]), *node_annotation(n, labels, cards)) for n in nodes]
    results = [prune(graph, node_threshold=level, edge_threshold=edge_threshold) for level in levels]
    union = torch.stack([r.node_mask for r in results]).any(0).nonzero().squeeze(1).tolist()
    positions = node_positions(graph, union, influence.tolist())

    traces: list[Any] = []
    spans: list[range] = []
    for result in results:
        new = _threshold_traces(graph, nodes, _capped(graph, result, max_edges), sizes, hover, positions)
        spans.append(range(len(traces), len(traces) + len(new)))
        traces.extend(new)
    visible = [[i in span for i in range(len(traces))] for span in spans]
    for trace, shown in zip(traces, visible[active]):
        trace.visible = shown
    fig = go.Figure(traces)
    title = default_title(graph, edge_threshold) if title is None else html.escape(title, quote=False)
    steps = [
        {"label": f"{level:g}", "method": "update", "args": [{"visible": shown}, {}]}
        for level, shown in zip(levels, visible)
    ]
    fig.update_layout(
        **axes(graph, max_cell_rows(graph, positions)),
        title={"text": title, "x": 0.01},
        plot_bgcolor="white",
        hovermode="closest",
        margin={"t": 60, "b": 150},
        sliders=[{"active": active, "currentvalue": {"prefix": "node threshold: "}, "pad": {"t": 70}, "steps": steps}],
    )
    return fig


def threshold_levels(node_threshold: float, thresholds: Sequence[float]) -> list[float]:
    """The sorted node thresholds of a figure or page: `thresholds` plus `node_threshold`, checked."""
    levels = sorted({float(t) for t in thresholds} | {float(node_threshold)})
    for value in levels:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"node thresholds must be in [0, 1], got {value}")
    return levels


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


def _threshold_traces(
    graph: Graph,
    nodes: list[Node],
    result: PruneResult,
    sizes: list[float],
    hover: list[str],
    positions: dict[int, tuple[float, float]],
) -> list[Any]:
    """Edge and node traces of one pruned graph."""
    import plotly.graph_objects as go

    kept = result.node_mask.nonzero().squeeze(1).tolist()
    edges = graph.edges_df(node_mask=result.node_mask, edge_mask=result.edge_mask)
    top = float(edges["weight"].abs().max()) if len(edges) else 1.0
    segments: dict[tuple[int, int], tuple[list[float | None], list[float | None]]] = defaultdict(lambda: ([], []))
    for t, s, w in zip(edges["target"].tolist(), edges["source"].tolist(), edges["weight"].tolist()):
        bucket = min(len(_EDGE_WIDTHS) - 1, int(len(_EDGE_WIDTHS) * (abs(w) / top) ** 0.5))
        xs, ys = segments[(1 if w > 0 else -1, bucket)]
        xs += [positions[s][0], positions[t][0], None]
        ys += [positions[s][1], positions[t][1], None]
    traces = [
        go.Scatter(
            x=xs,
            y=ys,
            mode="lines",
            meta=EDGE_META,
            hoverinfo="skip",
            showlegend=False,
            opacity=_EDGE_OPACITY,
            line={"color": EDGE_COLOURS[sign], "width": _EDGE_WIDTHS[bucket]},
        )
        for (sign, bucket), (xs, ys) in sorted(segments.items())
    ]
    for kind, (colour, symbol, name) in KIND_STYLE.items():
        members = [i for i in kept if nodes[i].kind == kind]
        if not members:
            continue
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
                textposition="middle right",
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
    return traces


def default_title(graph: Graph, edge_threshold: float) -> str:
    """The escaped default title: prompt, model and edge threshold."""
    prompt = graph.prompt if len(graph.prompt) <= 80 else graph.prompt[:77] + "…"
    model = f" · {html.escape(graph.model_name, quote=False)}" if graph.model_name else ""
    return f"Attribution graph: “{token_label(prompt)}”{model} · edge threshold {edge_threshold:g}"


def node_annotation(
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
    "NODE_META",
    "default_title",
    "graph_figure",
    "node_annotation",
    "threshold_levels",
]
