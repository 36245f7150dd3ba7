"""The graph page: one self-contained HTML file (plotly.js inline, once) to work in, offline.

What it shows: the pruned graph laid out by `clt.viz.layout` (columns = token positions, rows =
layers, logits in their own column), each node with its `edges_per_node` strongest kept input and
output edges (width and colour by weight); a node-threshold selector, a link-mode selector
(upstream / downstream / both), a switch that hides the error nodes. Clicking a node selects it:
its upstream and/or downstream set (over the kept edges) stays bright, the feature panel shows its
card (top contexts shaded by activation, histogram, promoted and suppressed tokens, density,
label, editable), the connections panel its input and output edges, sorted and clickable.
Ctrl/Cmd-click pins nodes; the subgraph panel shows the pinned subgraph's replacement and
completeness scores — `subgraph_scores(graph, pinned features)` (`clt.attribution.prune`), computed
in the page. Pinned nodes can be grouped into a supernode (one node with the summed edges of its
members, ungroupable), or alike features grouped automatically (`suggest_supernodes`). The state
(pins, supernodes, labels, view) is saved to a JSON file and to the URL fragment, and read back by
`Graph.load_state` (`clt.attribution.state`).

What it holds (one JSON block, ``<script id="clt-data">``): the page's nodes — every feature kept at
some threshold (at most `max_features`, and at most `max_nonzeros` matrix entries, most influential
first), all error, token and logit nodes — with positions, sizes and the thresholds they are kept
at; the rows of the page's features and logits of the adjacency in which every feature *not* on the
page is merged into its error node (exact for the subgraph scores of any set of page features:
merging is order-free), as two sparse blocks (feature and token columns in the adjacency's float32,
error columns in float64) with a bit per threshold marking the pruned edges; the cards of the
page's features; the suggested supernodes; the whole graph's scores.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import logging
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from clt.attribution.adjacency import count_nonzeros, dense_rows
from clt.attribution.graph import Graph
from clt.attribution.groups import suggest_supernodes
from clt.attribution.prune import PruneResult, graph_scores, merged_rows, node_influence, prune
from clt.attribution.state import GraphState
from clt.files import atomic_write_text
from clt.viz.graph import DEFAULT_THRESHOLDS, default_title, node_annotation, threshold_levels
from clt.viz.layout import axes, marker_sizes, max_cell_rows, node_positions, row_of
from clt.viz.text import script_json

if TYPE_CHECKING:
    from clt.interp.features import FeatureCard

logger = logging.getLogger(__name__)

PAGE_VERSION = 1
DEFAULT_EDGES_PER_NODE = 2
DEFAULT_MAX_FEATURES = 1500
DEFAULT_MAX_NONZEROS = 1_000_000
"""Matrix entries a page holds at most (~12 bytes each in the file)."""
_SCRIPTS = ("model.js", "view.js", "panels.js", "app.js")
_KIND_CODE = {"feature": "f", "error": "e", "token": "t", "logit": "l"}
_CHUNK = 256


@dataclasses.dataclass
class GraphPage:
    """A built graph page: its HTML, shown inline in Jupyter (an iframe) and saved to a file."""

    html: str
    height: int = 900
    """Height of the inline frame in pixels."""

    def _repr_html_(self) -> str:
        source = html.escape(self.html, quote=True)
        return f'<iframe srcdoc="{source}" style="width:100%;height:{self.height}px;border:1px solid #ddd"></iframe>'

    def save(self, path: str | Path) -> Path:
        """Write the page (atomically); it opens offline."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.html, path)
        return path


def graph_page(graph: Graph, **kwargs: Any) -> GraphPage:
    """The graph page of `graph` (options: `graph_html`); displays inline in Jupyter."""
    return GraphPage(graph_html(graph, **kwargs))


def graph_html(graph: Graph, **kwargs: Any) -> str:
    """The graph page as one HTML string (module docstring; options: `page_data`)."""
    from plotly.io.json import to_json_plotly
    from plotly.offline import get_plotlyjs

    data, layout = page_data(graph, **kwargs)
    static = files("clt.viz").joinpath("static")
    scripts = "\n".join(static.joinpath(name).read_text(encoding="utf-8") for name in _SCRIPTS)
    title = html.escape(data["title"], quote=False)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title>\n<style>{static.joinpath('page.css').read_text(encoding='utf-8')}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
        f"{static.joinpath('page.html').read_text(encoding='utf-8')}\n"
        f'<script type="application/json" id="clt-data">{script_json(data)}</script>\n'
        f'<script type="application/json" id="clt-layout">{to_json_plotly(layout)}</script>\n'
        f"<script>\n{scripts}\n</script>\n</body></html>\n"
    )


def save_graph_html(graph: Graph, path: str | Path, **kwargs: Any) -> Path:
    """Write `graph_html(graph, **kwargs)` to `path` (atomically); it opens offline."""
    return GraphPage(graph_html(graph, **kwargs)).save(path)


