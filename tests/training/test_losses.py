"""Loss functions: hand-computed values, gradients reaching the right tensors, the composer."""

from __future__ import annotations

import math

import pytest
import torch

from clt.config.transcoder import CLTConfig
from clt.models import CrossLayerTranscoder
from clt.training.losses import (
    LossTerms,
    auxiliary_topk_loss,
    compute_losses,
    fvu,
    preactivation_loss,
    reconstruction_loss,
    sparsity_lambda_at,
    sparsity_loss,
)


def test_reconstruction_loss_sums_layers_and_dims_and_averages_tokens():
    target = torch.zeros(2, 3, 2, 4)
    recon = target.clone()
    recon[0, 0, 1, 2] = 2.0
    recon[1, 2, 0, 0] = 1.0
    assert reconstruction_loss(recon, target).item() == pytest.approx((4.0 + 1.0) / 6)
    assert reconstruction_loss(target, target).item() == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_loss(recon[..., :3], target)


def test_fvu_known_values():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(500, 3, 8, generator=g) + 2.0
    mean = target.mean(0, keepdim=True).expand_as(target)
    assert torch.allclose(fvu(target, target), torch.zeros(3))
    assert torch.allclose(fvu(mean, target), torch.ones(3), atol=1e-6)
    recon = mean.clone()
    recon[:, 1] = 0.5 * target[:, 1] + 0.5 * mean[:, 1]
    recon[:, 2] = target[:, 2]
    assert torch.allclose(fvu(recon, target), torch.tensor([1.0, 0.25, 0.0]), atol=1e-6)
    var = (target - mean).square().sum(dim=(0, 2))
    overall = (var[0] + 0.25 * var[1]) / var.sum()
    assert fvu(recon, target, per_layer=False).item() == pytest.approx(overall.item(), rel=1e-5)


def test_sparsity_loss_tanh_and_l1():
    a = torch.tensor([[[0.0, 2.0], [1.0, 0.5]], [[3.0, 0.0], [0.0, 0.0]]])
    norms = torch.tensor([[1.0, 0.5], [2.0, 4.0]])
    tanh_expected = (math.tanh(3.0) + 2 * math.tanh(6.0) + math.tanh(9.0)) / 2
    loss = sparsity_loss(a, norms, coefficient=0.1, c=3.0)
    assert loss.item() == pytest.approx(0.1 * tanh_expected, rel=1e-6)
    l1_expected = (1.0 + 2.0 + 2.0 + 3.0) / 2
    assert sparsity_loss(a, norms, kind="l1").item() == pytest.approx(l1_expected)
    with pytest.raises(ValueError, match="sparsity kind 'l2'"):
        sparsity_loss(a, norms, kind="l2")


def test_sparsity_gradient_reaches_decoder_norms_of_active_features_only():
    a = torch.tensor([[[0.0, 2.0]]])
    norms = torch.tensor([[1.0, 1.0]], requires_grad=True)
    sparsity_loss(a, norms, c=0.5).backward()
    assert norms.grad[0, 0] == 0
    assert norms.grad[0, 1].item() == pytest.approx(2 * 0.5 * (1 - math.tanh(1.0) ** 2))


def test_sparsity_lambda_warmup():
    assert sparsity_lambda_at(0, 2.0, 100) == 0.0
    assert sparsity_lambda_at(50, 2.0, 100) == pytest.approx(1.0)
    assert sparsity_lambda_at(100, 2.0, 100) == 2.0
    assert sparsity_lambda_at(10_000, 2.0, 100) == 2.0
    assert sparsity_lambda_at(0, 2.0, 0) == 2.0


def test_preactivation_loss_values_and_gradients():
    z = torch.tensor([[[-1.0, 0.5], [0.02, 0.2]]], requires_grad=True)
    theta = torch.full((2, 2), 0.1)
    norms = torch.tensor([[2.0, 1.0], [3.0, 1.0]])
    loss = preactivation_loss(z, theta, norms, coefficient=0.5)
    assert loss.item() == pytest.approx(0.5 * (1.1 * 2.0 + 0.08 * 3.0))
    loss.backward()
    expected = torch.tensor([[[-1.0, 0.0], [-1.5, 0.0]]])
    assert torch.allclose(z.grad, expected), "raising z lowers the loss"


