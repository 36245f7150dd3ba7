"""Interventions against circuit-tracer's `feature_intervention`, run in its own virtualenv.

circuit-tracer pins nnsight 0.6.1 and transformers ≤ 4.57.3, so it lives in a separate virtualenv
(`make interop-venvs`, which `make test` runs: experiments/circuit_tracer/setup_venv.sh); its python
is taken from ``$CLT_CIRCUIT_TRACER_PYTHON`` or .venv-interop/circuit_tracer, and the test is skipped
without it.
The tiny Llama is saved as a folder both transformers versions load, the transcoder is written
with `export_circuit_tracer`, and both sides set the same features on the same token ids: one
forward pass (`feature_intervention`: free, frozen attention, direct effects, constrained layers) and
a greedy generation with open-ended interventions (`feature_intervention_generate`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import library_python, random_transcoder
from test_attribution import PROMPT

from clt.attribution import ReplacementModel, generate, intervene

CHILD = Path(__file__).with_name("circuit_tracer_child.py")
ROOT = Path(__file__).resolve().parents[2]
CASES = {  # name: (constrained_layers as range arguments or None, freeze_attention)
    "none": (None, False),  # no interventions: the two models agree
    "free": (None, False),
    "frozen": (None, True),
    "direct": ("all", True),
    "constrained_1_2": ([1, 3], True),
}
TOL = 1e-4
STEPS = 8


def _save_model_folder():
    spec = importlib.util.spec_from_file_location(
        "attribution_setup", ROOT / "experiments/benchmarks/attribution_setup.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_model_folder


@pytest.mark.interop
def test_interventions_match_circuit_tracer(tiny_llama, tmp_path):
    ct_python = library_python("circuit_tracer")
    from clt.models.export import export_circuit_tracer

    model, tokenizer = tiny_llama
    M = model.config.num_hidden_layers
    rm = ReplacementModel(model, random_transcoder(model, cross_layer=True, decoder_scale=0.3), tokenizer)
    _save_model_folder()(model, tokenizer, tmp_path / "model")
    export_circuit_tracer(rm.transcoder, tmp_path / "transcoder", num_model_layers=M)
    ids = tokenizer(PROMPT)["input_ids"]
    state = rm.prepare(ids)
    active = [(state.activations[1:, i] > 0).nonzero() + torch.tensor([1, 0]) for i in (0, 1)]  # after BOS
    picks = [active[0][3].tolist(), active[1][-2].tolist()]
    interventions = [
        (rm.layers[i], pos, feature, 10 * float(state.activations[pos, i, feature]) + 20.0)
        for i, (pos, feature) in enumerate(picks)
    ]
    cases = {
        name: {
            "interventions": interventions if name != "none" else [],
            "constrained_layers": [0, M] if layers == "all" else layers,
            "freeze_attention": freeze,
        }
        for name, (layers, freeze) in CASES.items()
    }
    n = len(ids)
    steering = [[rm.layers[0], 3, True, 1, 20.0], [rm.layers[2], n - 1, False, 5, 15.0]]  # open-ended from 3; at n−1
    generation = {
        f"generate_{name}": {"interventions": steering, "freeze_attention": freeze, "max_new_tokens": STEPS}
        for name, freeze in (("free", False), ("frozen", True))
    }
    spec = {"model_dir": str(tmp_path / "model"), "transcoder_dir": str(tmp_path / "transcoder"), "prompt": PROMPT}
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "cases": cases, "generate": generation}))
    proc = subprocess.run(
        [str(ct_python), str(CHILD), str(tmp_path / "spec.json"), str(tmp_path / "ct.safetensors")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    ct = load_file(str(tmp_path / "ct.safetensors"))
    assert ct["input_ids"].tolist() == ids
    logits = {}
    for name, (layers, freeze) in CASES.items():
        constrained = range(*layers) if isinstance(layers, list) else layers
        ours = intervene(
            rm,
            None,
            ids,
            interventions if name != "none" else [],
            freeze_attention=freeze,
            constrained_layers=constrained,
        )
        diff = float((ours.logits - ct[f"{name}.logits"]).abs().max())
        moved = float((ours.logits - state.logits).abs().max())
        print(f"{name}: max |Δ logit| ours vs circuit-tracer {diff:.2e} (the intervention moved logits by {moved:.2e})")
        logits[name] = ours.logits
        assert diff <= TOL, name
        assert name == "none" or moved > 50 * TOL, name
        # features as encoded in the intervened run: ours report the set values where intervened,
        # circuit-tracer's the encodings; it zeroes the BOS position
        theirs, mine = ct[f"{name}.activations"].transpose(0, 1).clone(), ours.activations.clone()
        for layer, pos, feature, _ in ours.interventions:
            theirs[pos, rm.layers.index(layer), feature] = mine[pos, rm.layers.index(layer), feature]
        torch.testing.assert_close(mine[1:], theirs[1:], rtol=0, atol=1e-5)
    for a, b in (("free", "frozen"), ("frozen", "direct"), ("direct", "constrained_1_2")):
        assert (logits[a] - logits[b]).abs().max() > TOL, (a, b)  # the modes differ by more than the tolerance
    plain = generate(rm, None, ids, max_new_tokens=STEPS, stop_at_eos=False)
    for name, case in generation.items():
        changes = [(m, slice(p, None) if open_ended else p, f, v) for m, p, open_ended, f, v in case["interventions"]]
        ours = generate(
            rm, None, ids, changes, freeze_attention=case["freeze_attention"], max_new_tokens=STEPS, stop_at_eos=False
        )
        theirs = ct[f"{name}.logits"]  # the logits that chose each new token [steps, vocab]
        diff = float((ours.logits - theirs).abs().max())
        print(f"{name}: max |Δ logit| over {STEPS} generated tokens {diff:.2e}")
        assert diff <= TOL, name
        assert ours.new_ids == theirs.argmax(-1).tolist()
        assert (ours.logits - plain.logits).abs().max() > 100 * TOL  # the steering acts
