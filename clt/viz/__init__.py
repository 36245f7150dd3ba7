"""Visualisation: the graph page, plotly figures of graphs, feature cards, interventions and training runs.

plotly is imported when a figure or page is built, not when this package is imported.
"""

from clt.viz.effects import intervention_effects_figure
from clt.viz.figures import (
    feature_card_figure,
    layer_metrics_figure,
    pareto_figure,
    read_metrics,
    save_figure_html,
    training_curves_figure,
)
from clt.viz.graph import NODE_META, graph_figure
from clt.viz.page import GraphPage, PageSelection, graph_html, graph_page, page_data, save_graph_html, select_page
from clt.viz.text import token_label

__all__ = [
    "NODE_META",
    "GraphPage",
    "PageSelection",
    "feature_card_figure",
    "graph_figure",
    "graph_html",
    "graph_page",
    "intervention_effects_figure",
    "layer_metrics_figure",
    "page_data",
    "pareto_figure",
    "read_metrics",
    "save_figure_html",
    "save_graph_html",
    "select_page",
    "token_label",
    "training_curves_figure",
]
