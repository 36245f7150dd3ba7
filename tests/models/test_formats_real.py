"""Round trips against the real sparsify and SAELens, each run in its own virtualenv by subprocess.

sparsify → clt: coders trained for a few steps and saved by sparsify itself load with
`load_dictionary`, and their encodings and reconstructions equal sparsify's own on the same inputs.
SAELens → clt: the same for SAEs trained by SAELens's own training step (and, for every
inference architecture, transcoders included, SAEs built with random parameters) and saved by it. clt → sparsify and
SAELens: what `export_sparsify` / `export_saelens` write loads there and computes what ours does.

The venvs come from ``experiments/sparsify/setup_venv.sh`` and ``experiments/saelens/setup_venv.sh``
(paths overridable with CLT_SPARSIFY_PYTHON / CLT_SAELENS_PYTHON); a missing one skips its tests.
The helpers the venvs run are ``experiments/{sparsify,saelens}/roundtrip.py``.

Tolerance 1e-5: both sides compute the same float32 products (a d-term dot product for the
pre-activations, an F-term sum for the reconstruction) in a different order and, where weights are
folded (SAELens's b_dec subtracted from the input, its decoder-norm rescaling), with one extra
rounding of each weight: errors of a few float32 ulps of values O(1-10), ~1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import library_python, mlp_activations, run_library
from safetensors.torch import load_file

from clt.config.transcoder import CLTConfig
from clt.models.dictionaries import load_dictionary
from clt.models.perturb import randomize_parameters
from clt.models.saelens_files import export_saelens
from clt.models.sparsify_files import export_sparsify
from clt.models.transcoder import CrossLayerTranscoder

TOLERANCE = 1e-5
LAYERS = [0, 2]
SAELENS_ARCHS = [
    "standard",
    "topk",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.interop]


@pytest.fixture(scope="module")
def sparsify_python() -> Path:
    return library_python("sparsify")


@pytest.fixture(scope="module")
def saelens_python() -> Path:
    return library_python("saelens")


@pytest.fixture(scope="module")
def activations(tiny_llama, tmp_path_factory) -> Path:
    """MLP inputs/outputs [T, 2, d] of the tiny Llama's layers 0 and 2 on a few windows."""
    return mlp_activations(*tiny_llama, tmp_path_factory.mktemp("acts"), "tiny-llama", LAYERS)


def _compare(tc: CrossLayerTranscoder, data: Path, reference: Path, prefix: str) -> float:
    """Largest |ours − theirs| over every layer's features and reconstruction under `prefix`."""
    ref = load_file(str(reference))
    with torch.no_grad():
        out = tc(load_file(str(data))["inputs"][:, [LAYERS.index(m) for m in tc.cfg.layers]])
    worst, seen = 0.0, 0
    for key, theirs in ref.items():
        if not key.startswith(prefix):
            continue
        folder = key.removesuffix(".features").removesuffix(".reconstruction").split("/")[-1]
        i = tc.cfg.layers.index(int(folder.split(".")[1]))
        ours = out.features[:, i] if key.endswith(".features") else out.reconstruction[:, i]
        assert ours.shape == theirs.shape, key
        worst, seen = max(worst, float((ours - theirs).abs().max())), seen + 1
    assert seen == 2 * len(tc.cfg.layers), f"{prefix}: {seen} outputs compared"
    print(f"{prefix} max |clt - library| = {worst:.2e}")
    return worst


# ---------------------------------------------------------------- sparsify


@pytest.mark.parametrize("variant", ["transcoder", "skip", "sae"])
def test_sparsify_trained_coders_load_and_match(sparsify_python, activations, tmp_path, variant):
    run_library(sparsify_python, "sparsify", "train", activations, tmp_path / "out", "--features", 64, "--k", 6,
         "--steps", 10, "--variants", variant)  # fmt: skip
    run_library(sparsify_python, "sparsify", "run", tmp_path / "out", activations, tmp_path / "ref.safetensors")
    tc = load_dictionary(tmp_path / "out" / variant)
    assert (tc.cfg.layers, tc.cfg.activation_fn, tc.cfg.topk) == (LAYERS, "topk", 6)
    assert tc.cfg.skip_connection == (variant == "skip") and tc.cfg.is_sae == (variant == "sae")
    assert _compare(tc, activations, tmp_path / "ref.safetensors", variant + "/") <= TOLERANCE


@pytest.mark.slow
def test_sparsify_coder_trained_on_smollm2_matches(sparsify_python, smollm2, tmp_path):
    data = mlp_activations(*smollm2, tmp_path, "smollm2-135m", LAYERS, n_windows=8)
    run_library(sparsify_python, "sparsify", "train", data, tmp_path / "out", "--features", 1152, "--k", 32,
         "--steps", 20, "--variants", "skip")  # fmt: skip
    run_library(sparsify_python, "sparsify", "run", tmp_path / "out", data, tmp_path / "ref.safetensors")
    tc = load_dictionary(tmp_path / "out" / "skip")
    assert (tc.cfg.d_model, tc.cfg.num_features, tc.cfg.layers) == (576, 1152, LAYERS)
    assert _compare(tc, data, tmp_path / "ref.safetensors", "skip/") <= TOLERANCE


