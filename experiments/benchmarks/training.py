"""Training speed: tokens/s, a step's FLOP/s against the machine's matmul FLOP/s, the sparse
TopK decoder against the dense one, and EleutherAI's sparsify against this trainer, in one run.

    flock /tmp/clt-bench.lock python experiments/benchmarks/training.py [--layers 8 --features 2048]
    make interop-venvs     # once, for part (d); skipped without it

About 3-4 minutes on a 2-core CPU with the defaults (L=8 layers, d=576, F=2048, batch 512 tokens).
Every step is a full `CLTTrainer.train_step` (batch from an in-memory store of synthetic
activations, forward, losses, backward, gradient clipping, fused AdamW, metrics). A variant's
step time is the best of `steps` timed steps after `warmup` ones (the least disturbed by other
processes); the variants of one table run in rotation, step by step.

(a) matmul: GFLOP/s of torch.mm at the step's GEMM shapes, float32 and bfloat16, measured at
    the start and again before (b) ends; the best per dtype is the machine's peak.
(b) dense ReLU/JumpReLU CLT and PLT (float32; bf16 autocast too unless --bf16 false): tokens/s,
    GFLOP/s achieved and its ratio to the peak of the same dtype (target >= 0.5). Counted FLOPs
    are those of the GEMMs the step runs: encoder forward and weight gradient 2 x 2*B*L*F*d (the
    inputs need no gradient), decoder forward, feature gradient and weight gradient
    3 x 2*B*F*d*P with P (source, target) pairs: L(L+1)/2 for a CLT, L for a PLT. Element-wise
    work, losses and AdamW run too but are not counted (they lower the ratio).
(c) TopK and BatchTopK CLT and PLT at each k of --topk-values: tokens/s with the sparse decoder
    (`sparse_decode='on'`: only the active features' decoder rows, gathered) and the dense one
    ('off'), and the speed-up sparse/dense. No sparsity penalty (k sets the sparsity).
(d) sparsify (PyPI eai-sparsify, in its own virtualenv --sparsify-python): tokens/s of its TopK
    transcoders (one `SparseCoder(transcode=True)` per layer, num_latents=F, k=--sparsify-k,
    Adam; the step of its trainer, see experiments/sparsify/sparsify_steps.py) and of a TopK PLT
    trained by `CLTTrainer` (same L, F, k, d, batch; AdamW with no weight decay = Adam, no
    clipping, no penalty), on the same activations; the two alternate in `rounds` blocks of
    `warmup` untimed + `steps` timed steps, with the same glibc malloc setting (CLTTrainer's
    `retain_freed_memory`; MALLOC_*_THRESHOLD_ in sparsify's environment). Ratio ours/theirs
    (target >= 1). Other processes slow the 2-thread steps a lot (a busy core stalls every
    parallel region): compare runs made while the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from timing import rotated_min_s

from clt.config.base import ConfigBase
from clt.config.cli_args import add_config_arguments, config_from_args
from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.store import ActivationStore
from clt.training.trainer import CLTTrainer

SPARSIFY_SCRIPT = Path(__file__).resolve().parents[1] / "sparsify" / "sparsify_steps.py"


@dataclasses.dataclass
class BenchConfig(ConfigBase):
    """Sizes and repetitions of the training benchmark (defaults: SmolLM2-135M-like, 2-core CPU)."""

    layers: int = 8
    """Transcoder layers L."""
    d_model: int = 576
    """Width d of the MLP inputs and outputs."""
    features: int = 2048
    """Features per layer F."""
    batch: int = 512
    """Tokens per step B."""
    tokens: int = 4096
    """Tokens in the synthetic store (batches cycle through it)."""
    topk_values: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64])
    """k of the TopK/BatchTopK rows of (c)."""
    sparsify_k: int = 32
    """k of the sparsify comparison (d)."""
    steps: int = 5
    """Timed steps per variant (the best is reported)."""
    warmup: int = 2
    """Untimed steps per variant first."""
    rounds: int = 2
    """(d): blocks of `warmup` + `steps` steps of each side in turn (warm-up steps untimed)."""
    bf16: bool = True
    """(b): also time the dense steps under bf16 autocast."""
    parts: str = "abcd"
    """Which parts to run (letters of the module docstring)."""
    sparsify_python: str = ".venv-interop/sparsify/bin/python"
    """Python of the virtualenv with eai-sparsify (experiments/sparsify/setup_venv.sh)."""
    threads: int = 0
    """torch intra-op threads (0: keep torch's default)."""


# ------------------------------------------------------------------------------------ inputs


def synthetic_activations(cfg: BenchConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, 1) [T, L, d]; y = tanh(x A_l) B_l, a random two-layer map per layer."""
    g = torch.Generator().manual_seed(seed)
    T, L, d = cfg.tokens, cfg.layers, cfg.d_model
    x = torch.randn(T, L, d, generator=g)
    a = torch.randn(L, d, d, generator=g) / math.sqrt(d)
    b = torch.randn(L, d, d, generator=g) / math.sqrt(d)
    y = torch.einsum("tle,led->tld", torch.tanh(torch.einsum("tld,lde->tle", x, a)), b)
    return x, y


def make_trainer(
    cfg: BenchConfig,
    store: ActivationStore,
    activation: str,
    cross: bool,
    *,
    k: int = 32,
    sparse: str = "auto",
    precision: str = "no",
    **training,
) -> CLTTrainer:
    """A trainer at the benchmark's sizes with a constant learning rate and λ."""
    clt = CLTConfig(
        num_features=cfg.features,
        num_layers=cfg.layers,
        d_model=cfg.d_model,
        activation_fn=activation,
        topk=k,
        cross_layer=cross,
        sparse_decode=sparse,
    )
    options = {
        "batch_size": cfg.batch,
        "training_steps": 10**9,
        "lr_warmup_steps": 0,
        "sparsity_warmup_steps": 0,
        "mixed_precision": precision,
        "log_every": 10**9,
    }
    trainer = CLTTrainer(clt, TrainingConfig(**{**options, **training}), store)
    trainer.bench_batches = store.batches(cfg.batch, seed=0)
    return trainer


def step_flops(cfg: BenchConfig, cross: bool) -> float:
    """FLOPs of the GEMMs of one training step (module docstring)."""
    B, L, F, d = cfg.batch, cfg.layers, cfg.features, cfg.d_model
    pairs = L * (L + 1) // 2 if cross else L
    return 2 * (2 * B * L * F * d) + 3 * (2 * B * F * d * pairs)


# ------------------------------------------------------------------------------------ timing


def best_step_times(trainers: dict[str, CLTTrainer], steps: int, warmup: int) -> dict[str, float]:
    """Best seconds per `train_step` of each trainer, the trainers stepping in rotation."""
    steppers = {
        name: functools.partial(trainer.train_step, trainer.bench_batches) for name, trainer in trainers.items()
    }
    return rotated_min_s(steppers, steps, warm_up=warmup)


def matmul_gflops(
    shapes: list[tuple[int, int, int]], dtype: torch.dtype, repeats: int = 5
) -> dict[tuple[int, int, int], float]:
    """Best GFLOP/s of torch.mm for each (m, k, n): [m, k] @ [k, n]."""
    result = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        best = rotated_min_s({"mm": functools.partial(torch.mm, a, b)}, repeats)["mm"]
        result[(m, k, n)] = 2 * m * k * n / best / 1e9
    return result


# ------------------------------------------------------------------------------------ parts


def part_a(cfg: BenchConfig, peaks: dict[torch.dtype, float], verbose: bool = True) -> None:
    """Update `peaks` with the best matmul GFLOP/s per dtype at the step's GEMM shapes."""
    B, L, F, d = cfg.batch, cfg.layers, cfg.features, cfg.d_model
    shapes = [(B, d, F), (B, F, L * d), (F, B, L * d), (B, L * d, F)]
    names = [
        "encoder  [B,d]@[d,F]",
        "decoder  [B,F]@[F,L*d]",
        "dW_dec   [F,B]@[B,L*d]",
        "dfeature [B,L*d]@[L*d,F]",
    ]
    if verbose:
        print("\n(a) matmul GFLOP/s (best of 5)")
        print(f"{'GEMM':28s} {'shape':>18s} {'float32':>9s} {'bfloat16':>9s}")
    rates = {dtype: matmul_gflops(shapes, dtype) for dtype in (torch.float32, torch.bfloat16)}
    for dtype, by_shape in rates.items():
        peaks[dtype] = max(peaks.get(dtype, 0.0), *by_shape.values())
    if verbose:
        for name, shape in zip(names, shapes):
            print(
                f"{name:28s} {'x'.join(map(str, shape)):>18s} {rates[torch.float32][shape]:9.1f} "
                f"{rates[torch.bfloat16][shape]:9.1f}"
            )
        print(f"{'peak (best)':47s} {peaks[torch.float32]:9.1f} {peaks[torch.bfloat16]:9.1f}")


def part_b(cfg: BenchConfig, store: ActivationStore, peaks: dict[torch.dtype, float]) -> dict:
    """Dense ReLU/JumpReLU steps: tokens/s, GFLOP/s and the ratio to the matmul peak."""
    variants = [(act, cross, "no") for act in ("relu", "jumprelu") for cross in (True, False)]
    if cfg.bf16:
        variants += [("relu", True, "bf16"), ("relu", False, "bf16")]
    trainers = {v: make_trainer(cfg, store, v[0], v[1], precision=v[2]) for v in variants}
    times = best_step_times(trainers, cfg.steps, cfg.warmup)
    del trainers
    part_a(cfg, peaks, verbose=False)  # again, after the steps: the best per dtype counts
    print(f"\n(b) dense steps: L={cfg.layers} d={cfg.d_model} F={cfg.features} B={cfg.batch}")
    print(
        f"{'variant':22s} {'ms/step':>8s} {'tokens/s':>9s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} "
        f"{'peak':>7s} {'ratio':>6s}"
    )
    rows = {}
    for (act, cross, precision), seconds in times.items():
        flops = step_flops(cfg, cross)
        peak = peaks[torch.bfloat16 if precision == "bf16" else torch.float32]
        achieved = flops / seconds / 1e9
        name = f"{act} {'CLT' if cross else 'PLT'} {'bf16' if precision == 'bf16' else 'fp32'}"
        rows[name] = {
            "tokens_per_s": cfg.batch / seconds,
            "gflops": achieved,
            "ratio": achieved / peak,
        }
        print(
            f"{name:22s} {seconds * 1e3:8.0f} {cfg.batch / seconds:9.0f} {flops / 1e9:10.1f} "
            f"{achieved:8.1f} {peak:7.1f} {achieved / peak:6.2f}"
        )
    return rows


def part_c(cfg: BenchConfig, store: ActivationStore) -> dict:
    """TopK/BatchTopK: tokens/s with the sparse and the dense decoder, and the speed-up."""
    print(
        f"\n(c) TopK/BatchTopK, sparse vs dense decoder: L={cfg.layers} d={cfg.d_model} F={cfg.features} B={cfg.batch}"
    )
    print(f"{'variant':16s} {'k':>4s} {'sparse tok/s':>13s} {'dense tok/s':>12s} {'speed-up':>9s}")
    rows = {}
    for k in cfg.topk_values:
        variants = [
            (act, cross, sparse) for act in ("topk", "batchtopk") for cross in (True, False) for sparse in ("on", "off")
        ]
        trainers = {v: make_trainer(cfg, store, v[0], v[1], k=k, sparse=v[2], sparsity_lambda=0.0) for v in variants}
        times = best_step_times(trainers, cfg.steps, cfg.warmup)
        del trainers
        for act in ("topk", "batchtopk"):
            for cross in (True, False):
                on, off = (
                    cfg.batch / times[(act, cross, "on")],
                    cfg.batch / times[(act, cross, "off")],
                )
                name = f"{act} {'CLT' if cross else 'PLT'}"
                rows[f"{name} k={k}"] = {"sparse": on, "dense": off, "speedup": on / off}
                print(f"{name:16s} {k:4d} {on:13.0f} {off:12.0f} {on / off:9.2f}")
    return rows


def part_d(cfg: BenchConfig, x: torch.Tensor, y: torch.Tensor) -> dict | None:
    """Ours (TopK PLT, CLTTrainer) against sparsify's TopK transcoders, same activations."""
    python = Path(cfg.sparsify_python)
    print(
        f"\n(d) vs EleutherAI sparsify: TopK per-layer transcoders, L={cfg.layers} d={cfg.d_model} "
        f"F={cfg.features} k={cfg.sparsify_k} B={cfg.batch}"
    )
    if not python.exists():
        print(f"skipped: {python} is missing (create it with `make interop-venvs`)")
        return None
    store = ActivationStore.from_nnsight_activations({"inputs": x, "outputs": y}, batch_size=cfg.batch)
    lr = 2e-4 / (cfg.features / 2**14) ** 0.5
    ours = make_trainer(
        cfg,
        store,
        "topk",
        False,
        k=cfg.sparsify_k,
        learning_rate=lr,
        sparsity_lambda=0.0,
        grad_clip_norm=None,
        weight_decay=0.0,
        dead_after_tokens=10_000_000,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "activations.safetensors"
        save_file({"inputs": x.contiguous(), "outputs": y.contiguous()}, str(data))
        command = [
            str(python),
            str(SPARSIFY_SCRIPT),
            "--data",
            str(data),
            "--features",
            str(cfg.features),
            "--k",
            str(cfg.sparsify_k),
            "--batch",
            str(cfg.batch),
            "--threads",
            str(torch.get_num_threads()),
        ]
        # the same allocator setting as CLTTrainer's retain_freed_memory, for glibc's malloc there
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
            "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
        }
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            for line in child.stdout:  # sparsify prints which decoder it uses on import
                if line.strip() == "ready":
                    break
                print(f"sparsify: {line.strip()}")
            else:
                print(f"skipped: sparsify did not start (exit code {child.wait()}; stderr above)")
                return None
            theirs_times: list[float] = []
            ours_times: list[float] = []
            for _ in range(cfg.rounds):  # blocks: each side's threads spin a while after it
                child.stdin.write(f"run {cfg.warmup + cfg.steps}\n")
                child.stdin.flush()
                theirs_times += json.loads(child.stdout.readline())["times"][cfg.warmup :]
                for i in range(cfg.warmup + cfg.steps):
                    start = time.perf_counter()
                    ours.train_step(ours.bench_batches)
                    if i >= cfg.warmup:
                        ours_times.append(time.perf_counter() - start)
            child.stdin.write("quit\n")
            child.stdin.flush()
        finally:
            child.stdin.close()
            child.wait(timeout=60)
    ours_rate, theirs_rate = cfg.batch / min(ours_times), cfg.batch / min(theirs_times)
    sparse = "sparse" if ours.model.uses_sparse_decode() else "dense"
    rows = [
        ("sparsify SparseCoder x L (eager decoder)", min(theirs_times), theirs_rate),
        (f"clt CLTTrainer, TopK PLT ({sparse} decoder)", min(ours_times), ours_rate),
    ]
    print(f"{'trainer':44s} {'ms/step':>8s} {'tokens/s':>9s}")
    for name, seconds, rate in rows:
        print(f"{name:44s} {seconds * 1e3:8.0f} {rate:9.0f}")
    print(f"ratio ours/theirs (tokens/s): {ours_rate / theirs_rate:.2f}")
    return {"ours": ours_rate, "theirs": theirs_rate, "ratio": ours_rate / theirs_rate}


def main(argv: list[str] | None = None) -> dict:
    """Run the parts asked for and print their tables; returns their numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, BenchConfig)
    cfg = config_from_args(BenchConfig, parser.parse_args(argv))
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are measured
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(
        f"training benchmark: L={cfg.layers} d={cfg.d_model} F={cfg.features} B={cfg.batch} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} device=cpu"
    )
    started = time.perf_counter()
    x, y = synthetic_activations(cfg)
    store = ActivationStore.from_nnsight_activations({"inputs": x, "outputs": y}, batch_size=cfg.batch)
    results: dict = {}
    peaks: dict[torch.dtype, float] = {}
    if "a" in cfg.parts or "b" in cfg.parts:
        part_a(cfg, peaks)
    if "b" in cfg.parts:
        results["b"] = part_b(cfg, store, peaks)
    if "c" in cfg.parts:
        results["c"] = part_c(cfg, store)
    if "d" in cfg.parts:
        results["d"] = part_d(cfg, x, y)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
