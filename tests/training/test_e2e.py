"""End-to-end KL objective: against plain-hook splicing, finite differences, and its training effect."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.data.corpus import load_texts
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight.extractors import ActivationExtractor
from clt.store import ActivationStore, StoreError
from clt.training.e2e import KLObjective, store_windows
from clt.training.metrics import replacement_metrics
from clt.training.trainer import CLTTrainer


@pytest.fixture(scope="module")
def setup(tiny_llama):
    """(model, tokenizer, store, extractor) of the tiny Llama with windows of 24 tokens."""
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=24)
    store = extractor.extract(max_tokens=1500, store_dtype="float32", progress=False)
    return model, tokenizer, store, extractor


def random_transcoder(
    store: ActivationStore, *, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 3.0, **overrides
) -> CrossLayerTranscoder:
    """A transcoder with random weights of a typical scale and the store's statistics."""
    cfg = CLTConfig(
        **{
            "num_features": 16,
            "num_layers": store.num_layers,
            "d_model": store.d_model,
            "activation_fn": "jumprelu",
            "model_name": store.model_name,
            "seed": seed,
            **overrides,
        }
    )
    clt = CrossLayerTranscoder(cfg)
    stats = store.norm_stats()
    clt.set_normalization(stats.input_mean, stats.input_std, stats.output_mean, stats.output_std)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=g) * scale)
        clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=g) * scale)
        clt.b_enc.copy_(torch.randn(clt.b_enc.shape, generator=g) * 0.2)
        if cfg.activation_fn == "jumprelu":
            clt.log_threshold.copy_(torch.rand(clt.log_threshold.shape, generator=g).log() - 1)
        if cfg.skip_connection:
            clt.W_skip.copy_(torch.randn(clt.W_skip.shape, generator=g) * 0.05)
    return clt.to(dtype)


def hooked_kl(model, ids: torch.Tensor, layer_output) -> torch.Tensor:
    """Independent oracle: plain forward hooks put `layer_output(layer, x)` in place of each MLP's
    output (BOS keeps the model's own), then the mean next-token KL(original ‖ spliced)."""

    def hook(layer):
        def splice(module, args, output):
            y = layer_output(layer, args[0])
            return torch.cat([output[:, :1], y[:, 1:]], dim=1)

        return splice

    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)
    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        logq = model(input_ids=ids).logits.log_softmax(-1)
    finally:
        for h in handles:
            h.remove()
    p, q = logp[:, :-1], logq[:, :-1]
    return (p.exp() * (p - q)).sum(-1).mean()


def clt_by_hand(clt: CrossLayerTranscoder):
    """Layer outputs of a JumpReLU CLT written out: encoder, threshold, decoders into later layers, skip."""
    pending: dict[int, torch.Tensor] = {}

    def layer_output(layer: int, x: torch.Tensor) -> torch.Tensor:
        x_std = (x - clt.input_mean[layer]) / clt.input_std[layer]
        z = x_std @ clt.W_enc[layer].T + clt.b_enc[layer]
        a = torch.where(z > clt.log_threshold[layer].exp(), z, torch.zeros_like(z))
        for target in range(layer, clt.cfg.num_layers):
            pending[target] = pending.get(target, 0) + a @ clt.W_dec[layer][:, target - layer]
        y_std = pending[layer] + clt.b_dec[layer]
        if clt.cfg.skip_connection:
            y_std = y_std + x_std @ clt.W_skip[layer].T
        return y_std * clt.output_std[layer] + clt.output_mean[layer]

    return layer_output


def test_store_windows_are_the_extracted_windows(setup):
    _, tokenizer, store, extractor = setup
    rebuilt = store_windows(store, tokenizer)
    expected = [w.token_ids for w in extractor.windows()][: len(rebuilt)]
    assert [w.token_ids for w in rebuilt[:-1]] == expected[:-1]
    last = rebuilt[-1].token_ids  # the extraction stopped inside the last window: its prefix
    assert 2 <= len(last) <= len(expected[-1]) and last == expected[-1][: len(last)]
    assert sum(len(w.token_ids) - 1 for w in rebuilt) == store.n_tokens  # every row, BOS added back


def test_kl_equals_plain_hook_splicing(setup):
    model, tokenizer, store, _ = setup
    clt = random_transcoder(store, skip_connection=True)
    objective = KLObjective(model, tokenizer, store, clt)
    windows = [w for w in store_windows(store, tokenizer) if len(w.token_ids) == 24][:3]
    kl = objective.loss(clt, windows)
    ids = torch.tensor([w.token_ids for w in windows])
    expected = hooked_kl(model, ids, clt_by_hand(clt)).detach()
    assert float(expected) > 1e-3  # far from trivially zero (the tiny model is insensitive)
    assert float(kl.detach()) == pytest.approx(float(expected), abs=1e-5, rel=1e-5)


