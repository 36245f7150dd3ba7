"""Normalisation statistics of a store: float64 running sums, per-layer means and scales, finiteness."""

from __future__ import annotations

import dataclasses

import torch

from clt.store.format import StoreError

_STATS_ROWS = 32
"""Rows per float32 block in `RunningStats.update` (32 x 30 layers x 576 x 4 bytes = 2.2 MB)."""


@dataclasses.dataclass
class NormStats:
    """Per-layer standardisation: (a - mean) / std, for MLP inputs and outputs ([layers, d_model])."""

    input_mean: torch.Tensor
    input_std: torch.Tensor
    output_mean: torch.Tensor
    output_std: torch.Tensor

    @classmethod
    def identity(cls, num_layers: int, d_model: int) -> NormStats:
        """Mean 0 and std 1: no standardisation."""
        zeros, ones = torch.zeros(num_layers, d_model), torch.ones(num_layers, d_model)
        return cls(zeros, ones, zeros.clone(), ones.clone())


class RunningStats:
    """Streaming sums (float64) from which per-layer means and scales are derived."""

    def __init__(self, num_layers: int, d_model: int) -> None:
        shape = (num_layers, d_model)
        self.sums = {k: torch.zeros(shape, dtype=torch.float64) for k in ("in_sum", "in_sq", "out_sum", "out_sq")}
        self.sums["count"] = torch.zeros((), dtype=torch.float64)

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Add a batch [n, L, d] of inputs and outputs.

        Rows are summed in float32 in blocks of `_STATS_ROWS` (small enough to stay in cache; the
        squares of float16/bfloat16 values are exact in float32) and the block sums in float64.
        """
        for prefix, values in (("in", inputs), ("out", outputs)):
            total, squares = self.sums[f"{prefix}_sum"].view(-1), self.sums[f"{prefix}_sq"].view(-1)
            rows = values.reshape(values.shape[0], -1)
            buffer = torch.empty((min(_STATS_ROWS, rows.shape[0]), rows.shape[1]), dtype=torch.float32)
            for block in rows.split(_STATS_ROWS):
                part = buffer[: block.shape[0]]
                part.copy_(block)
                total += part.sum(0)
                squares += part.square_().sum(0)
        self.sums["count"] += inputs.shape[0]

    def add(self, other: RunningStats) -> None:
        """Add the sums of another `RunningStats` (of other rows)."""
        for key, value in other.sums.items():
            self.sums[key] += value

    def finite(self) -> bool:
        """Whether every sum is finite (a NaN/inf anywhere in the rows makes its column's sums non-finite)."""
        return all(bool(torch.isfinite(value).all()) for value in self.sums.values())

    def norm_stats(self) -> NormStats:
        """Means per dimension; one scale per layer (RMS of the centred activations)."""
        n = float(self.sums["count"])
        if n < 2:
            raise StoreError("normalisation statistics need at least 2 tokens")
        out = []
        for prefix in ("in", "out"):
            mean = self.sums[f"{prefix}_sum"] / n
            var = (self.sums[f"{prefix}_sq"] / n - mean.square()).clamp_min(0).mean(-1, keepdim=True).expand_as(mean)
            out += [mean.float(), var.sqrt().clamp_min(1e-6).float().contiguous()]
        return NormStats(*out)


def check_stats_finite(stats: RunningStats, layers: list[int], *pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """StoreError unless the statistics `stats` (of the last pair of inputs and outputs) are finite,
    naming the first pair and layer that hold a NaN/inf and how to avoid it."""
    if stats.finite():
        return
    for inputs, outputs in pairs:
        for name, values in (("input", inputs), ("output", outputs)):
            bad = ~torch.isfinite(values)
            if bad.any():
                layer = layers[int(bad.any(-1).any(0).nonzero()[0])]
                where = f"NaN/inf in MLP {name} activations of layer {layer}"
                if values.dtype == torch.float16:
                    raise StoreError(
                        f"{where}: the model overflowed, or the values exceed float16's range (65504); "
                        "store them as bfloat16 or float32 (store_dtype=...)"
                    )
                raise StoreError(
                    f"{where}: the model overflowed; extract in float32 (dtype=torch.float32) "
                    "or check the model weights"
                )
    raise StoreError("the squares of the activations overflow float32 (|a| > 1e19): check the model weights")