def _linear_decoder(weight: torch.Tensor):
    return lambda a: torch.einsum("...lf,lfd->...ld", a, weight)


def test_auxiliary_loss_uses_only_the_top_dead_features():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20, 2, 6, generator=g, requires_grad=True)
    weight = torch.randn(2, 6, 4, generator=g)
    residual = torch.randn(20, 2, 4, generator=g)
    dead = torch.zeros(2, 6, dtype=torch.bool)
    dead[0, [1, 4]] = True
    dead[1, [0, 2, 5]] = True
    loss = auxiliary_topk_loss(z, residual, dead, _linear_decoder(weight), k_aux=2, coefficient=0.5)

    masked = z.detach().masked_fill(~dead, -math.inf)
    idx = masked.topk(2, dim=-1).indices
    aux = torch.zeros_like(z).scatter(-1, idx, torch.relu(z.detach().gather(-1, idx)))
    err = (torch.einsum("nlf,lfd->nld", aux, weight) - residual).square().sum(dim=(1, 2)).mean()
    expected = 0.5 * err / residual.square().sum(dim=(1, 2)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert torch.all(z.grad[:, ~dead] == 0), "live features get no auxiliary gradient"
    assert z.grad[:, dead].abs().sum() > 0


def test_auxiliary_loss_is_zero_without_dead_features_and_when_residual_is_explained():
    z = torch.randn(5, 2, 3)
    weight = torch.randn(2, 3, 4)
    dead = torch.zeros(2, 3, dtype=torch.bool)
    decode = _linear_decoder(weight)
    assert auxiliary_topk_loss(z, torch.randn(5, 2, 4), dead, decode, k_aux=2).item() == 0.0
    dead[:, 0] = True
    z = z.abs()
    residual = torch.einsum("nl,ld->nld", z[..., 0], weight[:, 0])
    loss = auxiliary_topk_loss(z, residual, dead, decode, k_aux=4)
    assert loss.item() == pytest.approx(0, abs=1e-10)
    with pytest.raises(ValueError, match="dead_mask"):
        auxiliary_topk_loss(z, residual, dead[:1], _linear_decoder(weight), k_aux=1)


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk", "batchtopk"])
def test_compute_losses_composes_the_terms(act):
    cfg = CLTConfig(num_features=10, num_layers=3, d_model=5, activation_fn=act, topk=2)
    model = CrossLayerTranscoder(cfg)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 3, 5, generator=g), torch.randn(32, 3, 5, generator=g)
    dead = torch.zeros(3, 10, dtype=torch.bool)
    dead[:, :4] = True
    terms, out = compute_losses(
        model, x, y, sparsity_coef=0.1, sparsity_c=2.0, preactivation_coef=0.01, dead_mask=dead, k_aux=3, aux_coef=0.25
    )
    assert isinstance(terms, LossTerms)
    expected_recon = reconstruction_loss(out.reconstruction, y)
    assert terms.reconstruction.item() == pytest.approx(expected_recon.item())
    norms = model.decoder_norms()
    expected_sparsity = sparsity_loss(out.features, norms, coefficient=0.1, c=2.0)
    assert terms.sparsity.item() == pytest.approx(expected_sparsity.item())
    if act == "jumprelu":
        expected_pre = preactivation_loss(out.preactivations, model.threshold, norms, coefficient=0.01)
        assert expected_pre.item() > 0
        assert terms.preactivation.item() == pytest.approx(expected_pre.item())
    else:
        assert terms.preactivation.item() == 0.0
    if act in ("topk", "batchtopk"):
        expected_aux = auxiliary_topk_loss(
            out.preactivations,
            y - out.reconstruction,
            dead,
            lambda a: model.decode_normalized(a, bias=False),
            k_aux=3,
            coefficient=0.25,
        )
        assert expected_aux.item() > 0
        assert terms.auxiliary.item() == pytest.approx(expected_aux.item())
    else:
        assert terms.auxiliary.item() == 0.0
    total = terms.reconstruction + terms.sparsity + terms.preactivation + terms.auxiliary
    assert terms.total.item() == pytest.approx(total.item())
    names = {"reconstruction", "sparsity", "preactivation", "auxiliary", "total"}
    assert set(terms.as_dict()) == names
    terms.total.backward()
    assert model.W_enc.grad is not None and all(w.grad is not None for w in model.W_dec)
