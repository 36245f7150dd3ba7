#!/usr/bin/env bash
# Create the virtualenv in which experiments/benchmarks/training.py runs EleutherAI's sparsify
# (PyPI eai-sparsify). torch goes first so that pip keeps the local CPU wheel of the same version
# as the project's; eai-sparsify 1.3.3 accepts it (no --no-deps needed).
#   bash experiments/sparsify/setup_venv.sh [.venv-interop/sparsify]
set -euo pipefail
venv="${1:-.venv-interop/sparsify}"
torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q "torch==${torch_version}"
"$venv/bin/pip" install -q eai-sparsify
"$venv/bin/python" -c 'import sparsify, torch; print("sparsify", sparsify.__version__, "torch", torch.__version__)'
