"""Store compression: bytes/token of each store format, the error int8 adds, and its effect on a CLT.

    flock /tmp/clt-cpu.lock .venv/bin/python experiments/store_compression.py \
        [--store runs/demo/store] [--train-tokens 8192] [--eval-tokens 2048] [--layers 8 9 10 11] ...

With no ``--store``, ``runs/demo/store`` is used when it exists, else a small SmolLM2-135M store
(``--extract-tokens`` tokens, all layers) is extracted into the work folder first.

(a) Bytes/token: the float16 store is rewritten as int8, int8+zstd and float16+zstd (all layers,
all tokens; `ActivationStore.save`) and each is measured as shard-file bytes / tokens.
(b) int8 error: per layer ‖x − x̂‖ / ‖x‖ over all tokens, for MLP inputs and outputs, and its mean.
(c) Training: a small CLT is trained the same way (same steps, seed and batch order) on the first
``--train-tokens`` tokens of ``--layers`` stored as float16 and as int8; both are evaluated on the
next ``--eval-tokens`` tokens as stored in float16 (held out from both).

Prints a table and writes ``results.json`` into ``--work-dir`` (a temporary folder by default,
deleted afterwards unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.store import ActivationStore
from clt.training.metrics import reconstruction_metrics
from clt.training.trainer import CLTTrainer

FORMATS = (("float16", "none"), ("int8", "none"), ("int8", "zstd"), ("float16", "zstd"))


def source_store(args: argparse.Namespace, work: Path) -> ActivationStore:
    """The float16 store to measure: --store, runs/demo/store, or a fresh small SmolLM2 extraction."""
    path = Path(args.store) if args.store else Path("runs/demo/store")
    if (path / "manifest.json").is_file():
        return ActivationStore.open(path)
    from clt.config.extraction import ExtractionConfig
    from clt.pipeline import run_extraction

    return run_extraction(ExtractionConfig(max_tokens=args.extract_tokens, output_dir=str(work / "source")))


def bytes_per_token(store: ActivationStore) -> float:
    """Shard-file bytes per token (activations, int8 scales and metadata; statistics excluded)."""
    return sum(p.stat().st_size for p in store.shards) / store.n_tokens  # type: ignore[union-attr]


def int8_relative_error(exact: ActivationStore, coded: ActivationStore) -> dict[str, list[float]]:
    """Per layer ‖x − x̂‖ / ‖x‖ of the inputs and outputs, over all tokens (shard by shard)."""
    sums = {key: torch.zeros(exact.num_layers, 2, dtype=torch.float64) for key in ("inputs", "outputs")}
    for (a, a_lo), (b, b_lo) in aligned_pieces(exact, coded):
        for key, acc in sums.items():
            x, x_hat = a[key][a_lo].double(), b[key][b_lo].double()
            acc[:, 0] += (x - x_hat).square().sum((0, 2))
            acc[:, 1] += x.square().sum((0, 2))
    return {key: (acc[:, 0] / acc[:, 1]).sqrt().tolist() for key, acc in sums.items()}


def aligned_pieces(first: ActivationStore, second: ActivationStore):
    """Pairs ((shard, rows), (shard, rows)) covering the same rows of two stores with different shard sizes."""
    i = j = i_lo = j_lo = 0
    while i < len(first.shards) and j < len(second.shards):
        take = min(first.shard_sizes[i] - i_lo, second.shard_sizes[j] - j_lo)
        yield (first.shard(i), slice(i_lo, i_lo + take)), (second.shard(j), slice(j_lo, j_lo + take))
        i_lo, j_lo = i_lo + take, j_lo + take
        if i_lo == first.shard_sizes[i]:
            i, i_lo = i + 1, 0
        if j_lo == second.shard_sizes[j]:
            j, j_lo = j + 1, 0


def subset(store: ActivationStore, layers: list[int], lo: int, hi: int) -> ActivationStore:
    """An in-memory store of rows lo..hi and some layers of `store` (values as stored, in float32)."""
    inputs, outputs = store.tensors(hi)
    index = torch.tensor([store.layers.index(layer) for layer in layers])
    return ActivationStore.from_nnsight_activations(
        {
            "inputs": inputs[lo:, index].contiguous(),
            "outputs": outputs[lo:, index].contiguous(),
            "layers": layers,
            "model_name": store.model_name,
        }
    )


def train_and_evaluate(store: ActivationStore, held_out: ActivationStore, args: argparse.Namespace) -> dict:
    """Train a small CLT on `store` and return its metrics on `held_out`."""
    clt = CLTConfig(
        num_features=args.features,
        num_layers=store.num_layers,
        d_model=store.d_model,
        layers=store.layers,
        activation_fn="topk",
        topk=args.topk,
    )
    training = TrainingConfig(
        learning_rate=args.lr,
        batch_size=args.batch_size,
        training_steps=args.steps,
        lr_warmup_steps=20,
        seed=0,
        log_every=max(1, args.steps // 4),
    )
    start = time.perf_counter()
    model = CLTTrainer(clt, training, store).train(progress=True)
    metrics = reconstruction_metrics(model, held_out, max_tokens=held_out.n_tokens)
    return {
        "fvu": metrics.fvu,
        "fvu_per_layer": metrics.fvu_per_layer,
        "l0": metrics.l0,
        "train_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="float16 store to measure (default: runs/demo/store, else extract one)")
    parser.add_argument("--extract-tokens", type=int, default=4096, help="tokens to extract when there is no store")
    parser.add_argument("--train-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 9, 10, 11], help="layers of the CLT")
    parser.add_argument("--features", type=int, default=256, help="features per layer")
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--work-dir", help="folder for the rewritten stores (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="clt-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = source_store(args, work)
        if source.dtype != "float16" or source.compression != "none":
            raise SystemExit(f"{source.path} is {source.dtype}+{source.compression}; pass a plain float16 store")
        print(f"source: {source}")
        results: dict = {
            "source": str(source.path),
            "n_tokens": source.n_tokens,
            "num_layers": source.num_layers,
            "d_model": source.d_model,
            "bytes_per_token": {},
            "write_s": {},
        }
        stores = {}
        for dtype, compression in FORMATS:
            name = dtype + ("+zstd" if compression == "zstd" else "")
            start = time.perf_counter()
            stores[name] = (
                source
                if name == "float16"
                else source.save(work / name, dtype=dtype, compression=compression, shard_tokens=source.shard_sizes[0])
            )
            results["write_s"][name] = time.perf_counter() - start
            results["bytes_per_token"][name] = bytes_per_token(stores[name])
        results["int8_relative_error"] = error = int8_relative_error(source, stores["int8"])
        results["int8_relative_error_mean"] = {k: sum(v) / len(v) for k, v in error.items()}
        end = args.train_tokens + args.eval_tokens
        if end > source.n_tokens:
            raise SystemExit(f"the store has {source.n_tokens} tokens; --train-tokens + --eval-tokens is {end}")
        held_out = subset(source, args.layers, args.train_tokens, end)
        results["training"] = {
            name: train_and_evaluate(subset(stores[name], args.layers, 0, args.train_tokens), held_out, args)
            for name in ("float16", "int8")
        }
        results["settings"] = {k: v for k, v in vars(args).items() if k not in ("keep",)}
        (work / "results.json").write_text(json.dumps(results, indent=1))
        report(results)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict) -> None:
    """Print the figures as tables."""
    print(f"\n{results['n_tokens']} tokens x {results['num_layers']} layers x d_model {results['d_model']}")
    base = results["bytes_per_token"]["float16"]
    print(f"{'format':<14}{'bytes/token':>14}{'vs float16':>12}{'write s':>10}")
    for name, value in results["bytes_per_token"].items():
        print(f"{name:<14}{value:>14,.0f}{base / value:>11.2f}x{results['write_s'][name]:>10.1f}")
    for key, mean in results["int8_relative_error_mean"].items():
        per_layer = results["int8_relative_error"][key]
        print(f"int8 relative error, {key}: mean {mean:.4f} (min {min(per_layer):.4f}, max {max(per_layer):.4f})")
    for name, value in results["training"].items():
        print(
            f"CLT trained on {name:<8} held-out FVU {value['fvu']:.4f}  L0 {value['l0']:.1f}  "
            f"({value['train_s']:.0f} s)"
        )


if __name__ == "__main__":
    main()
