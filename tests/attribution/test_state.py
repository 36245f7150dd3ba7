"""The graph page's saved state: files, URL fragments, checks against a graph."""

from __future__ import annotations

import json

import pytest
from helpers import hand_graph

from clt.attribution import GraphState, GraphStateError, Supernode


@pytest.fixture
def tiny_graph():
    """Three features at position 1 of a two-layer, two-token graph."""
    return hand_graph([[0, 1, 0], [0, 1, 1], [1, 1, 0]], 2, 2, {(2, 0): 1.0, (2, 1): 1.0, (9, 2): 1.0})


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
