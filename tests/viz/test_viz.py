"""Graph exports (networkx, pandas) and plotly figures of tiny-llama graphs; safe offline HTML."""

from __future__ import annotations

import dataclasses
import html
import json

import networkx as nx
import pytest
import torch
from helpers import cards_with_logits, saved_store, standardised_transcoder

from clt.attribution import Graph, attribute, prune
from clt.config.transcoder import CLTConfig
from clt.interp import FeatureCard
from clt.interp.features import Context
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight.loading import find_layout
from clt.training.metrics import ReconstructionMetrics
from clt.viz import (
    NODE_META,
    feature_card_figure,
    graph_figure,
    layer_metrics_figure,
    save_figure_html,
    save_graph_html,
    token_label,
    training_curves_figure,
)

PROMPT = "The for statement iterates over the items"
NODE_T, EDGE_T = 0.99, 0.999  # the random transcoder's features only survive generous pruning
SCRIPT = "<script>alert(1)</script>"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def transcoder(tiny_llama):
    model, _ = tiny_llama
    layout = find_layout(model)
    cfg = CLTConfig(num_features=12, num_layers=layout.num_layers, d_model=layout.d_model, activation_fn="relu", seed=0)
    tc = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        tc.b_enc.copy_(torch.randn(tc.b_enc.shape, generator=gen) * 0.3)
    return tc.eval()


@pytest.fixture(scope="module")
def graph(tiny_llama, transcoder) -> Graph:
    model, tokenizer = tiny_llama
    return attribute(PROMPT, model, transcoder, tokenizer=tokenizer, progress=False)


@pytest.fixture(scope="module")
def pruned(graph):
    result = prune(graph, node_threshold=NODE_T, edge_threshold=EDGE_T)
    assert int(result.node_mask[graph.feature_slice].sum()) > 0, "no feature survives pruning"
    return result


def _nonzero_edges(graph: Graph, node_mask=None, edge_mask=None) -> dict[tuple[str, str], float]:
    keep = graph.adjacency != 0
    if edge_mask is not None:
        keep &= edge_mask
    if node_mask is not None:
        keep &= node_mask[:, None] & node_mask[None, :]
    ids = [n.id for n in graph.nodes]
    return {(ids[s], ids[t]): float(graph.adjacency[t, s]) for t, s in keep.nonzero().tolist()}


def test_networkx_round_trips_nodes_and_edges(graph, pruned):
    full = graph.to_networkx()
    assert full.number_of_nodes() == graph.n_nodes
    expected = _nonzero_edges(graph)
    assert full.number_of_edges() == len(expected) > 0
    assert {(s, t): w for s, t, w in full.edges(data="weight")} == expected
    node = graph.node(0)
    attrs = full.nodes[node.id]
    assert (attrs["kind"], attrs["layer"], attrs["pos"], attrs["feature"]) == (
        "feature",
        node.layer,
        node.pos,
        node.feature,
    )
    assert attrs["activation"] == pytest.approx(node.activation) and attrs["influence"] >= 0
    assert nx.is_directed_acyclic_graph(full)

    small = graph.to_networkx(pruned.node_mask, pruned.edge_mask)
    assert small.number_of_nodes() == int(pruned.node_mask.sum())
    kept = _nonzero_edges(graph, pruned.node_mask, pruned.edge_mask)
    assert {(s, t): w for s, t, w in small.edges(data="weight")} == kept
    assert small.number_of_edges() == int((pruned.edge_mask & (graph.adjacency != 0)).sum())


def test_dataframes_round_trip(graph, pruned):
    nodes = graph.nodes_df()
    assert list(nodes.columns) == [
        "id",
        "kind",
        "layer",
        "pos",
        "feature",
        "token",
        "token_id",
        "activation",
        "influence",
    ]
    assert len(nodes) == graph.n_nodes and list(nodes.index) == list(range(graph.n_nodes))
    assert nodes["kind"].value_counts().to_dict() == {
        k: n
        for k, n in (
            ("feature", graph.n_features),
            ("error", graph.n_errors),
            ("token", graph.n_tokens),
            ("logit", graph.n_logits),
        )
    }
    assert len(graph.nodes_df(pruned.node_mask)) == int(pruned.node_mask.sum())

    edges = graph.edges_df()
    assert list(edges.columns) == ["source_id", "target_id", "source", "target", "weight"]
    assert len(edges) == int((graph.adjacency != 0).sum())
    back = torch.zeros_like(graph.adjacency, dtype=torch.float64)
    back[torch.tensor(edges["target"].values), torch.tensor(edges["source"].values)] = torch.tensor(
        edges["weight"].values
    )
    assert torch.equal(back, graph.adjacency.double())
    ids = nodes["id"]
    assert (edges["source_id"] == ids.loc[edges["source"]].values).all()

    strong = graph.edges_df(threshold=0.1)
    assert len(strong) == int((graph.adjacency.abs() > 0.1).sum())
    assert (strong["weight"].abs() > 0.1).all()
    masked = graph.edges_df(node_mask=pruned.node_mask, edge_mask=pruned.edge_mask)
    assert len(masked) == len(_nonzero_edges(graph, pruned.node_mask, pruned.edge_mask))
    with pytest.raises(ValueError, match="node_mask"):
        graph.edges_df(node_mask=pruned.node_mask[:-1])