def test_kl_gradient_matches_finite_differences(setup):
    """Directional derivatives along random directions of four parameters, by central differences."""
    _, tokenizer, store, _ = setup
    model = copy.deepcopy(setup[0]).double()
    for module in model.modules():  # Llama's RMSNorm computes in float32: make it float64 too
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = functools.partial(_rms_norm_float64, module)
    clt = random_transcoder(store, dtype=torch.float64, activation_fn="relu")
    objective = KLObjective(model, tokenizer, store, clt)
    windows = objective.windows_at(0)[:2]
    params = {"W_enc": clt.W_enc, "b_enc": clt.b_enc, "W_dec.0": clt.W_dec[0], "b_dec": clt.b_dec}
    grads = torch.autograd.grad(objective.loss(clt, windows), list(params.values()))
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for (name, param), grad in zip(params.items(), grads):
        direction = torch.randn(param.shape, generator=g, dtype=param.dtype)
        with torch.no_grad():
            param += eps * direction
            up = float(objective.loss(clt, windows))
            param -= 2 * eps * direction
            down = float(objective.loss(clt, windows))
            param += eps * direction
        analytic = float((grad * direction).sum())
        assert abs(analytic) > 1e-5, name
        assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-5), name


def _rms_norm_float64(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return norm.weight * hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + norm.variance_epsilon)


def test_training_with_kl_lowers_the_replacement_kl(setup):
    _, tokenizer, store, _ = setup
    model = copy.deepcopy(setup[0])
    with torch.no_grad():  # sharper next-token distributions (the MLP activations, and the store, are unchanged)
        model.lm_head.weight *= 30
    texts = list(load_texts("pydoc"))[-20:]  # text the store has not seen
    results = {}
    for coef in (0.0, 1000.0):  # the KL (~0.02 nats) is tiny next to the summed squared error (~60)
        cfg = CLTConfig(
            num_features=32, num_layers=store.num_layers, d_model=store.d_model, activation_fn="topk", topk=4, seed=0
        )
        training = TrainingConfig(
            learning_rate=3e-3,
            batch_size=64,
            training_steps=120,
            lr_warmup_steps=10,
            kl_coef=coef,
            kl_windows=4,
            seed=0,
            log_every=1000,
        )
        trainer = CLTTrainer(cfg, training, store, language_model=(model, tokenizer))
        clt = trainer.train(progress=False)
        results[coef] = replacement_metrics(model, tokenizer, clt, texts, context_length=24).kl
        if coef:
            assert "kl" in trainer.history[-1]
    assert results[1000.0] < 0.9 * results[0.0], results  # measured (seeded): 0.0147 vs 0.0181


def test_kl_needs_the_model_and_store_metadata(setup):
    model, tokenizer, store, _ = setup
    cfg = CLTConfig(num_features=8, num_layers=store.num_layers, d_model=store.d_model)
    with pytest.raises(ValueError, match="needs the language model"):
        CLTTrainer(cfg, TrainingConfig(kl_coef=0.1), store)
    x, y = store.tensors()
    bare = ActivationStore.from_nnsight_activations({"inputs": x, "outputs": y})
    with pytest.raises(StoreError, match="token_ids/positions/window_ids"):
        CLTTrainer(cfg, TrainingConfig(kl_coef=0.1), bare, language_model=(model, tokenizer))


def test_molt_splice_equals_its_own_forward_in_plain_hooks(setup):
    """A MOLT is per-layer: hooks that run its forward on the layer's input alone give the same KL."""
    model, tokenizer, store, _ = setup
    molt = CrossLayerTranscoder.from_config(
        CLTConfig(
            num_features=14,
            num_layers=store.num_layers,
            d_model=store.d_model,
            architecture="molt",
            cross_layer=False,
            molt_ranks=[4, 2, 1],
            activation_fn="relu",
            model_name=store.model_name,
        )
    )
    stats = store.norm_stats()
    molt.set_normalization(stats.input_mean, stats.input_std, stats.output_mean, stats.output_std)
    with torch.no_grad():
        for U in molt.U:
            U.mul_(300)  # a MOLT starts with small outputs: make the splice matter
    windows = [w for w in store_windows(store, tokenizer) if len(w.token_ids) == 24][:3]
    ids = torch.tensor([w.token_ids for w in windows])

    def layer_output(layer: int, x_layer: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(*x_layer.shape[:-1], store.num_layers, store.d_model)
        x[..., layer, :] = x_layer
        return molt(x).reconstruction[..., layer, :]

    with torch.no_grad():
        expected = float(hooked_kl(model, ids, layer_output))
    kl = float(KLObjective(model, tokenizer, store, molt).loss(molt, windows).detach())
    assert expected > 1e-4
    assert kl == pytest.approx(expected, abs=1e-6, rel=1e-5)
