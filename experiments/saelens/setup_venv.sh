#!/usr/bin/env bash
# Create the virtualenv in which tests/models/test_formats_real.py runs SAELens (PyPI sae-lens):
# the round trips of `clt.load_dictionary` and `export_saelens` against the real library.
# torch goes first so that pip keeps the local CPU wheel of the same version as the project's.
#   bash experiments/saelens/setup_venv.sh [.venv-interop/saelens]
set -euo pipefail
venv="${1:-.venv-interop/saelens}"
torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q "torch==${torch_version}"
"$venv/bin/pip" install -q sae-lens
"$venv/bin/python" -c 'import sae_lens, torch; print("sae_lens", sae_lens.__version__, "torch", torch.__version__)'
