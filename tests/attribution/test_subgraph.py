"""Scores of node sets, the graph page's saved state, and automatic supernodes."""

from __future__ import annotations

import json

import pytest
import torch

from clt.attribution import (
    Graph,
    GraphState,
    GraphStateError,
    Supernode,
    attribute,
    graph_scores,
    subgraph_scores,
    suggest_supernodes,
)
from clt.attribution.prune import merged_rows
from clt.config.attribution import AttributionConfig


def hand_graph(features: list[list[int]], n_layers: int, n_tokens: int, edges: dict[tuple[int, int], float]) -> Graph:
    """A graph with the given feature nodes (layer, pos, feature), one logit of probability 1, and
    adjacency[target, source] = edges[(target, source)]."""
    n = len(features) + n_layers * n_tokens + n_tokens + 1
    adjacency = torch.zeros(n, n)
    for (target, source), weight in edges.items():
        adjacency[target, source] = weight
    return Graph(
        prompt="a b",
        token_ids=list(range(n_tokens)),
        tokens=[f"t{i}" for i in range(n_tokens)],
        features=torch.tensor(features, dtype=torch.long).view(-1, 3),
        activations=torch.ones(len(features)),
        adjacency=adjacency,
        logit_token_ids=[7],
        logit_tokens=["x"],
        logit_probabilities=torch.tensor([1.0]),
        n_layers=n_layers,
        config=AttributionConfig(),
    )


@pytest.fixture
def chain() -> Graph:
    """t1 → f (layer 0, pos 1) → logit, plus the error at (0, 1) and t1 straight to the logit.

    Nodes: 0 f, 1 error(0,0), 2 error(0,1), 3 t0, 4 t1, 5 logit."""
    return hand_graph([[0, 1, 0]], 1, 2, {(0, 4): 2.0, (5, 0): 3.0, (5, 2): 1.0, (5, 4): 1.0})


def test_scores_of_a_hand_built_graph(chain):
    # logit row normalised: f 0.6, error 0.2, t1 0.2; f's row: t1 1 -> influence f .6, error .2, t1 .8
    assert graph_scores(chain) == pytest.approx((0.8, 2.4 / 2.6), abs=1e-7)
    assert subgraph_scores(chain, ["feature:0:1:0"]) == pytest.approx((0.8, 2.4 / 2.6), abs=1e-12)
    # without f, its edge to the logit joins the error's: logit row error 0.8, t1 0.2
    assert subgraph_scores(chain, []) == pytest.approx((0.2, 1.2 / 2.0), abs=1e-12)
    # error, token and logit nodes do not change a subgraph
    assert subgraph_scores(chain, ["token:1", "error:0:1", "logit:7"]) == subgraph_scores(chain, [])
    assert subgraph_scores(chain, [0, 4]) == subgraph_scores(chain, ["feature:0:1:0"])
    with pytest.raises(KeyError, match="feature:3:1:0"):
        subgraph_scores(chain, ["feature:3:1:0"])
    with pytest.raises(IndexError, match="out of range"):
        subgraph_scores(chain, [6])


@pytest.fixture(scope="module")
def tiny_graph(tiny_llama) -> Graph:
    from helpers import random_transcoder

    model, tokenizer = tiny_llama
    tc = random_transcoder(model)
    return attribute("The for statement iterates over", model, tc, tokenizer=tokenizer, progress=False)


def test_subgraph_of_all_features_is_the_graph(tiny_graph):
    everything = subgraph_scores(tiny_graph, range(tiny_graph.n_features))
    # float64 here, float32 in graph_scores: they differ by float32 rounding of sums of ~100 terms
    assert everything == pytest.approx(graph_scores(tiny_graph), abs=1e-5)
    nothing = subgraph_scores(tiny_graph, [])
    assert nothing[0] < everything[0] and nothing[1] < everything[1]


def test_merging_is_order_free(tiny_graph):
    n = tiny_graph.n_features
    everything = torch.arange(tiny_graph.n_nodes)
    first, second = torch.arange(0, n, 3), torch.tensor([i for i in range(n) if i % 3 and i % 2])
    at_once = merged_rows(tiny_graph, everything, torch.cat([first, second]).sort().values)
    staged = dataclass_with(tiny_graph, merged_rows(tiny_graph, everything, first))
    in_two_steps = merged_rows(staged, everything, second)
    assert torch.allclose(at_once, in_two_steps, rtol=0, atol=1e-12)


