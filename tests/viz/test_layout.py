"""Where the nodes of a graph sit: one column per position, one row per layer, logits apart."""

from __future__ import annotations

import itertools

from helpers import hand_graph

from clt.viz.layout import CELL_WIDTH, ROW_BAND, axes, marker_sizes, max_cell_rows, node_positions, row_of


def test_cells_hold_their_nodes_apart():
    # 7 features at (layer 1, position 2), one at (layer 0, position 1); 3 layers, 4 tokens, 1 logit
    features = [[1, 2, k] for k in range(7)] + [[0, 1, 0]]
    graph = hand_graph(features, 3, 4, {})
    influence = [float(i) for i in range(graph.n_nodes)]
    everything = list(range(graph.n_nodes))
    positions = node_positions(graph, everything, influence)
    assert set(positions) == set(everything)
    for index, (x, y) in positions.items():
        node = graph.node(index)
        if node.kind == "logit":
            assert (x, y) == (graph.n_tokens, graph.n_layers + 1)
            continue
        assert abs(x - node.pos) <= CELL_WIDTH / 2 and abs(y - row_of(graph, node)) <= ROW_BAND / 2
    assert len(set(positions.values())) == len(positions)  # no two nodes on one spot
    crowded = [positions[i] for i in range(7)]
    gaps = [abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in itertools.combinations(crowded, 2)]
    assert min(gaps) > 0.1
    # most influential first: the last feature of the cell sits at its top-left
    assert positions[6] == min(crowded, key=lambda p: (-p[1], p[0]))
    assert max_cell_rows(graph, positions) == 2
    assert marker_sizes([0.0, 1.0, 4.0]) == [6.0, 6.0 + 18.0 * 0.5, 24.0]
    layout = axes(graph)
    assert layout["xaxis"]["ticktext"] == ["t0", "t1", "t2", "t3"] and layout["annotations"][0]["x"] == 4
    assert layout["yaxis"]["ticktext"] == ["embeddings", "layer 0", "layer 1", "layer 2", "logits"]
