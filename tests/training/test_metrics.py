"""Replacement-model and reconstruction metrics on constructed cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import splice_rounding, spliced_logits_on

from clt.config.transcoder import CLTConfig
from clt.models.transcoder import CrossLayerTranscoder
from clt.training.metrics import reconstruction_metrics, replacement_metrics

TEXTS = [
    "Lists are mutable sequences.",
    "The for statement iterates over the items of any sequence.",
    "A class definition defines a class object.",
]


def rounding(model, tokenizer, transcoder, metrics) -> dict[str, float]:
    """How far float32 rounding alone can move the metrics of a splice that equals the model (helpers)."""
    logits = spliced_logits_on(model, tokenizer, transcoder, TEXTS, "none")
    return splice_rounding(float(logits.abs().max()), logits.shape[-1], metrics.n_tokens, metrics.ce_original)


def test_exact_transcoder_gives_kl_zero_and_full_agreement(relu_gpt2, exact_plt):
    """The splice equals the model up to float32 rounding, which differs between CPUs' kernels: every
    metric is bounded by what that rounding can do (`splice_rounding`), never asserted exactly."""
    model, tokenizer = relu_gpt2
    plt = exact_plt(model)
    metrics = replacement_metrics(model, tokenizer, plt, TEXTS)
    bound = rounding(model, tokenizer, plt, metrics)
    assert abs(metrics.kl) <= bound["kl"]
    assert metrics.top1_agreement == 1.0  # the smallest top-1/top-2 logit gap here, 2.2e-3, is ≫ 2δ
    assert abs(metrics.ce_replaced - metrics.ce_original) <= bound["ce"]
    # ce_recovered − 1 = (ce_original − ce_replaced) / gap, with gap = 3.2e-3 nats here
    gap = metrics.ce_zero_ablated - metrics.ce_original
    assert abs(metrics.ce_recovered - 1.0) <= bound["ce"] / gap
    assert metrics.ce_zero_ablated != pytest.approx(metrics.ce_original)


def zero_output(clt: CrossLayerTranscoder) -> CrossLayerTranscoder:
    """The same transcoder with decoder and decoder bias zeroed: it reconstructs 0 everywhere."""
    with torch.no_grad():
        for w in clt.W_dec:
            w.zero_()
        clt.b_dec.zero_()
    return clt


def test_zero_transcoder_recovers_nothing(relu_gpt2, exact_plt):
    model, tokenizer = relu_gpt2
    clt = zero_output(exact_plt(model))
    metrics = replacement_metrics(model, tokenizer, clt, TEXTS)
    # Rounding alone gives a KL of at most ~7e-12 here (`rounding`); removing the MLPs gives ~1e-3.
    assert abs(metrics.ce_recovered) < 1e-5 and metrics.kl > 1e-5


def test_bos_position_keeps_the_models_mlp_outputs(relu_gpt2, exact_plt):
    """The zero transcoder's CE equals a plain-hook run that zeroes every MLP output except at BOS."""
    model, tokenizer = relu_gpt2
    clt = zero_output(exact_plt(model))
    text = TEXTS[1]
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])

    def ce(keep_bos: bool) -> float:
        def zero(module, args, output):
            out = torch.zeros_like(output)
            if keep_bos:
                out[:, 0] = output[:, 0]
            return out

        handles = [block.mlp.register_forward_hook(zero) for block in model.transformer.h]
        try:
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]
        finally:
            for h in handles:
                h.remove()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))

    kept = replacement_metrics(model, tokenizer, clt, [text])
    replaced = replacement_metrics(model, tokenizer, clt, [text], keep_bos=False)
    assert kept.ce_replaced == pytest.approx(ce(True), rel=1e-5)
    assert replaced.ce_replaced == pytest.approx(ce(False), rel=1e-5)
    assert ce(True) != pytest.approx(ce(False), rel=1e-6)  # the BOS position matters (a little, here)


def test_cross_layer_decoders_feed_later_layers(relu_gpt2, exact_plt):
    """Moving part of layer 0's decoder to its cross-layer slot must change the spliced logits."""
    model, tokenizer = relu_gpt2
    plt = exact_plt(model)
    clt = CrossLayerTranscoder(plt.cfg.replace(cross_layer=True))
    clt.load_state_dict({k: v for k, v in plt.state_dict().items() if not k.startswith("W_dec")}, strict=False)
    with torch.no_grad():
        for l in range(3):
            clt.W_dec[l].zero_()
            clt.W_dec[l][:, 0] = plt.W_dec[l][:, 0]
    exact = replacement_metrics(model, tokenizer, clt, TEXTS)
    bound = rounding(model, tokenizer, clt, exact)
    assert abs(exact.kl) <= bound["kl"]
    with torch.no_grad():
        clt.W_dec[0][:, 1] = 0.5 * plt.W_dec[0][:, 0]
    # far above rounding (bound["kl"] ~ 7e-12) and below the ~7e-5 this change gives
    assert replacement_metrics(model, tokenizer, clt, TEXTS).kl > 1e-5


def test_reconstruction_metrics_on_an_exact_transcoder(relu_gpt2, exact_plt):
    model, tokenizer = relu_gpt2
    from clt.nnsight.extractors import ActivationExtractor

    store = ActivationExtractor("relu-gpt2", model=model, tokenizer=tokenizer).extract(
        TEXTS * 3, max_tokens=200, store_dtype="float32", progress=False
    )
    clt = exact_plt(model)
    metrics = reconstruction_metrics(clt, store)
    assert metrics.fvu < 1e-10 and max(metrics.fvu_per_layer) < 1e-10
    x, _ = store.tensors()
    expected_l0 = [(clt.encode(x)[:, l] > 0).float().sum(-1).mean().item() for l in range(3)]
    assert metrics.l0_per_layer == pytest.approx(expected_l0)
    assert metrics.activation_frequency.shape == (3, clt.cfg.num_features)


