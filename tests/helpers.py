"""Test helpers shared across test folders: stores of a tiny model and transcoders that fit them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clt.config.transcoder import CLTConfig
from clt.models.transcoder import CrossLayerTranscoder


def saved_store(model: nn.Module, tokenizer: Any, folder: Path, max_tokens: int, **save_options: Any) -> Any:
    """A float32 store of the tiny Llama's activations over the default corpus, saved in `folder`."""
    from clt.nnsight.extractors import ActivationExtractor

    extractor = ActivationExtractor(model=model, tokenizer=tokenizer, model_name="tiny-llama")
    return extractor.extract(max_tokens=max_tokens, store_dtype="float32", progress=False).save(folder, **save_options)


def standardised_transcoder(source: Any, *, output_bias: bool = True, **config: Any) -> CrossLayerTranscoder:
    """A transcoder (CLTConfig fields in `config`) standardised with real activation statistics: a
    store's, or those of a model's clean run on 64 random tokens (output mean 0 unless `output_bias`)."""
    if hasattr(source, "norm_stats"):
        stats = source.norm_stats()
        sizes = {"num_layers": source.num_layers, "d_model": source.d_model, "model_name": source.model_name}
        tc = CrossLayerTranscoder(CLTConfig(**{**sizes, **config}))
        tc.set_normalization(stats.input_mean, stats.input_std, stats.output_mean, stats.output_std)
        return tc
    from clt.attribution import ReplacementModel
    from clt.nnsight.loading import find_layout

    layout = find_layout(source)
    tc = CrossLayerTranscoder(CLTConfig(**{"num_layers": layout.num_layers, "d_model": layout.d_model, **config}))
    ids = torch.randint(3, layout.vocab_size, (64,), generator=torch.Generator().manual_seed(tc.cfg.seed))
    clean = ReplacementModel(source, tc).prepare(ids)
    x, y = clean.mlp_inputs, clean.mlp_outputs  # [n, L, d]
    out_mean = y.mean(0) if output_bias else torch.zeros_like(y[0])
    tc.set_normalization(x.mean(0), x.std(0), out_mean, y.std(0))
    return tc