class PageSelection(NamedTuple):
    """What a page shows: its node thresholds, their pruning, node influence and its features."""

    levels: list[float]
    active: int
    """Index in `levels` of the threshold the page opens at."""
    results: list[PruneResult]
    influence: Tensor
    features: Tensor
    """Indices (sorted) of the feature nodes on the page."""


def select_page(
    graph: Graph,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_features: int = DEFAULT_MAX_FEATURES,
    max_nonzeros: int = DEFAULT_MAX_NONZEROS,
) -> PageSelection:
    """The features a page of `graph` holds: those kept at some threshold, the active threshold's
    first, most influential first, within `max_features` and `max_nonzeros` matrix entries."""
    levels = threshold_levels(node_threshold, thresholds)
    if len(levels) > 8:
        raise ValueError(f"a page holds at most 8 node thresholds, got {len(levels)}: {levels}")
    active = levels.index(float(node_threshold))
    influence = node_influence(graph.adjacency, graph.logit_weights())
    results = [
        prune(graph, node_threshold=level, edge_threshold=edge_threshold, node_scores=influence) for level in levels
    ]
    features = _page_features(graph, results, active, influence, max_features, max_nonzeros)
    return PageSelection(levels, active, results, influence, features)


def page_data(
    graph: Graph,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    labels: Mapping[str, str] | None = None,
    cards: Mapping[str, FeatureCard] | None = None,
    title: str | None = None,
    edges_per_node: int = DEFAULT_EDGES_PER_NODE,
    max_features: int = DEFAULT_MAX_FEATURES,
    max_nonzeros: int = DEFAULT_MAX_NONZEROS,
    state: GraphState | Mapping[str, Any] | None = None,
    selection: PageSelection | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The page's data and its plotly layout (module docstring).

    `labels` maps node ids to labels; `cards` (keyed ``"{model layer}/{feature}"``) gives the
    feature panel and default labels; `title` is plain text; `state` (a `GraphState` or its dict) is
    applied when the page's URL holds none; `selection` (from `select_page` with the same
    thresholds) saves pruning the graph again.
    """
    if edges_per_node < 0:
        raise ValueError(f"edges_per_node must be >= 0, got {edges_per_node}")
    if selection is None:
        selection = select_page(
            graph,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
            thresholds=thresholds,
            max_features=max_features,
            max_nonzeros=max_nonzeros,
        )
    levels, active, results, influence, features = selection
    others = torch.arange(graph.n_features, graph.n_nodes)
    nodes = torch.cat([features, others])  # page order: features, errors, tokens, logits
    page_index = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    page_index[nodes] = torch.arange(len(nodes))
    shown = torch.stack([r.node_mask for r in results]).any(0)
    positions = node_positions(graph, [i for i in nodes.tolist() if shown[i]], influence.tolist())
    node_table, card_table = _nodes(graph, nodes, page_index, results, influence, positions, labels, cards)
    rows = torch.cat([features, torch.arange(graph.logit_slice.start, graph.n_nodes)])
    feature_columns = torch.cat([features, torch.arange(graph.token_slice.start, graph.token_slice.stop)])
    error_columns = torch.arange(graph.error_slice.start, graph.error_slice.stop)
    blocks = _blocks(graph, rows, features, feature_columns, error_columns, page_index, results)
    visible = [i for i in nodes.tolist() if results[active].node_mask[i]]
    node_labels = {i: label for i, label in zip(node_table["id"], node_table["label"]) if label}
    suggestions = suggest_supernodes(graph, visible, labels=node_labels)
    if isinstance(state, GraphState):
        state = state.check(graph).to_dict()
    elif state is not None:
        state = GraphState.read(state).check(graph).to_dict()
    data = {
        "version": PAGE_VERSION,
        "title": title if title is not None else html.unescape(default_title(graph, edge_threshold)),
        "prompt": graph.prompt,
        "model": graph.model_name,
        "tokens": list(graph.tokens),
        "n_layers": graph.n_layers,
        "n_features": graph.n_features,
        "levels": levels,
        "level": active,
        "edge_threshold": edge_threshold,
        "edges_per_node": edges_per_node,
        "graph_scores": list(graph_scores(graph)),
        "nodes": node_table,
        "rows": page_index[rows].tolist(),
        "blocks": blocks,
        "cards": card_table,
        "suggestions": [[label, members] for label, members in suggestions],
        "state": state,
    }
    layout = {
        **axes(graph, max_cell_rows(graph, positions)),
        "plot_bgcolor": "white",
        "hovermode": "closest",
        "showlegend": False,
        "margin": {"t": 24, "b": 90, "l": 80, "r": 24},
        "uirevision": "clt",
    }
    return data, layout


def _page_features(
    graph: Graph, results: list[PruneResult], active: int, influence: Tensor, max_features: int, max_nonzeros: int
) -> Tensor:
    """Indices (sorted) of the features on the page (`select_page`)."""
    kept = torch.stack([r.node_mask[: graph.n_features] for r in results]).any(0).nonzero().squeeze(1)
    at_active = results[active].node_mask[kept]
    order = sorted(range(len(kept)), key=lambda k: (not bool(at_active[k]), -float(influence[kept[k]])))
    candidates = kept[torch.tensor(order, dtype=torch.long)][:max_features]
    columns = torch.cat([candidates, torch.arange(graph.n_features, graph.logit_slice.start)])
    counts = count_nonzeros(graph.adjacency, candidates, columns, _CHUNK)
    logits = torch.arange(graph.logit_slice.start, graph.logit_slice.stop)
    budget = max_nonzeros - int(count_nonzeros(graph.adjacency, logits, columns).sum())
    take = int((counts.cumsum(0) <= budget).sum())
    if take < len(kept):
        logger.warning(
            "the page holds %d of the %d features kept at some threshold (max_features=%d, max_nonzeros=%d); "
            "the others count as error nodes there",
            take,
            len(kept),
            max_features,
            max_nonzeros,
        )
    return candidates[:take].sort().values


def _nodes(
    graph: Graph,
    nodes: Tensor,
    page_index: Tensor,
    results: list[PruneResult],
    influence: Tensor,
    positions: dict[int, tuple[float, float]],
    labels: Mapping[str, str] | None,
    cards: Mapping[str, FeatureCard] | None,
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Column table of the page's nodes, and the cards of its features by card key."""
    masks = torch.stack([r.node_mask for r in results])  # [levels, n_nodes]
    bits = (masks.long() << torch.arange(len(results))[:, None]).sum(0)
    sizes = marker_sizes((influence + graph.logit_weights()).tolist())
    table: dict[str, list[Any]] = {
        key: [] for key in ("id", "kind", "layer", "pos", "feature", "token", "act", "infl", "x", "y", "size")
    }
    table |= {"levels": [], "err": [], "card": [], "label": []}
    card_table: dict[str, Any] = {}
    for index in nodes.tolist():
        node = graph.node(index)
        label, card = node_annotation(node, labels, cards)
        x, y = positions.get(index, (float(node.pos), float(row_of(graph, node))))
        error = -1
        if node.kind == "feature":
            error = int(page_index[graph.error_slice.start + node.layer * graph.n_tokens + node.pos])
        values = (node.id, _KIND_CODE[node.kind], node.layer, node.pos, node.feature, node.token, node.activation)
        for key, value in zip(("id", "kind", "layer", "pos", "feature", "token", "act"), values):
            table[key].append(value)
        table["infl"].append(float(influence[index]))
        table["x"].append(round(x, 5))
        table["y"].append(round(y, 5))
        table["size"].append(round(sizes[index], 3))
        table["levels"].append(int(bits[index]))
        table["err"].append(error)
        table["card"].append(card.key if card is not None else "")
        table["label"].append(label or "")
        if card is not None:
            card_table[card.key] = _rounded(dataclasses.asdict(card))
    return table, card_table


