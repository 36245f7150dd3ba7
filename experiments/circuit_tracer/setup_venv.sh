#!/usr/bin/env bash
# Create the virtualenv in which circuit-tracer (PyPI circuit-tracer 0.5.0) runs for the interop tests
# (tests/attribution/test_circuit_tracer.py) and experiments/circuit_tracer/check_export.py,
# experiments/benchmarks/attribution_speed.py. circuit-tracer pins nnsight 0.6.1 and transformers
# <= 4.57.3, so it cannot share the project's venv; its transformer-lens backend is not used, so the
# package goes in with --no-deps beside the nnsight backend's dependencies. torch goes first so that
# pip keeps the local CPU wheel of the same version as the project's.
#   bash experiments/circuit_tracer/setup_venv.sh [.venv-interop/circuit_tracer]
set -euo pipefail
venv="${1:-.venv-interop/circuit_tracer}"
torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q "torch==${torch_version}"
"$venv/bin/pip" install -q "nnsight==0.6.1" "transformers==4.57.3" "huggingface_hub<1.0" \
    einops numpy pydantic safetensors tokenizers tqdm pyyaml
"$venv/bin/pip" install -q --no-deps "circuit-tracer==0.5.0"
"$venv/bin/python" -c 'import circuit_tracer, torch; print("circuit_tracer imported; torch", torch.__version__)'
