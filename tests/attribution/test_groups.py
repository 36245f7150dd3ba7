"""Automatic supernodes: alike features at one position."""

from __future__ import annotations

import pytest
from helpers import hand_graph

from clt.attribution import suggest_supernodes


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
