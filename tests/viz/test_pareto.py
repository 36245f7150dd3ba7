"""pareto_figure: one trace per dictionary type, points in order of L0, rows without numbers left out."""

from __future__ import annotations

import pytest

from clt.viz import pareto_figure


def test_one_trace_per_type_sorted_by_l0():
    rows = [
        {"dictionary": "CLT", "L0": 16.0, "FVU": 0.2},
        {"dictionary": "PLT", "L0": 8.0, "FVU": 0.5},
        {"dictionary": "CLT", "L0": 8.0, "FVU": 0.3},
        {"dictionary": "SAE", "L0": None, "FVU": 0.1},
    ]
    fig = pareto_figure(rows)
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"CLT", "PLT"}  # SAE has no L0 here
    assert list(traces["CLT"].x) == [8.0, 16.0] and list(traces["CLT"].y) == [0.3, 0.2]
    assert traces["CLT"].mode == "lines+markers" and traces["PLT"].mode == "markers"


def test_rows_without_numbers_are_an_error():
    with pytest.raises(ValueError, match="no row has numbers"):
        pareto_figure([{"dictionary": "CLT", "L0": None, "FVU": 0.2}])
    with pytest.raises(ValueError, match="dictionary"):
        pareto_figure([{"L0": 1.0, "FVU": 0.2}])