def random_transcoder(
    source: Any,
    *,
    output_bias: bool = True,
    decoder_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> CrossLayerTranscoder:
    """A random transcoder (12 ReLU features unless `config` says otherwise) standardised with real
    statistics (`standardised_transcoder`: of a store or a model), plus a random encoder bias, skip
    and (unless told) decoder bias; with `decoder_scale`, decoders and decoder bias drawn at that
    scale. In eval mode."""
    config = {"num_features": 12, "activation_fn": "relu", "jumprelu_threshold": 0.05, **config}
    tc = standardised_transcoder(source, output_bias=output_bias, **config)
    L, F, d = tc.cfg.num_layers, tc.cfg.num_features, tc.cfg.d_model
    gen = torch.Generator().manual_seed(tc.cfg.seed + 1)
    with torch.no_grad():
        tc.b_enc.copy_(torch.randn(L, F, generator=gen) * 0.3)
        if tc.cfg.skip_connection:
            tc.W_skip.copy_(torch.randn(L, d, d, generator=gen) * 0.05)
        if output_bias:
            tc.b_dec.copy_(torch.randn(L, d, generator=gen) * 0.1)
        if decoder_scale is not None:
            for w in tc.W_dec:
                w.copy_(torch.randn(w.shape, generator=gen) * decoder_scale)
            tc.b_dec.copy_(torch.randn(L, d, generator=gen) * decoder_scale)
    return tc.to(dtype).eval()


def cards_with_logits(
    transcoder: CrossLayerTranscoder, store: Any, model: nn.Module, tokenizer: Any, **options: Any
) -> Any:
    """Feature cards of 3-token contexts with the 4 top logits read from the model's unembedding."""
    from clt.interp import build_feature_cards, unembedding_of

    unembedding, norm = unembedding_of(model)
    options = {"context": 3, "n_logits": 4, "progress": False, **options}
    return build_feature_cards(transcoder, store, tokenizer, unembedding=unembedding, final_norm_weight=norm, **options)


FP32_STEP = torch.finfo(torch.float32).eps
"""Spacing of float32 numbers at 1 (2 u, u the unit roundoff)."""


def spliced_logits_on(model: nn.Module, tokenizer: Any, transcoder: CrossLayerTranscoder, texts: list[str], mode: str):
    """Logits [B, T, V] of `model` on the windows `replacement_metrics` builds from `texts` (BOS
    prepended and keeping the model's own MLP outputs) in splice mode 'none', 'replace' or 'zero'."""
    from clt.data.corpus import load_texts, token_windows
    from clt.data.windows import pad_id, pad_windows
    from clt.nnsight.splice import language_model, spliced_logits
    from clt.training.metrics import bos_keep_mask

    windows = [w for w in token_windows(load_texts(texts), tokenizer, 64, prepend_bos=True) if len(w.token_ids) >= 2]
    ids, mask = pad_windows(windows, pad_id(tokenizer))
    lm, paths = language_model(model, tokenizer, transcoder)
    with torch.no_grad():
        return spliced_logits(lm, paths, transcoder, ids, mask, mode, bos_keep_mask(mask, True, True))


def splice_rounding(logit_scale: float, vocab_size: int, n_tokens: int, ce: float) -> dict[str, float]:
    """Bounds on how far float32 rounding alone moves a splice's logits and `replacement_metrics`
    (logit_scale: the largest |logit| of the runs compared; ce: their cross-entropy).

    `logits`: two float32 computations of the same logits (other kernels, as on another CPU, or
    another splice of the same map) differ by a few ulp of the largest logit per layer: δ = 16 eps32 ·
    max|logit| (±1-ulp weights move the logits of the tests' fixtures by ≤ 2.1 eps32 · max|logit|).
    `next_token_kl` rounds its sums E_p[expm1(a)] and E_p[a] (a = d − c, d the logit difference)
    by ≤ (⌈log2 V⌉ + 2) eps32 E_p|a| each (its test), and p relatively by eps32 (|logit| + 2), which
    moves a KL of 1e-2 by ~1e-9: negligible below.
    `kl`: logits that differ by ≤ δ give KL ≤ (2δ)²/8 (Hoeffding's lemma), |a| ≤ 2δ.
    `kl_change`: KL(p‖q) moves by ≤ Σ|q − p| δ ≤ 2δ when q's logits move by δ; each of the two KLs
    is rounded with |a| ≤ 4 max|logit|.
    `ce`: each position's NLL moves by ≤ 2δ; float32 log-softmax rounds it by ≤ eps32 (max|logit| +
    log V) per run, and each run's float32 sum over n positions by ≤ ⌈log2 n⌉ eps32/2 · CE."""
    delta = 16 * FP32_STEP * logit_scale
    sums = 2 * (math.ceil(math.log2(vocab_size)) + 2) * FP32_STEP
    nll = FP32_STEP * (logit_scale + math.log(vocab_size)) + math.ceil(math.log2(n_tokens)) * FP32_STEP / 2 * ce
    return {
        "logits": delta,
        "kl": delta**2 / 2 + sums * 2 * delta,
        "kl_change": 2 * delta + 2 * sums * 4 * logit_scale,
        "ce": 2 * delta + 2 * nll,
    }


STATS_RTOL = 64 * FP32_STEP / 2
"""Relative error of a store's statistics sums (`RunningStats`) for same-sign data: rows are summed
in float32 blocks of 32 rows, ≤ 31 u relative whatever the summation order (+u for a float32 square),
then in float64 (u = eps32/2); 64 u allows twice that."""

INT8_HALF_STEP = (1 + 256 * FP32_STEP) / 2
"""Largest |x − decoded| of the store's int8 codes, in steps absmax/127: with s = fl(absmax/127),
code = round(fl(x/s)) and decoded = fl(code·s), |x/s − code| ≤ 1/2 + 127u and |code·s − decoded| ≤
127 s u, so |x − decoded| ≤ s (1/2 + 254u) ≤ (absmax/127)(1 + u)(1/2 + 254u) < (absmax/127)(1 + 512u)/2."""


def hand_graph(features: list[list[int]], n_layers: int, n_tokens: int, edges: dict[tuple[int, int], float]) -> Any:
    """A hand-built graph with the given feature nodes (layer, pos, feature), one logit of probability 1, and
    adjacency[target, source] = edges[(target, source)]."""
    from clt.attribution import Graph
    from clt.config.attribution import AttributionConfig

    n = len(features) + n_layers * n_tokens + n_tokens + 1
    adjacency = torch.zeros(n, n)
    for (target, source), weight in edges.items():
        adjacency[target, source] = weight
    return Graph(
        prompt="a b",
        token_ids=list(range(n_tokens)),
        tokens=[f"t{i}" for i in range(n_tokens)],
        features=torch.tensor(features, dtype=torch.long).view(-1, 3),
        activations=torch.ones(len(features)),
        adjacency=adjacency,
        logit_token_ids=[7],
        logit_tokens=["x"],
        logit_probabilities=torch.tensor([1.0]),
        n_layers=n_layers,
        config=AttributionConfig(),
    )


# ---------------------------------------------------------------- other libraries in their own venvs

INTEROP_DIR = Path(__file__).resolve().parents[1] / ".venv-interop"
LIBRARY_PYTHONS = {
    "sparsify": ("CLT_SPARSIFY_PYTHON", str(INTEROP_DIR / "sparsify" / "bin" / "python")),
    "saelens": ("CLT_SAELENS_PYTHON", str(INTEROP_DIR / "saelens" / "bin" / "python")),
    "circuit_tracer": ("CLT_CIRCUIT_TRACER_PYTHON", str(INTEROP_DIR / "circuit_tracer" / "bin" / "python")),
}
"""Python of each library's venv (`make interop-venvs`, which `make test` runs), overridable by an env var."""


def library_python(library: str) -> Path:
    """The venv python of `library`, or skip the test naming how to create it."""
    import os

    import pytest

    env, default = LIBRARY_PYTHONS[library]
    python = Path(os.environ.get(env, default))
    built = env in os.environ or (python.parents[1] / ".installed").is_file()  # a finished `make interop-venvs`
    if not (built and python.is_file()):
        pytest.skip(f"{python} is missing: run `make interop-venvs` (experiments/{library}/setup_venv.sh) or set {env}")
    return python


def run_library(python: Path, library: str, *args: object) -> None:
    """Run experiments/LIBRARY/roundtrip.py with that venv's python (one thread); assert it succeeds."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "experiments" / library / "roundtrip.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [str(python), str(script), *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]


def mlp_activations(
    model: nn.Module, tokenizer: Any, folder: Path, name: str, layers: list[int], n_windows: int = 4
) -> Path:
    """`folder/data.safetensors`: MLP inputs/outputs [T, len(layers), d] of `layers` on a few windows of
    the default corpus, and ``layers`` (the data the round-trip helpers read)."""
    from safetensors.torch import save_file

    from clt.nnsight.extractors import ActivationExtractor

    extractor = ActivationExtractor(model=model, tokenizer=tokenizer, model_name=name, layers=layers, context_length=32)
    acts = extractor.activations([w for _, w in zip(range(n_windows), extractor.windows())])
    path = folder / "data.safetensors"
    save_file({"inputs": acts["inputs"], "outputs": acts["outputs"], "layers": torch.tensor(layers)}, str(path))
    return path


def fake_hub_cache(cache: Path, repo: str, files: Path) -> None:
    """A Hugging Face cache entry for `repo` (models--owner--name/refs/main → snapshot) holding `files`."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files.rglob("*"):
        target = snapshot / path.relative_to(files)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
