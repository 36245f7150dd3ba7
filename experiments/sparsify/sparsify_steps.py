"""Time EleutherAI sparsify's TopK transcoder training steps on stored activations (own venv).

    .venv-interop/sparsify/bin/python experiments/sparsify/sparsify_steps.py --data acts.safetensors \
        --features 2048 --k 32 --batch 512 [--threads 2]

Driven by experiments/benchmarks/training.py, which writes `--data` (safetensors with `inputs`
and `outputs`, [tokens, L, d] float32) and alternates with its own steps. One
`sparsify.SparseCoder` per layer (`SparseCoderConfig(transcode=True, num_latents=F, k=k)`,
float32), one `torch.optim.Adam` over all of them with sparsify's default learning rate and
linear warm-up schedule. A step is the inner loop of `sparsify.Trainer.fit` for
``loss_fn='fvu'`` (auxk_alpha 0, no multi-TopK, one micro-batch): for each layer the biases are
initialised from the batch means on the first step, ``out = sae(x, y, dead_mask=None,
total_variance=...)``, the fired latents are recorded, ``float(out.fvu)`` is logged and
``out.fvu.backward()``; then ``optimizer.step()``, ``zero_grad()``, the schedule steps and the
tokens-since-fired counters update. Only the language model's forward (which produced the
activations) is left out.

Protocol: prints ``ready`` once set up; then each stdin line ``run N`` times N steps and prints
one JSON line ``{"times": [seconds, ...]}``; ``quit`` (or end of input) exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from safetensors.torch import load_file
from sparsify import SparseCoder, SparseCoderConfig
from transformers import get_linear_schedule_with_warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="safetensors: inputs/outputs [T, L, d]")
    parser.add_argument("--features", type=int, required=True, help="num_latents per layer (F)")
    parser.add_argument("--k", type=int, required=True, help="active latents per token (TopK k)")
    parser.add_argument("--batch", type=int, required=True, help="tokens per step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_file(args.data)
    inputs, outputs = data["inputs"], data["outputs"]
    n_tokens, num_layers, d = inputs.shape
    # per-layer contiguous tensors, as sparsify's forward hooks see them
    xs = [inputs[:, l].contiguous() for l in range(num_layers)]
    ys = [outputs[:, l].contiguous() for l in range(num_layers)]

    cfg = SparseCoderConfig(transcode=True, num_latents=args.features, k=args.k)
    saes = [SparseCoder(d, cfg, device="cpu", dtype=torch.float32) for _ in range(num_layers)]
    lr = 2e-4 / (args.features / 2**14) ** 0.5  # sparsify's default for adam
    optimizer = torch.optim.Adam([{"params": sae.parameters(), "lr": lr} for sae in saes])
    scheduler = get_linear_schedule_with_warmup(optimizer, 1000, 10**9)
    tokens_since_fired = [torch.zeros(args.features, dtype=torch.long) for _ in saes]
    did_fire = [torch.zeros(args.features, dtype=torch.bool) for _ in saes]
    gen = torch.Generator().manual_seed(args.seed)
    state = {"step": 0, "perm": torch.randperm(n_tokens, generator=gen), "pos": 0}

    def next_rows() -> torch.Tensor:
        if state["pos"] + args.batch > n_tokens:
            state["perm"], state["pos"] = torch.randperm(n_tokens, generator=gen), 0
        rows = state["perm"][state["pos"] : state["pos"] + args.batch]
        state["pos"] += args.batch
        return rows

    def step() -> None:
        rows = next_rows()
        for layer, sae in enumerate(saes):
            x, y = xs[layer][rows], ys[layer][rows]
            if state["step"] == 0:
                sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
                sae.b_dec.data = y.mean(0)
            total_variance = (y - y.mean(0)).pow(2).sum()
            out = sae(x=x, y=y, dead_mask=None, total_variance=total_variance)
            did_fire[layer][out.latent_indices.flatten()] = True
            float(out.fvu.detach())
            out.fvu.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        with torch.no_grad():
            for counts, fired in zip(tokens_since_fired, did_fire):
                counts += args.batch
                counts[fired] = 0
                fired.zero_()
        state["step"] += 1

    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] != "run":
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
            continue
        times = []
        for _ in range(int(command[1])):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times}), flush=True)


if __name__ == "__main__":
    main()