def test_mismatched_transcoder_is_rejected(relu_gpt2):
    model, tokenizer = relu_gpt2
    wrong = CrossLayerTranscoder(CLTConfig(num_features=32, num_layers=3, d_model=16))
    with pytest.raises(ValueError, match="does not fit the model"):
        replacement_metrics(model, tokenizer, wrong, TEXTS)


def test_low_precision_transcoder_is_spliced_in_its_own_dtype(relu_gpt2, exact_plt):
    """A bfloat16 copy of the exact transcoder: standardised in float32, then run in bfloat16.

    Its logits differ from the model's by bf16 rounding, far above fp32 rounding (so the bf16 path
    ran) and within a few bf16 steps; every metric is then bounded by that logit change δ, and no
    assertion rests on the sign or value of a rounding-level number (which differ between CPUs)."""
    from clt.data.corpus import load_texts, token_windows
    from clt.data.windows import pad_windows
    from clt.nnsight.splice import language_model, spliced_logits

    model, tokenizer = relu_gpt2
    exact = exact_plt(model)
    low = CrossLayerTranscoder(exact.cfg.replace(dtype="bfloat16"))
    low.load_state_dict(exact.state_dict())
    assert low.W_enc.dtype == torch.bfloat16
    windows = list(token_windows(load_texts(TEXTS), tokenizer, 64, prepend_bos=True))
    ids, mask = pad_windows(windows, tokenizer.pad_token_id)
    lm, paths = language_model(model, tokenizer, low)
    original = spliced_logits(lm, paths, low, ids, mask, "none")
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[:, 0] = True  # the BOS position keeps the model's outputs, as replacement_metrics does by default
    delta = (spliced_logits(lm, paths, low, ids, mask, "replace", keep) - original)[mask.bool()]
    fp32_delta = (spliced_logits(lm, paths, exact, ids, mask, "replace", keep) - original)[mask.bool()]
    scale = float(original.abs().max())
    bf16_step, fp32_step = torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float32).eps
    max_delta = float(delta.abs().max())
    # Rounding the weights to bf16 moves the logits by ~scale * bf16 step; fp32 moves them by far less.
    assert float(fp32_delta.abs().max()) <= 64 * fp32_step * scale
    assert 0.01 * bf16_step * scale < max_delta < 8 * bf16_step * scale

    metrics = replacement_metrics(model, tokenizer, low, TEXTS)
    # KL(p || softmax(logits + δ)) <= (max δ - min δ)^2 / 8 (Hoeffding's lemma), plus the fp32 error of
    # log-softmax terms of size |logits| + log V.
    noise = 16 * fp32_step * (scale + torch.log(torch.tensor(float(original.shape[-1]))).item())
    assert abs(metrics.kl) <= (2 * max_delta) ** 2 / 8 + noise
    # Each position's NLL moves by at most 2 max|δ|.
    assert abs(metrics.ce_replaced - metrics.ce_original) <= 2 * max_delta + noise
    # Only positions whose top-2 logit margin is below 2 max|δ| can change their top token.
    top2 = original[:, :-1][mask[:, 1:].bool() & mask[:, :-1].bool()].topk(2, -1).values
    fragile = float(((top2[:, 0] - top2[:, 1]) < 2 * max_delta).float().mean())
    assert metrics.top1_agreement >= 1 - fragile


def test_next_token_kl_is_accurate_from_rounding_level_to_far_apart_logits():
    """Against float64, for logit changes from 1e-6 to 100 (where expm1 would overflow: log-sum-exp).

    Float32 rounds the sums E_p[expm1(a)] and E_p[a] (a = d − c) by ≤ ⌈log2 V⌉ eps32 E_p|a| each, and
    p by a relative eps32 (|logit − max| + 2), which changes the KL by that relative amount. The old
    Σ p (log p − log q) erred by up to eps32 (log V + max|logit|) per position: 2e-7 for the smallest
    change here, 1e4 times this bound."""
    from clt.training.metrics import next_token_kl

    g = torch.Generator().manual_seed(0)
    logits_p = 3 * torch.randn(2, 5, 300, generator=g)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    eps, V = torch.finfo(torch.float32).eps, logits_p.shape[-1]
    spread = float(logits_p.max(-1).values.max() - logits_p.min())
    for scale in (1e-6, 1e-3, 1.0, 100.0):
        logits_q = logits_p + scale * torch.randn(2, 5, 300, generator=g) + 7.0  # a shift changes nothing
        p, q = logits_p[valid].double().log_softmax(-1), logits_q[valid].double().log_softmax(-1)
        want = float((p.exp() * (p - q)).sum())
        d = logits_q[valid].double() - logits_p[valid].double()
        a = d - (p.exp() * d).sum(-1, keepdim=True)
        sums = 2 * (math.ceil(math.log2(V)) + 2) * eps * float((p.exp() * a.abs()).sum())
        assert abs(float(next_token_kl(logits_p, logits_q, valid)) - want) <= sums + 2 * eps * (spread + 2) * want
    logits_q = (logits_p + torch.randn(2, 5, 300, generator=g)).requires_grad_()
    next_token_kl(logits_p, logits_q, valid).backward()
    expected = torch.where(valid[..., None], logits_q.detach().softmax(-1) - logits_p.softmax(-1), 0.0)
    torch.testing.assert_close(logits_q.grad, expected, atol=1e-6, rtol=1e-5)
