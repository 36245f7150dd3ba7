"""Time `SparseCLTEncoder.encode_all_layers` against a hand-written per-layer loop, same run.

    python experiments/benchmarks/sparse_encoding.py [--layers 8 --d-hidden 576 ...]

The loop is the baseline the `sparse-clt` README compares with: for each layer,
`relu(h @ W_enc.T + b_enc)`, the threshold filter and `torch.topk` (no `sparsity`, no -1 for
empty slots: it does less than the encoder). The printed ratio is
variant time / loop time (< 1: faster than the loop). `encode_layer loop` runs the encoder's own
kernel one layer at a time, which separates the gain of batching layers from that of the kernel.
All variants see the same weights and inputs, run in rotation, and the encoder's results are
checked against the loop's before timing.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from timing import rotated_min_s

from clt.config.base import ConfigBase
from clt.config.cli_args import add_config_arguments, config_from_args
from clt.sparse import SparseCLTEncoder, TranscoderWeights, random_transcoders


@dataclasses.dataclass
class BenchConfig(ConfigBase):
    """Sizes and repetitions of the sparse-encoding benchmark (defaults: SmolLM2-135M-like, CPU)."""

    layers: int = 8
    """Number of transcoder layers encoded together."""
    d_hidden: int = 576
    """Hidden size h."""
    d_features: int = 4096
    """Features per layer f."""
    batch: int = 1
    """Batch size B."""
    seq: int = 256
    """Tokens per sequence T."""
    top_k: int = 20
    """Features kept per token and layer."""
    activation_threshold: float = 1.0
    """Minimum activation of a kept feature."""
    chunk_size: int = 512
    """Encoder chunk size ((layer, token) rows per kernel call)."""
    repeats: int = 10
    """Timed repetitions per variant (after one warm-up), in rotation; the minimum is reported."""
    compile: bool = False
    """Also time the encoder with torch.compile (first call compiles: ~15 s on CPU)."""
    threads: int = 0
    """torch intra-op threads (0: keep torch's default)."""


def manual_loop(
    transcoders: dict[int, TranscoderWeights],
    hidden: dict[int, torch.Tensor],
    top_k: int,
    threshold: float,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer baseline: matmul, ReLU, threshold, top-k, one layer at a time."""
    out = {}
    for layer, h in hidden.items():
        w = transcoders[layer]
        act = torch.relu(h @ w.W_enc.T + w.b_enc)
        act = act * (act >= threshold)
        out[layer] = torch.topk(act, top_k, dim=-1)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print one line per variant; returns the timings in ms."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, BenchConfig)
    cfg = config_from_args(BenchConfig, parser.parse_args(argv))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    layers = list(range(cfg.layers))
    transcoders = random_transcoders(layers, cfg.d_hidden, cfg.d_features, seed=0)
    gen = torch.Generator().manual_seed(1)
    hidden = {layer: 2 * torch.randn(cfg.batch, cfg.seq, cfg.d_hidden, generator=gen) for layer in layers}
    options = dict(top_k=cfg.top_k, activation_threshold=cfg.activation_threshold, chunk_size=cfg.chunk_size)

    with torch.no_grad():
        baseline = manual_loop(transcoders, hidden, cfg.top_k, cfg.activation_threshold)
    variants = {"manual per-layer loop": lambda: manual_loop(transcoders, hidden, cfg.top_k, cfg.activation_threshold)}
    encoders = {"encode_all_layers (eager)": SparseCLTEncoder(transcoders, use_compile=False, **options)}
    if cfg.compile:
        encoders["encode_all_layers (compiled)"] = SparseCLTEncoder(transcoders, use_compile=True, **options)
    for name, encoder in encoders.items():
        result = encoder.encode_all_layers(hidden)
        for layer in layers:
            torch.testing.assert_close(result[layer]["activations"], baseline[layer].values, atol=1e-4, rtol=1e-4)
        variants[name] = lambda encoder=encoder: encoder.encode_all_layers(hidden)
    eager = encoders["encode_all_layers (eager)"]
    variants["encode_layer loop (eager)"] = lambda: [eager.encode_layer(i, hidden[i]) for i in layers]

    print(
        f"L={cfg.layers} h={cfg.d_hidden} f={cfg.d_features} B={cfg.batch} T={cfg.seq} "
        f"top_k={cfg.top_k} threads={torch.get_num_threads()} device=cpu"
    )
    with torch.no_grad():
        timings = {name: 1000 * s for name, s in rotated_min_s(variants, cfg.repeats).items()}
    loop = timings["manual per-layer loop"]
    for name, ms in timings.items():
        print(f"{name:32s} {ms:8.2f} ms  ratio to loop {ms / loop:5.2f}")
    return timings


if __name__ == "__main__":
    main()