def _rounded(value: Any) -> Any:
    """`value` with every float rounded to 4 significant digits (what the panel shows; half the bytes)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _blocks(
    graph: Graph,
    rows: Tensor,
    features: Tensor,
    feature_columns: Tensor,
    error_columns: Tensor,
    page_index: Tensor,
    results: list[PruneResult],
) -> dict[str, dict[str, Any]]:
    """The page matrix's two sparse row blocks (module docstring), base64-encoded."""
    merged = torch.ones(graph.n_features, dtype=torch.bool)
    merged[features] = False
    merged = merged.nonzero().squeeze(1)
    exact = torch.float64 if graph.adjacency.dtype == torch.float64 else torch.float32
    parts: dict[str, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {"features": [], "errors": []}
    for chunk in rows.split(_CHUNK):
        block = merged_rows(graph, chunk, merged)
        for name, columns in (("features", feature_columns), ("errors", error_columns)):
            values = block[:, columns]
            levels = torch.zeros(values.shape, dtype=torch.uint8)
            for k, result in enumerate(results):
                levels |= dense_rows(result.edge_mask, chunk)[:, columns].to(torch.uint8) << k
            mask = values != 0
            r, c = mask.nonzero(as_tuple=True)
            parts[name].append((mask.sum(1), page_index[columns[c]], values[r, c], levels[r, c]))
    index_type = np.uint16 if len(page_index) < 2**16 else np.uint32
    out = {}
    for name, dtype in (("features", exact), ("errors", torch.float64)):
        counts, indices, values, levels = (torch.cat(p) for p in zip(*parts[name]))
        out[name] = {
            "indptr": _array(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).numpy().astype(np.int32)),
            "indices": _array(indices.numpy().astype(index_type)),
            "values": _array(values.to(dtype).numpy()),
            "levels": _array(levels.numpy()),
        }
    return out


def _array(array: np.ndarray) -> dict[str, str]:
    """dtype and base64 little-endian bytes of a 1-d array (decoded by the page's script)."""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": array.dtype.name, "data": base64.b64encode(little.tobytes()).decode("ascii")}


__all__ = [
    "DEFAULT_EDGES_PER_NODE",
    "DEFAULT_MAX_FEATURES",
    "DEFAULT_MAX_NONZEROS",
    "GraphPage",
    "PageSelection",
    "graph_html",
    "graph_page",
    "page_data",
    "save_graph_html",
    "select_page",
]
