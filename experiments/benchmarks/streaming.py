"""Training from the live model against a bare forward of the same model in the same dtype, one run.

    flock /tmp/clt-bench.lock .venv/bin/python experiments/benchmarks/streaming.py \
        [--model smollm2-135m] [--steps 80] [--buffer-tokens 8192,16384]

Each measurement runs in a child process of its own, so its peak RSS is its own:

- ``forward``: the baseline, ``model.model(input_ids)`` under ``torch.no_grad`` (the decoder body:
  streaming needs no logits) on batches of the stream's own windows, in the forward dtype that
  ``model_dtype='auto'`` picks (bfloat16 where the CPU computes it natively);
- ``stream (buffer N)``: `CLTTrainer` on `LiveActivations` (the model's nnsight trace filling a
  shuffle buffer of N tokens, the trainer drawing batches from it) with the recipe's transcoder,
  for ``--steps`` steps after a warm-up of the buffer's first fill.

The timed steps must train at least twice the buffer's tokens (else they would mostly draw rows
forwarded before the timer started, and the ratio would flatter the stream): the script refuses
fewer. Tokens/s of the stream count trained tokens over the whole loop (the forward of every chunk it
needed plus the training steps); the ratio is stream / forward (the issue's target: >= 0.8).
Peak RSS is the child's maximum resident set (``ru_maxrss``), model and torch included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

RECIPE = {"num_features": 1024, "activation_fn": "topk", "topk": 16, "cross_layer": False, "skip_connection": True}
"""The transcoder trained while streaming (experiments/configs/smollm2_recipe.yaml)."""


def _child(args: argparse.Namespace) -> dict:
    from clt.config import CLTConfig, ExtractionConfig, TrainingConfig
    from clt.pipeline.train import live_source
    from clt.training.trainer import CLTTrainer

    extraction = ExtractionConfig(model=args.model, corpus=args.corpus, batch_size=8, context_length=128)
    training = TrainingConfig(
        stream=True, buffer_tokens=args.buffer, batch_size=args.batch_size, training_steps=args.steps, log_every=10**6
    )
    source = live_source(extraction, training)  # tokenises the corpus and forwards the buffer's first fill
    dtype = str(next(source.extractor.model.parameters()).dtype).removeprefix("torch.")
    if args.child == "forward":
        windows = source._chunk_windows(source.buffer_chunks)  # windows the stream has not used yet
        batches = [windows[i : i + 8] for i in range(0, len(windows), 8)]
        body = source.extractor.model.model
        start, tokens = time.perf_counter(), 0
        with torch.no_grad():
            while time.perf_counter() - start < args.seconds:
                for batch in batches:
                    ids = torch.nn.utils.rnn.pad_sequence(
                        [torch.tensor(w.token_ids) for w in batch], batch_first=True, padding_value=0
                    )
                    body(input_ids=ids)
                    tokens += sum(len(w.token_ids) for w in batch)
        elapsed = time.perf_counter() - start
    else:
        cfg = CLTConfig(num_layers=source.num_layers, d_model=source.d_model, layers=source.layers, **RECIPE)
        trainer = CLTTrainer(cfg, training, source)
        start = time.perf_counter()
        trainer.train(progress=False)
        elapsed = time.perf_counter() - start
        tokens = args.steps * args.batch_size
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "kind": args.child,
        "buffer": args.buffer,
        "dtype": dtype,
        "tokens_per_s": tokens / elapsed,
        "rss_gb": rss_gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="stdlib")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds of the forward baseline")
    parser.add_argument("--buffer-tokens", default="8192,16384", help="buffer sizes to measure, comma-separated")
    parser.add_argument("--child", choices=("forward", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--buffer", type=int, default=16384, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    base = [sys.executable, __file__, "--model", args.model, "--corpus", args.corpus, "--steps", str(args.steps)]
    base += ["--batch-size", str(args.batch_size), "--seconds", str(args.seconds)]
    largest = max(int(b) for b in args.buffer_tokens.split(","))
    if args.steps * args.batch_size < 2 * largest:
        sys.exit(
            f"--steps {args.steps} x --batch-size {args.batch_size} trains fewer than twice the {largest:,}-token "
            f"buffer, so the timed steps would mostly use rows forwarded before the timer: use --steps >= "
            f"{-(-2 * largest // args.batch_size)}"
        )
    runs = [("forward", int(args.buffer_tokens.split(",")[0]))]
    runs += [("stream", int(b)) for b in args.buffer_tokens.split(",")]
    results = []
    for kind, buffer in runs:
        out = subprocess.run([*base, "--child", kind, "--buffer", str(buffer)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{kind} (buffer {buffer}) failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    forward = results[0]["tokens_per_s"]
    print(f"{'measurement':<26}{'dtype':>10}{'tokens/s':>12}{'ratio':>8}{'peak RSS':>11}")
    for r in results:
        name = "bare forward" if r["kind"] == "forward" else f"stream, buffer {r['buffer']:,}"
        ratio = r["tokens_per_s"] / forward
        print(f"{name:<26}{r['dtype']:>10}{r['tokens_per_s']:>12.0f}{ratio:>8.2f}{r['rss_gb']:>9.2f} GB")


if __name__ == "__main__":
    main()
