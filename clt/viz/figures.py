"""Plotly figures of feature cards, training runs and per-layer metrics; standalone HTML files.

All token text is HTML-escaped (`token_label`) before it reaches a figure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clt.files import atomic_write_text
from clt.viz.text import token_label

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from clt.interp.features import Context, FeatureCard
    from clt.training.metrics import ReconstructionMetrics

_PROMOTED, _SUPPRESSED = "#2166ac", "#d6604d"

# panel title, metrics keys drawn in it (the names in the trainer's metrics.jsonl)
_TRAINING_PANELS = (
    ("loss", ("total", "reconstruction", "sparsity", "preactivation", "auxiliary")),
    ("FVU", ("fvu",)),
    ("L0 (active features per token)", ("l0",)),
    ("dead fraction", ("dead_fraction",)),
    ("learning rate", ("lr",)),
    ("sparsity λ", ("sparsity_lambda",)),
)
_OPTIONAL_TERMS = ("sparsity", "preactivation", "auxiliary")  # drawn only when not all zero


def feature_card_figure(card: FeatureCard, *, n_contexts: int = 8, radius: int = 8) -> go.Figure:
    """One feature's card: activation histogram, promoted/suppressed output tokens, and its top
    contexts (up to `n_contexts`, `radius` tokens either side of the focus token, aligned on it,
    shaded by activation, focus token bold)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if len(card.bin_edges) != len(card.histogram) + 1:
        raise ValueError(
            f"card {card.key} has {len(card.histogram)} histogram bins but "
            f"{len(card.bin_edges)} bin edges (expected {len(card.histogram) + 1})"
        )
    fig = make_subplots(
        rows=2,
        cols=2,
        row_heights=[0.38, 0.62],
        vertical_spacing=0.14,
        specs=[[{}, {}], [{"colspan": 2}, None]],
        subplot_titles=("activation histogram (where it fires)", "output tokens", "top activating contexts"),
    )
    edges = card.bin_edges
    fig.add_trace(
        go.Bar(
            x=[(a + b) / 2 for a, b in pairwise(edges)],
            y=card.histogram,
            width=[b - a for a, b in pairwise(edges)],
            marker_color="#f58518",
            name="activations",
            showlegend=False,
            hovertemplate="activation %{x:.3g}: %{y} tokens<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.update_xaxes(title_text="activation", row=1, col=1)
    fig.update_yaxes(title_text="tokens", row=1, col=1)

    logits = [*card.top_logits, *card.bottom_logits]
    if logits:
        shown = [token_label(t) for t, _ in logits]
        fig.add_trace(
            go.Bar(
                x=[v for _, v in logits],
                y=list(range(len(logits))),
                orientation="h",
                hovertext=shown,
                showlegend=False,
                marker_color=[_PROMOTED if v >= 0 else _SUPPRESSED for _, v in logits],
                hovertemplate="“%{hovertext}”: %{x:.3g}<extra></extra>",
            ),
            row=1,
            col=2,
        )
        fig.update_yaxes(
            tickmode="array", tickvals=list(range(len(logits))), ticktext=shown, autorange="reversed", row=1, col=2
        )
        fig.update_xaxes(title_text="direct logit effect", row=1, col=2)
    else:
        _note(fig, "no unembedding was given when the cards were built", "x2", "y2")

    contexts = card.contexts[:n_contexts]
    if contexts:
        z, text, hover = _context_grid(contexts, radius)
        fig.add_trace(
            go.Heatmap(
                z=z,
                text=text,
                hovertext=hover,
                texttemplate="%{text}",
                textfont={"size": 12},
                hovertemplate="%{hovertext}<extra></extra>",
                colorscale="Oranges",
                zmin=0,
                zmax=max(card.max_activation, 1e-9),
                xgap=2,
                ygap=2,
                colorbar={"title": {"text": "act."}, "len": 0.55, "y": 0.28},
            ),
            row=2,
            col=1,
        )
        ranks = [f"#{i + 1} ({c.activation:.3g})" for i, c in enumerate(contexts)]
        fig.update_yaxes(
            tickmode="array", tickvals=list(range(len(contexts))), ticktext=ranks, autorange="reversed", row=2, col=1
        )
        fig.update_xaxes(showticklabels=False, row=2, col=1)
    else:
        _note(fig, "the feature never fired on the scanned tokens", "x3", "y3")
    label = f": {token_label(card.label)}" if card.label else ""
    fig.update_layout(
        title={
            "text": f"Feature {card.layer}/{card.feature}{label} · density "
            f"{card.density:.3%} · max {card.max_activation:.3g}"
        },
        height=760,
        plot_bgcolor="white",
        bargap=0.05,
    )
    return fig


def _context_grid(contexts: Sequence[Context], radius: int) -> tuple[list, list, list]:
    """Heatmap z, cell text and hover text with every context's focus token in one column."""
    left = min(radius, max(c.focus for c in contexts))
    right = min(radius, max(len(c.tokens) - c.focus - 1 for c in contexts))
    width = left + right + 1
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    hover: list[list[str]] = []
    for context in contexts:
        row_z: list[float | None] = [None] * width
        row_text, row_hover = [""] * width, [""] * width
        for i, (token, act) in enumerate(zip(context.tokens, context.activations)):
            column = i - context.focus + left
            if 0 <= column < width:
                shown = token_label(token)
                row_z[column] = act
                row_text[column] = f"<b>{shown}</b>" if i == context.focus else shown
                row_hover[column] = f"“{shown}”: {act:.3g}"
        z.append(row_z)
        text.append(row_text)
        hover.append(row_hover)
    return z, text, hover


def _note(fig: go.Figure, text: str, xref: str, yref: str) -> None:
    fig.add_annotation(
        text=text,
        xref=f"{xref} domain",
        yref=f"{yref} domain",
        x=0.5,
        y=0.5,
        showarrow=False,
        font={"color": "#777777"},
    )


def read_metrics(source: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Training records from a metrics.jsonl path or from dicts (e.g. `trainer.history`)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no metrics file at {path} (the trainer writes output_dir/metrics.jsonl)")
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not a JSON record ({err})") from err
    else:
        records = [dict(r) for r in source]
    if not records:
        raise ValueError("no training records to plot (the metrics file or history is empty)")
    if not all("step" in r for r in records):
        raise ValueError("every training record needs a 'step' (as in the trainer's metrics.jsonl)")
    return records


def training_curves_figure(metrics: str | Path | Iterable[Mapping[str, Any]]) -> go.Figure:
    """Loss terms, FVU, L0, dead fraction, learning rate and sparsity λ against the step, from a
    metrics.jsonl path or records (`trainer.history`); loss terms always zero are left out."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = sorted(read_metrics(metrics), key=lambda r: r["step"])
    fig = make_subplots(
        rows=3,
        cols=2,
        subplot_titles=[title for title, _ in _TRAINING_PANELS],
        vertical_spacing=0.1,
        horizontal_spacing=0.1,
    )
    for k, (title, keys) in enumerate(_TRAINING_PANELS):
        row, col = k // 2 + 1, k % 2 + 1
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not points or (key in _OPTIONAL_TERMS and not any(v for _, v in points)):
                continue
            drawn = True
            fig.add_trace(
                go.Scatter(
                    x=[s for s, _ in points],
                    y=[v for _, v in points],
                    mode="lines",
                    name=key,
                    legendgroup=title,
                    showlegend=len(keys) > 1,
                ),
                row=row,
                col=col,
            )
        if not drawn:
            axis = "" if k == 0 else str(k + 1)
            _note(fig, "not logged", f"x{axis}", f"y{axis}")
        fig.update_xaxes(title_text="step", row=row, col=col)
    fig.update_layout(title={"text": "Training"}, height=900, plot_bgcolor="white")
    return fig


def layer_metrics_figure(
    fvu_per_layer: Sequence[float] | ReconstructionMetrics,
    l0_per_layer: Sequence[float] | None = None,
    *,
    layers: Sequence[int] | None = None,
) -> go.Figure:
    """Bars of FVU and L0 per layer; pass both lists, or a `ReconstructionMetrics` alone."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if hasattr(fvu_per_layer, "fvu_per_layer"):
        if l0_per_layer is not None:
            raise ValueError("pass either a ReconstructionMetrics or the two per-layer lists")
        fvu_per_layer, l0_per_layer = fvu_per_layer.fvu_per_layer, fvu_per_layer.l0_per_layer
    if l0_per_layer is None:
        raise ValueError("l0_per_layer is missing: pass it, or a ReconstructionMetrics alone")
    fvu, l0 = [float(v) for v in fvu_per_layer], [float(v) for v in l0_per_layer]
    if len(fvu) != len(l0):
        raise ValueError(f"{len(fvu)} FVU values but {len(l0)} L0 values: give one of each per layer")
    names = list(layers) if layers is not None else list(range(len(fvu)))
    if len(names) != len(fvu):
        raise ValueError(f"{len(names)} layer names for {len(fvu)} layers")
    x = [str(n) for n in names]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("FVU per layer", "L0 per layer"))
    fig.add_trace(go.Bar(x=x, y=fvu, name="FVU", marker_color="#4c78a8"), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=l0, name="L0", marker_color="#f58518"), row=1, col=2)
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_layout(title={"text": "Reconstruction by layer"}, showlegend=False, plot_bgcolor="white", height=420)
    return fig


def pareto_figure(
    rows: Iterable[Mapping[str, Any]],
    *,
    x: str = "L0",
    y: str = "FVU",
    label: str = "dictionary",
    title: str = "Sparsity vs reconstruction",
) -> go.Figure:
    """FVU against L0 (or any two numeric keys), one trace per dictionary type: a point, or a line
    through a sweep's points in order of x; rows missing x or y are left out."""
    import plotly.graph_objects as go

    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if label not in row:
            raise ValueError(f"a row has no {label!r} key: give each row its dictionary's name")
        values = row.get(x), row.get(y)
        if all(isinstance(v, (int, float)) and not math.isnan(v) for v in values):
            groups.setdefault(str(row[label]), []).append((float(values[0]), float(values[1])))
    if not groups:
        raise ValueError(f"no row has numbers for both {x!r} and {y!r}")
    fig = go.Figure()
    for name, points in groups.items():
        points.sort()
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[p[1] for p in points],
                name=token_label(name),
                mode="lines+markers" if len(points) > 1 else "markers",
                marker={"size": 10},
                hovertemplate=f"{token_label(name)}<br>{x} %{{x:.3g}}<br>{y} %{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_layout(
        title={"text": title},
        xaxis_title=f"{x} (active features per token, all layers)" if x == "L0" else x,
        yaxis_title=y,
        plot_bgcolor="white",
        height=520,
        legend={"title": {"text": label}},
    )
    fig.update_xaxes(showgrid=True, gridcolor="#eee")
    fig.update_yaxes(showgrid=True, gridcolor="#eee")
    return fig


def save_figure_html(fig: go.Figure, path: str | Path) -> Path:
    """Write a figure as a standalone HTML page, plotly.js inline (atomically); opens offline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})
    atomic_write_text(page, path)
    return path


__all__ = [
    "feature_card_figure",
    "layer_metrics_figure",
    "pareto_figure",
    "read_metrics",
    "save_figure_html",
    "training_curves_figure",
]
