"""MOLT: a sparse mixture of linear transforms per layer (Anthropic, "Sparse mixtures of linear
transforms", 2025), as an architecture of the same dictionary class, trainer and store.

Per layer l (standardised input x̃ = (x − μ_in)/σ_in, F transforms i):

- gates        a_i = σ(e_i · x̃ + b_i)   — the transcoder's encoder rows W_enc, b_enc and its
               nonlinearity σ (ReLU, JumpReLU, TopK, BatchTopK per layer), unchanged;
- transforms   T_i = U_iᵀ V_i, a rank-r_i map: V_i [r_i, d] reads x̃, U_i [r_i, d] writes;
- output       ŷ = Σ_i a_i T_i x̃ + b_dec (+ W_skip x̃), then ŷ · σ_out + μ_out in raw space;
- sparsity     λ Σ_i tanh(c · a_i · ‖T_i‖_F): `decoder_norms` returns ‖T_i‖_F, so the
               transcoder's sparsity, pre-activation and auxiliary losses apply unchanged.
               ‖T_i‖_F² = Σ (U_i U_iᵀ) ⊙ (V_i V_iᵀ), from two r×r Gram matrices.

Ranks (``CLTConfig.molt_ranks`` = [r_0 > r_1 > ...]): group g holds N·2^g transforms of rank r_g,
so F = N·(2^G − 1) — few wide transforms and many narrow ones, as in the note (its default
[512, 256, 128, 64, 32]). Features (gates) are ordered by group: group 0 first.

Compute: per group, h = V x̃ [..., L, n_g, r_g] and ŷ += Σ_k (a_k h_k) U_k — dense in the gates,
O(tokens · L · d · Σ_g n_g r_g) per pass, without materialising the [tokens, F, d] products.

Limits: the output is not linear in the gates (x̃ enters each transform), so attribution graphs,
interventions and the circuit-tracer export refuse a MOLT; a MOLT acts on standardised inputs
and the mean shift T_i μ_in/σ_in is gated per transform, so `fold_normalization` refuses too.
Replacement-model metrics (KL, top-1, CE recovered) and reconstruction metrics work.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from clt.config.transcoder import CLTConfig
from clt.models.kernels import compute_dtype
from clt.models.transcoder import CrossLayerTranscoder, UnsupportedDictionaryError


def molt_group_sizes(cfg: CLTConfig) -> list[int]:
    """Number of transforms of each rank in `cfg.molt_ranks`: N, 2N, 4N, ... (N·(2^G−1) = F)."""
    groups = len(cfg.molt_ranks)
    n = cfg.num_features // (2**groups - 1)
    return [n * 2**g for g in range(groups)]


class MixtureOfLinearTransforms(CrossLayerTranscoder):
    """Per-layer MOLT (module docstring): the transcoder's encoder as gates, low-rank transforms
    U_g, V_g [L, n_g, r_g, d] per rank group instead of decoder vectors."""

    architecture = "molt"

    def _init_decoder(self, uniform: Callable[[tuple[int, ...], float], Tensor]) -> None:
        """V ~ U(±1/√d), U ~ U(±1/√(F·r)): initial outputs are small (as W_dec's)."""
        c = self.cfg
        L, F, d = c.num_layers, c.num_features, c.d_model
        sizes = molt_group_sizes(c)
        self.group_starts = [sum(sizes[:g]) for g in range(len(sizes) + 1)]
        self.V = nn.ParameterList(
            [nn.Parameter(uniform((L, n, r, d), 1 / math.sqrt(d))) for n, r in zip(sizes, c.molt_ranks)]
        )
        self.U = nn.ParameterList(
            [nn.Parameter(uniform((L, n, r, d), 1 / math.sqrt(F * r))) for n, r in zip(sizes, c.molt_ranks)]
        )

    def decoder_norms(self) -> Tensor:
        """‖T_i‖_F = ‖U_iᵀ V_i‖_F of every transform, [L, F]."""
        norms = []
        for U, V in zip(self.U, self.V):
            gram_u = torch.einsum("lkrd,lksd->lkrs", U, U)
            gram_v = torch.einsum("lkrd,lksd->lkrs", V, V)
            # clamped above 0: sqrt's gradient at an all-zero transform would be inf·0 = NaN
            norms.append((gram_u * gram_v).sum((-2, -1)).clamp_min(torch.finfo(U.dtype).tiny).sqrt())
        return torch.cat(norms, dim=1)

    def transforms(self, layer: int) -> Tensor:
        """The dense maps T_i [F, d_out, d_in] of layer `layer` (standardised space; for tests
        and inspection: F·d² numbers)."""
        return torch.cat([torch.einsum("kro,kri->koi", U[layer], V[layer]) for U, V in zip(self.U, self.V)])

    def uses_sparse_decode(self, features: Tensor | None = None) -> bool:
        """Never: a MOLT decodes densely in the gates."""
        return False

    def _decode_needs_inputs(self) -> bool:
        return True

    def _decode_features(self, features: Tensor, x_std: Tensor | None, start: int = 0) -> Tensor:
        """Σ_i a_i T_i x̃ [..., L, d] for gates [..., L, F] (no bias, no skip)."""
        if x_std is None:
            raise ValueError(
                "a MOLT's transforms act on the inputs: call decode_normalized("
                "features, x_std) or decode(features, x) with the inputs"
            )
        if start != 0 or features.shape[-1] != self.cfg.num_features:
            raise UnsupportedDictionaryError(
                "a MOLT decodes all its transforms together; it has no Matryoshka prefixes"
            )
        self._check_shape(x_std, self.cfg.d_model, "d_model", "inputs x")
        return torch.stack(
            [self.layer_output(l, features[..., l, :], x_std[..., l, :]) for l in range(self.cfg.num_layers)], dim=-2
        )

    def layer_output(self, layer: int, gates: Tensor, x_std: Tensor) -> Tensor:
        """Σ_i a_i T_i x̃ [..., d] of one layer from its gates [..., F] and standardised input
        x̃ [..., d] (no bias, no skip; in the autocast dtype when autocast is on)."""
        dtype = compute_dtype(gates, self.W_enc.dtype)
        a, x = gates.to(dtype), x_std.to(dtype)
        out = None
        for g, (U, V) in enumerate(zip(self.U, self.V)):
            h = torch.einsum("...d,krd->...kr", x, V[layer].to(dtype))
            h = h * a[..., self.group_starts[g] : self.group_starts[g + 1], None]
            part = torch.einsum("...kr,krd->...d", h, U[layer].to(dtype))
            out = part if out is None else out + part
        return out

    def fold_normalization(self) -> CrossLayerTranscoder:
        """Refused: the gated mean shift Σ a_i T_i μ_in/σ_in has no place in b_dec."""
        raise UnsupportedDictionaryError(
            "a MOLT cannot fold its standardisation into its weights (each transform's mean "
            "shift T_i·μ_in/σ_in is gated by a_i); use the MOLT itself, which standardises its "
            "inputs, on raw activations"
        )


__all__ = ["MixtureOfLinearTransforms", "molt_group_sizes"]
