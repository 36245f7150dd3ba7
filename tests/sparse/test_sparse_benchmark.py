"""The sparse-encoding benchmark script runs (tiny sizes) and reports every variant."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "sparse_encoding.py"


def test_benchmark_runs(capsys, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("sparse_encoding_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports its sibling `timing`
    spec.loader.exec_module(module)
    timings = module.main(
        [
            "--layers",
            "3",
            "--d-hidden",
            "16",
            "--d-features",
            "64",
            "--seq",
            "20",
            "--repeats",
            "2",
            "--chunk-size",
            "25",
        ]
    )
    assert set(timings) == {
        "manual per-layer loop",
        "encode_all_layers (eager)",
        "encode_layer loop (eager)",
    }
    assert "ratio to loop" in capsys.readouterr().out