def test_figure_nodes_and_ticks(graph, pruned):
    fig = graph_figure(graph, node_threshold=NODE_T, edge_threshold=EDGE_T)
    shown = [t for t in fig.data if t.meta == NODE_META and t.visible]
    assert sum(len(t.x) for t in shown) == int(pruned.node_mask.sum())
    ids = {c for t in shown for c in t.customdata}
    assert ids == {graph.node(i).id for i in pruned.node_mask.nonzero().squeeze(1).tolist()}
    assert list(fig.layout.xaxis.ticktext) == [token_label(t) for t in graph.tokens]
    assert list(fig.layout.xaxis.tickvals) == list(range(graph.n_tokens))
    assert len(fig.layout.yaxis.tickvals) == graph.n_layers + 2
    # every slider step shows exactly that threshold's pruned nodes
    slider = fig.layout.sliders[0]
    assert slider.steps[slider.active].label == f"{NODE_T:g}"
    for step in slider.steps:
        visible = step.args[0]["visible"]
        count = sum(len(t.x) for t, v in zip(fig.data, visible) if v and t.meta == NODE_META)
        expected = prune(graph, node_threshold=float(step.label), edge_threshold=EDGE_T)
        assert count == int(expected.node_mask.sum())


def test_html_is_standalone(graph, tmp_path):
    path = save_graph_html(graph, tmp_path / "graph.html", node_threshold=NODE_T, edge_threshold=EDGE_T)
    text = path.read_text()
    assert path.stat().st_size > 3_000_000
    assert "<script src=" not in text and 'src="https://' not in text
    # plotly.js names cdn.plot.ly once, as the default topojson URL of geo maps (not used here)
    assert text.count("cdn.plot.ly") <= 1 and "https://cdn.plot.ly/un/" in text
    from plotly.offline import get_plotlyjs_version

    assert f"plotly.js v{get_plotlyjs_version()}" in text  # the library itself, inline
    assert "plotly_click" in text and "gd.cltGraph" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_tokens_are_escaped(graph, tmp_path):
    tokens = list(graph.tokens)
    tokens[2] = SCRIPT
    evil = dataclasses.replace(graph, tokens=tokens, prompt="".join(tokens))
    labels = {evil.node(0).id: "a </script><script>alert(2)</script> label"}
    text = save_graph_html(
        evil, tmp_path / "evil.html", node_threshold=NODE_T, edge_threshold=EDGE_T, labels=labels, title=SCRIPT
    ).read_text()
    assert SCRIPT not in text and "alert(2)</script>" not in text
    escaped = html.escape(SCRIPT)
    # plotly's JSON writes "/" as \u002f; the escaped token reaches the page in that form
    assert escaped.replace("/", "\\u002f") in text
    fig = graph_figure(evil, node_threshold=NODE_T, edge_threshold=EDGE_T)
    assert fig.layout.xaxis.ticktext[2] == escaped
    assert all(SCRIPT not in h for t in fig.data if t.meta == NODE_META for h in t.hovertext)


@pytest.fixture(scope="module")
def cards(tiny_llama, tmp_path_factory):
    model, tokenizer = tiny_llama
    store = saved_store(model, tokenizer, tmp_path_factory.mktemp("store"), 300)
    tc = standardised_transcoder(store, num_features=8, activation_fn="relu")
    return cards_with_logits(tc.eval(), store, model, tokenizer, top_k=4)


