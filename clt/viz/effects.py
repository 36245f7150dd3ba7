"""The figure of an intervention's effects: what the graph predicted against what was measured."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from clt.attribution.effects import InterventionEffects

_PREDICTED, _MEASURED = "#9ecae1", "#08519c"


def intervention_effects_figure(effects: InterventionEffects, *, max_features: int = 40) -> go.Figure:
    """Two panels: the change of each target logit (minus the mean logit), predicted (edges × Δa/a)
    and measured, as bars; and each downstream feature's pre-activation change, measured against
    predicted (on the diagonal where the graph is right), the `max_features` largest labelled."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    logits = [k for k, kind in enumerate(effects.kinds) if kind == "logit"]
    features = [k for k, kind in enumerate(effects.kinds) if kind == "feature"]
    if not logits and not features:
        raise ValueError("the effects have no targets: the graph has no other features and no logits")
    sources = ", ".join(effects.sources[:4]) + (" …" if len(effects.sources) > 4 else "")
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.45, 0.55],
        subplot_titles=("target logits (minus mean logit)", "downstream features (pre-activation)"),
    )
    names = [effects.labels[k] for k in logits]
    for values, name, color in (
        (effects.predicted, "predicted", _PREDICTED),
        (effects.measured, "measured", _MEASURED),
    ):
        fig.add_trace(
            go.Bar(x=names, y=[float(values[k]) for k in logits], name=name, marker_color=color), row=1, col=1
        )
    if features:
        predicted = [float(effects.predicted[k]) for k in features]
        measured = [float(effects.measured[k]) for k in features]
        size = sorted(range(len(features)), key=lambda j: -abs(measured[j]))[:max_features]
        fig.add_trace(
            go.Scatter(
                x=predicted,
                y=measured,
                mode="markers",
                name="features",
                marker={"color": _MEASURED, "size": 7, "opacity": 0.8},
                text=[effects.labels[k] if j in set(size) else "" for j, k in enumerate(features)],
                customdata=[effects.node_ids[k] for k in features],
                hovertemplate="%{customdata}<br>predicted %{x:.4g}<br>measured %{y:.4g}<extra></extra>",
                showlegend=False,
            ),
            row=1,
            col=2,
        )
        low, high = min(predicted + measured), max(predicted + measured)
        fig.add_trace(
            go.Scatter(
                x=[low, high],
                y=[low, high],
                mode="lines",
                line={"color": "#999", "dash": "dot"},
                name="measured = predicted",
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="predicted Δ", row=1, col=2)
    fig.update_yaxes(title_text="measured Δ", row=1, col=2)
    fig.update_yaxes(title_text="Δ logit", row=1, col=1)
    fig.update_layout(
        title={"text": f"Effects of changing {sources}: graph prediction vs intervention"},
        barmode="group",
        plot_bgcolor="white",
        height=460,
    )
    return fig


__all__ = ["intervention_effects_figure"]
