"""Distributed scaling on this machine: per-rank dictionary memory and tokens/s, 2 ranks vs 1 process, one run.

    flock /tmp/clt-cpu.lock python experiments/benchmarks/scaling.py [--layers 6 --d-model 128 --features 2048]

Every variant is a `CLTTrainer.train` in freshly spawned processes (`clt.training.collectives.run_local`,
gloo, torchrun's environment variables) on the same in-memory store of synthetic activations and the
same configs; only the world size, `parallel` and the threads per process change.

(a) memory: bytes of parameters + AdamW moments per rank (`memory_bytes`, after training, so the
    moments exist) with feature sharding on 2 ranks over 1 process (target ratio <= 0.55; b_dec
    and W_skip are replicated, so it is slightly above 0.5), and the peak RSS of each process
    (it includes torch itself; rank 0 also builds the whole dictionary once before scattering it).
(b) throughput: global tokens per second over `--steps` timed steps after `--warmup`, for
    1 process with 2 threads and with 1 thread, and 2 ranks with 1 thread each in data parallel
    and in feature sharding. Ratios are 2 ranks over 1 process (2 threads: the whole machine) and
    over 1 process (1 thread: per-core scaling). On a 2-core machine both ranks share the cores
    with anything else running, so compare runs made while it is otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.store import ActivationStore
from clt.training.collectives import memory_bytes, run_local
from clt.training.trainer import CLTTrainer


def dictionary_bytes(
    layers: int,
    features: int,
    d_model: int,
    *,
    cross_layer: bool = True,
    world_size: int = 1,
    jumprelu: bool = True,
    grads: bool = False,
) -> int:
    """Bytes per rank of a float32 transcoder's parameters + AdamW moments (+ gradients) under feature sharding:
    W_enc, b_enc, θ and the decoders split over the ranks, b_dec replicated (the estimate of experiments/configs)."""
    pairs = layers * (layers + 1) // 2 if cross_layer else layers
    sharded = features * (layers * d_model + layers + pairs * d_model + (layers if jumprelu else 0)) // world_size
    copies = 4 if grads else 3
    return 4 * copies * (sharded + layers * d_model)


def _store(spec: dict) -> ActivationStore:
    g = torch.Generator().manual_seed(0)
    n, L, d = spec["tokens"], spec["layers"], spec["d_model"]
    x = torch.randn(n, L, d, generator=g)
    y = torch.tanh(x @ (torch.randn(d, d, generator=g) / d**0.5)) + 0.1 * torch.randn(n, L, d, generator=g)
    return ActivationStore.from_nnsight_activations({"inputs": x, "outputs": y}, batch_size=spec["batch"])


def _measure(rank: int, spec: dict, parallel: str, out: str) -> None:
    """Train warm-up + timed steps; rank 0 writes tokens/s, every rank its memory, to `out`.{rank}.json."""
    cfg = CLTConfig(
        num_features=spec["features"],
        num_layers=spec["layers"],
        d_model=spec["d_model"],
        activation_fn=spec["activation"],
        topk=spec["topk"],
    )
    total = spec["warmup"] + spec["steps"]
    training = TrainingConfig(
        batch_size=spec["batch"],
        training_steps=total,
        learning_rate=1e-4,
        lr_warmup_steps=1,
        log_every=total,
        parallel=parallel,
        dist_timeout_s=600,
    )
    marks: dict[int, float] = {}

    def clock(step: int, metrics: dict) -> None:
        if step in (spec["warmup"], total):
            marks[step] = time.perf_counter()

    trainer = CLTTrainer(cfg, training, _store(spec), callbacks=[clock])
    trainer.train(progress=False)
    seconds = marks[total] - marks[spec["warmup"]]
    result = {
        "tokens_per_s": spec["steps"] * spec["batch"] / seconds,
        "dictionary_bytes": memory_bytes(trainer.model, trainer.optimizer),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))


def run(spec: dict) -> dict[str, dict]:
    """Each variant's rank-0 tokens/s and per-rank memory, measured in this run."""
    variants = {
        "1 process, 2 threads": (1, 2, "data"),
        "1 process, 1 thread": (1, 1, "data"),
        "2 ranks, data parallel": (2, 1, "data"),
        "2 ranks, feature sharding": (2, 1, "features"),
    }
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (world, threads, parallel) in variants.items():
            out = str(Path(folder) / parallel) + str(world) + str(threads)
            run_local(_measure, (spec, parallel, out), world_size=world, threads=threads, timeout_s=1800)
            ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]
            results[name] = {
                "tokens_per_s": ranks[0]["tokens_per_s"],
                "dictionary_bytes": max(r["dictionary_bytes"] for r in ranks),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
                "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
            }
    return results


def report(spec: dict, results: dict[str, dict]) -> str:
    """A table and the ratios 2 ranks / 1 process."""
    lines = [f"{'variant':28s} {'tokens/s':>10s} {'dict MB/rank':>13s} {'peak RSS MB':>12s}"]
    for name, r in results.items():
        lines.append(
            f"{name:28s} {r['tokens_per_s']:10.0f} {r['dictionary_bytes'] / 2**20:13.1f} "
            f"{r['peak_rss_bytes'] / 2**20:12.1f}"
        )
    one, one_thread = results["1 process, 2 threads"], results["1 process, 1 thread"]
    sharded, data = results["2 ranks, feature sharding"], results["2 ranks, data parallel"]
    predicted = [
        dictionary_bytes(
            spec["layers"], spec["features"], spec["d_model"], world_size=w, jumprelu=spec["activation"] == "jumprelu"
        )
        for w in (1, 2)
    ]
    mb = 2**20
    lines.append(
        f"dictionary_bytes() predicts {predicted[0] / mb:.1f} / {predicted[1] / mb:.1f} MB per rank at "
        f"1 / 2 ranks (measured {one['dictionary_bytes'] / mb:.1f} / {sharded['dictionary_bytes'] / mb:.1f})"
    )
    lines.append(
        f"memory per rank, feature sharding 2 ranks / 1 process: "
        f"{sharded['dictionary_bytes'] / one['dictionary_bytes']:.3f} (target <= 0.55); "
        f"peak RSS {sharded['peak_rss_bytes'] / one['peak_rss_bytes']:.3f} (per rank: "
        + ", ".join(f"{b / one['peak_rss_bytes']:.3f}" for b in sharded["peak_rss_bytes_per_rank"])
        + "; rank 0 builds the whole dictionary once)"
    )
    for name, r in (("data parallel", data), ("feature sharding", sharded)):
        lines.append(
            f"tokens/s {name} 2 ranks / 1 process: {r['tokens_per_s'] / one['tokens_per_s']:.2f} "
            f"(2 threads), {r['tokens_per_s'] / one_thread['tokens_per_s']:.2f} (1 thread)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--activation", default="jumprelu")
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()
    spec = {
        k: getattr(args, k)
        for k in ("layers", "d_model", "features", "batch", "activation", "topk", "tokens", "warmup", "steps")
    }
    results = run(spec)
    print(json.dumps(spec))
    print(report(spec, results))
    if args.output:
        Path(args.output).write_text(json.dumps({"spec": spec, "results": results}, indent=1))


if __name__ == "__main__":
    main()
