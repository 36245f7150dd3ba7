"""circuit-tracer's side of test_circuit_tracer.py, run in circuit-tracer's own virtualenv.

    python circuit_tracer_child.py SPEC.json OUT.safetensors

The spec names a model folder, a transcoder folder written by `export_circuit_tracer`, a prompt
and a list of cases (interventions, constrained_layers, freeze_attention); the output holds the
token ids circuit-tracer used and, per case, its `feature_intervention` logits and activations.
Only the standard library is imported at the top.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    import torch
    from circuit_tracer import ReplacementModel
    from safetensors.torch import save_file

    spec = json.loads(Path(sys.argv[1]).read_text())
    model = ReplacementModel.from_pretrained(
        spec["model_dir"], spec["transcoder_dir"], backend="nnsight", device=torch.device("cpu"), dtype=torch.float32
    )
    out = {"input_ids": torch.tensor(model.tokenizer(spec["prompt"]).input_ids)}
    for name, case in spec["cases"].items():
        layers = case["constrained_layers"]
        logits, activations = model.feature_intervention(
            spec["prompt"],
            [tuple(i) for i in case["interventions"]],
            constrained_layers=None if layers is None else range(*layers),
            freeze_attention=case["freeze_attention"],
        )
        out[f"{name}.logits"] = logits.reshape(-1, logits.shape[-1]).float().contiguous()
        out[f"{name}.activations"] = activations.to_dense().float().contiguous()
    model.tokenizer.model_input_names = ["input_ids", "attention_mask"]  # Llama's generate takes no token_type_ids
    for name, case in spec.get("generate", {}).items():
        interventions = [
            (m, slice(p, None) if open_ended else p, f, v) for m, p, open_ended, f, v in case["interventions"]
        ]
        text, logits, _ = model.feature_intervention_generate(
            spec["prompt"],
            interventions,
            freeze_attention=case["freeze_attention"],
            max_new_tokens=case["max_new_tokens"],
            do_sample=False,
        )
        out[f"{name}.logits"] = logits.float().contiguous()
        out[f"{name}.text"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    save_file(out, sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
