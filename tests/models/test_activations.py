"""Activation functions: JumpReLU/step pseudo-gradients, TopK and BatchTopK selection."""

from __future__ import annotations

import math

import pytest
import torch

from clt.config.transcoder import CLTConfig
from clt.models import BatchTopK, CrossLayerTranscoder, batchtopk, jumprelu, rectangle, relu, step, topk


def _normal_pdf(t: float) -> float:
    return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def test_rectangle_is_the_open_unit_interval():
    u = torch.tensor([-0.75, -0.5, -0.4999, 0.0, 0.4999, 0.5, 0.75])
    assert rectangle(u).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_relu_and_jumprelu_forward():
    z = torch.tensor([[-1.0, 0.02, 0.05, 0.5]], dtype=torch.float64)
    theta = torch.tensor([0.03, 0.03, 0.03, 0.6], dtype=torch.float64)
    assert relu(z).tolist() == [[0.0, 0.02, 0.05, 0.5]]
    assert jumprelu(z, theta, 0.1).tolist() == [[0.0, 0.0, 0.05, 0.0]]
    assert step(z, theta, 0.1).tolist() == [[0.0, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize("bandwidth", [0.05, 0.5])
def test_jumprelu_pseudo_gradient_is_the_documented_one(bandwidth):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    theta = (torch.rand(3, 10, generator=g, dtype=torch.float64) * 0.5 + 0.05).requires_grad_()
    upstream = torch.randn(64, 3, 10, generator=g, dtype=torch.float64)
    jumprelu(z, theta, bandwidth).backward(upstream)
    zd, td = z.detach(), theta.detach()
    kernel = ((zd - td).abs() < bandwidth / 2).double()
    assert torch.equal(z.grad, upstream * (zd > td))
    assert torch.allclose(theta.grad, (-(td / bandwidth) * kernel * upstream).sum(0))
    assert kernel.sum() > 10, "the check must exercise the kernel"

    z.grad = theta.grad = None
    step(z, theta, bandwidth).backward(upstream)
    assert torch.equal(z.grad, torch.zeros_like(zd))
    assert torch.allclose(theta.grad, (-(1 / bandwidth) * kernel * upstream).sum(0))


def test_jumprelu_z_gradient_matches_finite_differences_where_smooth():
    g = torch.Generator().manual_seed(1)
    theta = torch.full((5,), 0.3, dtype=torch.float64)
    z = torch.randn(40, 5, generator=g, dtype=torch.float64)
    z = torch.where((z - theta).abs() < 0.05, z + 0.2, z).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: jumprelu(t, theta, 0.1), (z,), eps=1e-6)


@pytest.mark.parametrize("theta", [0.3, 1.0])
def test_theta_pseudo_gradient_matches_finite_differences_of_the_expectation(theta):
    """Averaged over z ~ N(0, 1), the STE is a kernel estimate of d/dθ E[f(z, θ)]."""
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps, h = 0.1, 0.05
    for fn, exact in ((jumprelu, -theta * _normal_pdf(theta)), (step, -_normal_pdf(theta))):
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        fn(z, t, eps).mean().backward()
        up, down = fn(z, torch.tensor(theta + h), eps), fn(z, torch.tensor(theta - h), eps)
        finite_diff = (up.mean() - down.mean()) / (2 * h)
        assert t.grad.item() == pytest.approx(exact, rel=0.02)
        assert finite_diff.item() == pytest.approx(exact, rel=0.02)


def test_log_threshold_gets_chain_rule_gradient_in_the_model():
    cfg = CLTConfig(num_features=6, num_layers=2, d_model=4, activation_fn="jumprelu", jumprelu_bandwidth=0.5)
    model = CrossLayerTranscoder(cfg)
    x = torch.randn(50, 2, 4, generator=torch.Generator().manual_seed(3))
    out = model(x)
    out.features.sum().backward()
    z, theta = out.preactivations.detach(), model.threshold.detach()
    expected = (-(theta / 0.5) * rectangle((z - theta) / 0.5)).sum(0) * theta
    assert torch.allclose(model.log_threshold.grad, expected, atol=1e-6)
    assert expected.abs().sum() > 0


def test_topk_keeps_exactly_k_largest_per_token_and_layer():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(7, 5, 3, 20, generator=g) + 3.0
    a = topk(z, 4)
    assert torch.equal((a != 0).sum(-1), torch.full((7, 5, 3), 4))
    largest = z.sort(-1, descending=True).values[..., :4]
    assert torch.equal(a.sort(-1, descending=True).values[..., :4], largest)
    negative = -torch.rand(2, 3, 20, generator=g)
    assert torch.equal(topk(negative, 4), torch.zeros_like(negative))
    z.requires_grad_()
    topk(z, 4).sum().backward()
    assert torch.equal(z.grad, (a != 0).float())


@pytest.mark.parametrize("lead", [(32,), (4, 8)])
def test_batchtopk_keeps_exactly_k_times_batch(lead):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(*lead, 3, 16, generator=g)
    n = math.prod(lead)
    per_layer = batchtopk(z, 2, "layer")
    counts = (per_layer != 0).reshape(n, 3, 16).sum(dim=(0, 2))
    assert counts.tolist() == [2 * n] * 3
    for l in range(3):
        kept, zl = per_layer[..., l, :], z[..., l, :]
        assert kept[kept != 0].min() >= zl[kept == 0].max()
    across = batchtopk(z, 2, "all")
    assert int((across != 0).sum()) == 2 * n * 3
    assert across[across != 0].min() >= z[across == 0].max()
    assert torch.equal(across[across != 0], z[across != 0]), "kept values are the pre-activations"


def test_batchtopk_keeps_all_positives_when_too_few():
    z = -torch.ones(10, 2, 8)
    z[0, 0, :3] = torch.tensor([0.5, 0.2, 0.1])
    a = batchtopk(z, 2, "layer")
    assert int((a != 0).sum()) == 3 and torch.equal(a[0, 0, :3], z[0, 0, :3])


def test_batchtopk_threshold_ema_and_eval_rule():
    module = BatchTopK(num_layers=2, k=1, scope="layer", momentum=0.5)
    z1 = torch.tensor([[[3.0, 1.0, 0.0], [2.0, 5.0, 0.0]], [[0.5, 4.0, 0.0], [1.0, 0.1, 6.0]]])
    a = module(z1)
    assert a.tolist() == [[[3.0, 0.0, 0.0], [0.0, 5.0, 0.0]], [[0.0, 4.0, 0.0], [0.0, 0.0, 6.0]]]
    assert module.threshold.tolist() == [3.0, 5.0]
    z2 = z1 * 2
    module(z2)
    assert module.threshold.tolist() == [0.5 * 3 + 0.5 * 6, 0.5 * 5 + 0.5 * 10]
    module.eval()
    frozen = module.threshold.clone()
    out = module(z1)
    assert torch.equal(out, torch.where(z1 > frozen[:, None], z1, 0.0))
    assert torch.equal(module.threshold, frozen), "eval must not update the threshold"
    assert torch.equal(module(z1[:1]), out[:1]), "eval is a per-token rule"


def test_batchtopk_scope_all_shares_one_threshold():
    module = BatchTopK(num_layers=2, k=1, scope="all")
    z = torch.tensor([[[3.0, 1.0], [2.0, 5.0]], [[0.5, 4.0], [1.0, 0.1]]])
    module(z)
    assert module.threshold.tolist() == [2.0, 2.0]


def test_model_uses_batchtopk_threshold_in_eval():
    cfg = CLTConfig(num_features=12, num_layers=2, d_model=6, activation_fn="batchtopk", topk=2)
    model = CrossLayerTranscoder(cfg)
    x = torch.randn(64, 2, 6, generator=torch.Generator().manual_seed(6))
    train_out = model(x)
    assert (train_out.features != 0).sum().item() == 2 * 64 * 2
    assert torch.all(model.batchtopk.threshold > 0)
    model.eval()
    out = model(x)
    thr = model.threshold
    assert torch.equal(out.features, torch.where(out.preactivations > thr, out.preactivations, 0.0))
    few = model(x[:3]).features
    assert torch.allclose(few, out.features[:3], atol=1e-6), "eval is a per-token rule"
