"""Planted dictionaries for recovery tests: sparse features with known decoders, optional skip."""

from __future__ import annotations

from collections.abc import Callable

import torch

from clt.models import CrossLayerTranscoder
from clt.training.losses import compute_losses, sparsity_lambda_at

Sampler = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def planted_dictionary(
    layers: int,
    d: int,
    *,
    cross: bool,
    features: int = 24,
    skip: torch.Tensor | None = None,
    sae: bool = False,
    noise: float = 0.0,
) -> tuple[list[torch.Tensor], Sampler]:
    """True decoders D[l] [features, L_out, d] (unit norm per feature) and a sampler of (x, y) (seed 0).

    x_l = Σ_i a_l,i E_l,i + noise·N(0, I) with sparse a (each feature on with probability 0.03,
    value in [0.5, 1.5]);
    y_l' = Σ_{l ≤ l'} a_l D[l→l'] (CLT) or a_l D[l] (PLT), plus x_l' skip[l']ᵀ when `skip`
    [L, d, d] is given; with `sae` the targets are the inputs (y = x, decoders = encoders).
    """
    g, p = torch.Generator().manual_seed(0), 0.03
    enc = torch.randn(layers, d, features, generator=g)
    enc /= enc.norm(dim=1, keepdim=True)
    dec = [torch.randn(features, layers - l if cross else 1, d, generator=g) for l in range(layers)]
    dec = [w / w.flatten(1).norm(dim=1)[:, None, None] for w in dec]
    if sae:
        dec = [enc[l].T[:, None, :].clone() for l in range(layers)]

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = (torch.rand(n, layers, features, generator=g) < p) * (0.5 + torch.rand(n, layers, features, generator=g))
        x = torch.einsum("nlf,ldf->nld", a, enc)
        if noise:
            x = x + noise * torch.randn(x.shape, generator=g)
        if sae:
            return x, x.clone()
        y = torch.zeros(n, layers, d)
        for l, w in enumerate(dec):
            y[:, l : l + w.shape[1]] += torch.einsum("nf,fjd->njd", a[:, l], w)
        if skip is not None:
            y += torch.einsum("nli,loi->nlo", x, skip)
        return x, y

    return dec, sample


def max_cosines(true: list[torch.Tensor], learned: list[torch.Tensor]) -> torch.Tensor:
    """For each true decoder row (all layers), its best cosine with a learned row of its layer."""
    cos = []
    for t, w in zip(true, learned):
        t = torch.nn.functional.normalize(t.flatten(1), dim=1)
        w = torch.nn.functional.normalize(w.detach().flatten(1), dim=1)
        cos.append((t @ w.T).max(dim=1).values)
    return torch.cat(cos)


def train_planted(
    model: CrossLayerTranscoder,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch: int = 256,
    sparsity: float = 0.0,
    lr: float = 1e-2,
    seed: int = 1,
) -> CrossLayerTranscoder:
    """Adam on standardised (x, y) with `compute_losses` (λ ramps to `sparsity` over the first
    tenth, the learning rate decays linearly over the second half); returns the model in eval."""
    model.set_normalization(x.mean(0), x.std(0), y.mean(0), y.std(0))
    xs, ys = model.normalize_inputs(x), model.normalize_outputs(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 2 * (1 - s / steps)))
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        lam = sparsity_lambda_at(s, sparsity, steps // 10)
        terms, _ = compute_losses(model, xs[idx], ys[idx], sparsity_coef=lam)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
        sched.step()
    return model.eval()


def planted_transforms(
    layers: int, d: int, *, transforms: int = 4, rank: int = 2, p: float = 0.15, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Sampler]:
    """Planted MOLT: x ~ N(0, I), gates a_i = relu(e_i·x − t) (orthonormal e_i, each on with
    probability p, so no two transforms always fire together),
    y_l = Σ_i a_l,i U_l,iᵀ V_l,i x_l. Returns U, V [L, transforms, rank, d], the gates of
    inputs x [n, L, d] → a [n, L, transforms], and a sampler."""
    g = torch.Generator().manual_seed(seed)
    gate_dirs = torch.linalg.qr(torch.randn(layers, d, transforms, generator=g))[0].transpose(1, 2)
    U = torch.randn(layers, transforms, rank, d, generator=g) / d**0.5
    V = torch.randn(layers, transforms, rank, d, generator=g) / d**0.5
    t = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - p)))

    def gates(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.einsum("nld,lkd->nlk", x, gate_dirs) - t)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, layers, d, generator=g)
        h = torch.einsum("nld,lkrd->nlkr", x, V) * gates(x)[..., None]
        return x, torch.einsum("nlkr,lkro->nlo", h, U)

    return U, V, gates, sample


def subspace_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the largest principal angle between the column spaces of a and b ([d, r] each,
    orthonormalised here): 1 when the subspaces coincide."""
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    return float(torch.linalg.svdvals(qa.T @ qb).min())