def dataclass_with(graph: Graph, adjacency: torch.Tensor) -> Graph:
    import dataclasses

    return dataclasses.replace(graph, adjacency=adjacency)


def test_state_round_trips_through_files_and_fragments(tiny_graph, tmp_path):
    a, b, c = (tiny_graph.node(i).id for i in range(3))
    state = GraphState(
        pinned=[a, "supernode:1"],
        supernodes=[Supernode("supernode:1", "pair", [b, c])],
        labels={a: "my <label>"},
        view={"node_threshold": 0.8, "selected": a},
        prompt=tiny_graph.prompt,
    )
    assert state.pinned_nodes() == [a, b, c]
    path = state.save(tmp_path / "state.json")
    assert json.loads(path.read_text())["format"] == "clt.graph-state"
    assert tiny_graph.load_state(path) == state
    url = f"file:///tmp/graph.html#{state.to_fragment()}"
    assert tiny_graph.load_state(url) == state
    assert GraphState.read("#" + state.to_fragment()) == state
    assert GraphState.read(state.to_dict()) == state
    other = GraphState(pinned=["feature:9:0:99"])
    with pytest.raises(GraphStateError, match="feature:9:0:99"):
        tiny_graph.load_state(other.to_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"supernodes": [Supernode("supernode:1", "x", ["token:0"])]}, "needs two"),
        ({"supernodes": [Supernode("group", "x", ["token:0", "token:1"])]}, "look like"),
        (
            {
                "supernodes": [
                    Supernode("supernode:1", "x", ["token:0", "token:1"]),
                    Supernode("supernode:2", "y", ["token:1", "token:2"]),
                ]
            },
            "in both",
        ),
        ({"pinned": ["supernode:4"]}, "not among"),
    ],
)
def test_bad_states_are_refused(kwargs, message):
    with pytest.raises(GraphStateError, match=message):
        GraphState(**kwargs)


def test_bad_state_files_are_refused(tmp_path):
    with pytest.raises(GraphStateError, match="not a graph-page state"):
        GraphState.read({"format": "other"})
    with pytest.raises(GraphStateError, match="version 7"):
        GraphState.read({"format": "clt.graph-state", "version": 7})
    with pytest.raises(GraphStateError, match="fragment"):
        GraphState.read("#state=not-base64!")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(GraphStateError, match="not valid JSON"):
        GraphState.read(bad)


def test_suggested_supernodes_group_alike_features_at_one_position():
    # features: 0 a (0,1,0), 1 b (0,1,1) with proportional inputs and outputs; 2 c (1,1,0) reads
    # both; 3 d (0,0,2) like a but at position 0; 4 e (1,1,1) labelled like c
    # nodes: 0-4 features, 5-8 errors (layer, pos), 9 t0, 10 t1, 11 logit
    edges = {(0, 10): 1.0, (1, 10): 2.0, (2, 0): 1.0, (2, 1): 2.0, (3, 9): 1.0, (2, 3): 0.5}
    edges |= {(4, 9): 1.0, (11, 2): 1.0, (11, 4): 1.0, (11, 6): 0.1}
    graph = hand_graph([[0, 1, 0], [0, 1, 1], [1, 1, 0], [0, 0, 2], [1, 1, 1]], 2, 2, edges)
    ids = [graph.node(i).id for i in range(5)]
    groups = suggest_supernodes(graph, range(graph.n_nodes))
    assert [set(m) for _, m in groups] == [{ids[0], ids[1]}]
    assert groups[0][0] == "2 features at “t1”"
    labelled = suggest_supernodes(graph, range(graph.n_nodes), labels={ids[2]: "x", ids[4]: "x"})
    assert {frozenset(m) for _, m in labelled} == {frozenset(ids[:2]), frozenset([ids[2], ids[4]])}
    assert dict((frozenset(m), label) for label, m in labelled)[frozenset([ids[2], ids[4]])] == "x"
    # restricted to some nodes, only those are grouped
    assert suggest_supernodes(graph, [0, 2, 3, 4, 9, 10, 11]) == []
    with pytest.raises(ValueError, match="min_similarity"):
        suggest_supernodes(graph, range(5), min_similarity=0)