@pytest.mark.parametrize("sae", [False, True], ids=["skip-transcoder", "sae"])
def test_exported_topk_dictionary_loads_in_sparsify(sparsify_python, activations, tmp_path, sae):
    site = "mlp_in" if sae else "mlp_out"
    cfg = CLTConfig(
        num_features=24, num_layers=2, d_model=32, layers=LAYERS, cross_layer=False, activation_fn="topk", topk=5,
        skip_connection=not sae, output_site=site,
    )  # fmt: skip
    tc = randomize_parameters(CrossLayerTranscoder(cfg), seed=3)
    export_sparsify(tc, tmp_path / "out", hookpoint="layers.{}.post_attention_layernorm" if sae else "layers.{}.mlp")
    run_library(sparsify_python, "sparsify", "run", tmp_path / "out", activations, tmp_path / "ref.safetensors")
    assert _compare(tc, activations, tmp_path / "ref.safetensors", "layers.") <= TOLERANCE


# ---------------------------------------------------------------- SAELens


@pytest.fixture(scope="module")
def saelens_saes(saelens_python, activations, tmp_path_factory) -> tuple[Path, Path]:
    """(folder of SAEs of every architecture built and saved by SAELens, their outputs)."""
    out = tmp_path_factory.mktemp("saelens")
    run_library(saelens_python, "saelens", "create", out / "saes", "--arch", ",".join(SAELENS_ARCHS), "--d-in", 32,
         "--d-sae", 48, "--layers", ",".join(map(str, LAYERS)), "--k", 5, "--rescale")  # fmt: skip
    run_library(saelens_python, "saelens", "run", out / "saes", activations, out / "ref.safetensors")
    return out / "saes", out / "ref.safetensors"


@pytest.mark.parametrize("arch", SAELENS_ARCHS)
def test_saelens_saes_load_and_match(saelens_saes, activations, arch):
    folder, reference = saelens_saes
    tc = load_dictionary(folder / arch)
    assert tc.cfg.layers == LAYERS and tc.cfg.model_name == "tiny-llama"
    assert tc.cfg.is_sae == ("transcoder" not in arch) and tc.cfg.skip_connection == ("skip" in arch)
    assert _compare(tc, activations, reference, arch + "/") <= TOLERANCE


SAELENS_TRAINED = ["standard", "topk", "jumprelu", "batchtopk"]


@pytest.fixture(scope="module")
def saelens_trained(saelens_python, activations, tmp_path_factory) -> tuple[Path, Path]:
    """(SAEs trained for a few steps and saved by SAELens itself, their outputs)."""
    out = tmp_path_factory.mktemp("saelens-trained")
    run_library(saelens_python, "saelens", "train", activations, out / "saes", "--arch", ",".join(SAELENS_TRAINED),
                "--d-sae", 48, "--k", 5, "--steps", 10)  # fmt: skip
    run_library(saelens_python, "saelens", "run", out / "saes", activations, out / "ref.safetensors")
    return out / "saes", out / "ref.safetensors"


@pytest.mark.parametrize("arch", SAELENS_TRAINED)
def test_saelens_trained_saes_load_and_match(saelens_trained, activations, arch):
    """Trained by SAELens's own training step and saved with `save_inference_model` (BatchTopK as the
    JumpReLU SAE it becomes there, TopK with its decoder-norm rescaling)."""
    folder, reference = saelens_trained
    tc = load_dictionary(folder / arch)
    assert tc.cfg.is_sae and tc.cfg.activation_fn == {"standard": "relu", "batchtopk": "jumprelu"}.get(arch, arch)
    assert _compare(tc, activations, reference, arch + "/") <= TOLERANCE


@pytest.mark.slow
def test_saelens_sae_trained_on_smollm2_matches(saelens_python, smollm2, tmp_path):
    data = mlp_activations(*smollm2, tmp_path, "smollm2-135m", LAYERS, n_windows=8)
    run_library(saelens_python, "saelens", "train", data, tmp_path / "out", "--arch", "topk,jumprelu",
                "--d-sae", 1152, "--k", 32, "--steps", 20)  # fmt: skip
    run_library(saelens_python, "saelens", "run", tmp_path / "out", data, tmp_path / "ref.safetensors")
    for arch in ("topk", "jumprelu"):
        tc = load_dictionary(tmp_path / "out" / arch)
        assert (tc.cfg.d_model, tc.cfg.num_features, tc.cfg.layers) == (576, 1152, LAYERS)
        assert _compare(tc, data, tmp_path / "ref.safetensors", arch + "/") <= TOLERANCE


@pytest.mark.parametrize(
    "kw",
    [
        dict(activation_fn="jumprelu", skip_connection=True),
        dict(activation_fn="relu"),
        dict(activation_fn="batchtopk", topk=4),
        dict(activation_fn="relu", output_site="mlp_in"),
        dict(activation_fn="topk", topk=5, output_site="mlp_in"),
        dict(activation_fn="jumprelu", output_site="mlp_in"),
    ],
    ids=["jumprelu-skip-transcoder", "relu-transcoder", "batchtopk-transcoder", "relu-sae", "topk-sae", "jumprelu-sae"],
)
def test_exported_dictionary_loads_in_saelens(saelens_python, activations, tmp_path, kw):
    cfg = CLTConfig(num_features=24, num_layers=2, d_model=32, layers=LAYERS, cross_layer=False, **kw)
    tc = randomize_parameters(CrossLayerTranscoder(cfg), seed=4)
    export_saelens(tc, tmp_path / "out")
    run_library(saelens_python, "saelens", "run", tmp_path / "out", activations, tmp_path / "ref.safetensors")
    assert _compare(tc, activations, tmp_path / "ref.safetensors", "blocks.") <= TOLERANCE
