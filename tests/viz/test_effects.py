"""The intervention-effects figure on a real intervention of a tiny model."""

from __future__ import annotations

import pytest
from helpers import random_transcoder

from clt.attribution import ReplacementModel, attribute, intervene, intervention_effects
from clt.viz import intervention_effects_figure, save_figure_html

PROMPT = "The for statement iterates"


def test_figure_shows_predicted_and_measured_logits_and_features(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model, cross_layer=True, decoder_scale=0.3), tokenizer)
    graph = attribute(PROMPT, rm, progress=False, max_n_logits=3)
    layer, pos, feature = graph.features[0].tolist()
    result = intervene(rm, None, PROMPT, [(layer, pos, feature, 0.0)], freeze_attention=True, constrained_layers="all")
    effects = intervention_effects(graph, result)
    fig = intervention_effects_figure(effects, max_features=5)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["predicted", "measured"]
    assert list(bars[1].y) == pytest.approx(effects.measured[-graph.n_logits :].tolist())
    assert len(bars[0].x) == graph.n_logits
    points = next(t for t in fig.data if t.type == "scatter" and t.mode == "markers")
    assert len(points.x) == graph.n_features - 1 and sum(bool(t) for t in points.text) == 5
    assert effects.sources[0] in fig.layout.title.text
    frame = effects.to_frame()
    assert list(frame.columns) == ["node_id", "kind", "label", "predicted", "measured"]
    assert save_figure_html(fig, tmp_path / "effects.html").stat().st_size > 1000
