"""experiments/compare_dictionaries.py end to end on the tiny Llama: every dictionary type, one table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from clt.nnsight.extractors import ActivationExtractor

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "compare_dictionaries.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_dictionaries", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_compare_trains_every_type_and_writes_table_and_figure(script, tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    store = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32).extract(
        max_tokens=1024, output_dir=tmp_path / "store", store_dtype="float32", progress=False
    )
    names = list(script.DICTIONARIES)
    table = script.compare(
        store,
        names,
        num_features=16,
        k=2,
        steps=20,
        batch_size=128,
        learning_rate=3e-3,
        output_dir=tmp_path / "out",
        prompts=("The list is",),
        kl_coef=10.0,
        kl_every=2,
        progress=False,
    )
    assert [name for name, _ in table.index] == names
    rows = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [r["dictionary"] for r in rows] == names
    by_name = {r["dictionary"]: r for r in rows}
    for name in ("SAE", "MOLT"):  # no linear replacement of the MLPs: no graph scores
        assert by_name[name]["replacement_score"] is None and by_name[name]["completeness_score"] is None
    assert by_name["SAE"]["KL"] is None  # an SAE replaces no MLP
    for name in ("PLT", "CLT", "skip PLT", "Matryoshka CLT", "CLT+KL", "CLT→JumpReLU"):
        assert 0 <= by_name[name]["replacement_score"] <= 1 and 0 <= by_name[name]["completeness_score"] <= 1
        assert by_name[name]["KL"] >= 0
    # the JumpReLU conversion is calibrated to the CLT's BatchTopK L0: k per layer on these tokens
    assert by_name["CLT→JumpReLU"]["L0"] == pytest.approx(2 * store.num_layers, rel=0.1)
    html = (tmp_path / "out" / "pareto.html").read_text()
    assert all(name in html for name in ("Matryoshka CLT", "skip PLT", "CLT+KL"))
    text = script.format_table(table)
    assert "n/a" in text and "MOLT" in text