def test_feature_card_figure(cards, tmp_path):
    card = next(iter(cards.values()))
    fig = feature_card_figure(card)
    kinds = [t.type for t in fig.data]
    assert kinds == ["bar", "bar", "heatmap"]
    assert list(fig.data[0].y) == card.histogram
    assert len(fig.data[1].x) == len(card.top_logits) + len(card.bottom_logits)
    assert len(fig.data[2].z) == len(card.contexts)
    focus = card.contexts[0]
    assert f"<b>{token_label(focus.tokens[focus.focus])}</b>" in fig.data[2].text[0]

    evil = FeatureCard(
        layer=0,
        feature=1,
        density=0.1,
        max_activation=2.0,
        quantiles={},
        histogram=[3, 1],
        bin_edges=[0.0, 1.0, 2.0],
        label=SCRIPT,
        contexts=[Context([SCRIPT, "a", "b"], [2.0, 0.5, 0.0], 0, 2.0)],
        top_logits=[(SCRIPT, 1.0)],
        bottom_logits=[("x", -1.0)],
    )
    text = save_figure_html(feature_card_figure(evil), tmp_path / "card.html").read_text()
    assert SCRIPT not in text and "<script src=" not in text


def test_graph_hover_uses_cards(graph, cards):
    fig = graph_figure(graph, node_threshold=1.0, edge_threshold=1.0, cards=cards)
    hovers = {c: h for t in fig.data if t.meta == NODE_META and t.visible for c, h in zip(t.customdata, t.hovertext)}
    carded = [n for n in graph.nodes if n.kind == "feature" and f"{n.layer}/{n.feature}" in cards and n.id in hovers]
    assert carded, "no carded feature is drawn"
    card = cards.card(carded[0].layer, carded[0].feature)
    hover = hovers[carded[0].id]
    assert html.escape(card.label) in hover and "top contexts" in hover
    labelled = graph_figure(graph, node_threshold=1.0, edge_threshold=1.0, labels={carded[0].id: "my label"})
    assert any("my label" in h for t in labelled.data if t.meta == NODE_META for h in t.hovertext)


def test_training_and_layer_figures(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {
            "step": s,
            "total": 1.0 / s,
            "reconstruction": 0.8 / s,
            "sparsity": 0.2 / s,
            "preactivation": 0.0,
            "auxiliary": 0.0,
            "fvu": 0.5 / s,
            "l0": 10.0 + s,
            "lr": 1e-3,
            "dead_fraction": 0.01 * s,
            "sparsity_lambda": 0.1 * s,
        }
        for s in range(1, 6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    fig = training_curves_figure(path)
    names = [t.name for t in fig.data]
    assert names == [
        "total",
        "reconstruction",
        "sparsity",
        "fvu",
        "l0",
        "dead_fraction",
        "lr",
        "sparsity_lambda",
    ]  # the always-zero loss terms are left out
    assert list(fig.data[3].y) == [r["fvu"] for r in records]
    assert list(fig.data[3].x) == [1, 2, 3, 4, 5]
    assert [t.name for t in training_curves_figure(records).data] == names
    with pytest.raises(ValueError, match="empty"):
        training_curves_figure([])
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=":2"):
        training_curves_figure(path)

    fig = layer_metrics_figure([0.1, 0.2, 0.3], [5.0, 6.0, 7.0])
    assert [list(t.y) for t in fig.data] == [[0.1, 0.2, 0.3], [5.0, 6.0, 7.0]]
    metrics = ReconstructionMetrics(
        fvu_per_layer=[0.1, 0.2],
        fvu=0.15,
        l0_per_layer=[1.0, 2.0],
        l0=3.0,
        dead_fraction=0.0,
        activation_frequency=torch.zeros(2, 4),
        n_tokens=10,
    )
    assert [list(t.y) for t in layer_metrics_figure(metrics).data] == [[0.1, 0.2], [1.0, 2.0]]
    with pytest.raises(ValueError, match="per layer"):
        layer_metrics_figure([0.1], [1.0, 2.0])
    out = save_figure_html(fig, tmp_path / "sub" / "layers.html")
    assert out.stat().st_size > 3_000_000 and "<script src=" not in out.read_text()


def test_edge_cap_keeps_the_most_influential_edges(graph):
    from clt.attribution import edge_influence, prune
    from clt.viz.graph import _capped

    full = prune(graph, NODE_T, EDGE_T)
    count = int(full.edge_mask.sum())
    capped = _capped(graph, full, count // 3)
    assert int(capped.edge_mask.sum()) == count // 3
    assert torch.equal(capped.node_mask, full.node_mask)
    assert not (capped.edge_mask & ~full.edge_mask).any()
    scores = edge_influence(graph.adjacency, graph.logit_weights())
    assert scores[capped.edge_mask].min() >= scores[full.edge_mask & ~capped.edge_mask].max()
    fig = graph_figure(graph, node_threshold=NODE_T, edge_threshold=EDGE_T, max_edges=count // 3)
    drawn = sum(len([x for x in t.x if x is None]) for t in fig.data if t.meta == "edges" and t.visible)
    assert drawn == count // 3
