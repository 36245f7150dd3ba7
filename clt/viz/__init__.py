"""Visualisation: plotly figures of graphs, feature cards and training runs; standalone HTML.

plotly is imported when a figure is built, not when this package is imported.
"""

from clt.viz.figures import (
    feature_card_figure,
    layer_metrics_figure,
    pareto_figure,
    read_metrics,
    save_figure_html,
    training_curves_figure,
)
from clt.viz.graph import NODE_META, graph_figure, graph_html, save_graph_html, token_label

__all__ = [
    "NODE_META",
    "feature_card_figure",
    "graph_figure",
    "graph_html",
    "layer_metrics_figure",
    "pareto_figure",
    "read_metrics",
    "save_figure_html",
    "save_graph_html",
    "token_label",
    "training_curves_figure",
]
