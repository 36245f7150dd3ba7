"""The end-to-end demo."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from clt.config.constants import DEFAULT_MODEL
from clt.config.extraction import ExtractionConfig
from clt.files import atomic_write_text
from clt.pipeline.attribution import AttributionResult, run_attribution
from clt.pipeline.train import TrainingResult, run_extraction, run_training
from clt.store import ActivationStore

logger = logging.getLogger(__name__)

DEMO_TRAINING: dict[str, Any] = {
    "training_steps": 250,
    "buffer_tokens": 32_768,
    "learning_rate": 3e-3,
    "lr_warmup_steps": 25,
    "kl_start": 0.65,
    "kl_windows": 2,
    "mixed_precision": "bf16",
    "checkpoint_every": 0,
}
"""The demo's departures from the default model's recipe (`clt.config.recipes`): a short run (250
steps) at a higher learning rate whose last 88 steps add the KL term on two windows per step (a KL
step costs ~2.5x a plain one), the transcoder's step under bf16 autocast, and a 32k-token buffer (a
16k one leaves an unusual document's batch unmixed at step ~200 and ends ~0.03 nats worse).
Measured from the recipe's values, one change at a time: KL start 0.72 -> 0.65 took held-out KL
1.560 -> 1.545, then learning rate 2e-3 -> 3e-3 -> 1.494, or bf16 autocast -> 1.520."""
DEMO_PROMPT = "A list is a mutable sequence, and a tuple is an immutable"
"""The demo's prompt, in the style of the default corpus (the next token is ' sequence')."""


@dataclasses.dataclass
class DemoResult:
    """What `clt demo` produced: paths, timings and the result of each stage."""

    output_dir: Path
    store: ActivationStore
    training: TrainingResult | None = None
    attribution: AttributionResult | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """A human-readable report."""
        nbytes = self.store.nbytes()
        lines = [
            f"demo outputs in {self.output_dir}",
            f"store: {self.store}",
            f"store size on disk: {nbytes / 2**20:.1f} MiB ({nbytes / self.store.n_tokens / 1024:.1f} KiB/token)",
        ]
        if self.training is not None:
            lines.append(self.training.summary())
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        lines += [f"time {k}: {v:.1f} s" for k, v in self.timings.items()]
        if self.attribution is not None:  # last: where the graph is, and its scores
            lines.append(self.attribution.summary())
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (written to `demo_summary.json`)."""
        out: dict[str, Any] = {
            "store": str(self.store.path),
            "n_tokens": self.store.n_tokens,
            "bytes": self.store.nbytes(),
            "timings": self.timings,
            **self.extra,
        }
        if self.training is not None:
            out["reconstruction"] = self.training.reconstruction.as_dict()
            out["replacement"] = self.training.replacement.as_dict() if self.training.replacement else None
        if self.attribution is not None:
            out["attribution"] = self.attribution.as_dict()
        return out


def run_demo(
    output_dir: str | Path = "runs/demo",
    *,
    model: str = DEFAULT_MODEL,
    max_tokens: int = 8_000,
    num_features: int | None = None,
    training_steps: int | None = None,
    batch_size: int | None = None,
    prompt: str = DEMO_PROMPT,
    labeller: Any = None,
    progress: bool = True,
) -> DemoResult:
    """The end-to-end demo: train a transcoder with the default model's recipe (streamed from the
    live model; `DEMO_TRAINING` shortens it), evaluate it on held-out
    text, extract a store of `max_tokens` tokens for its feature cards, and write the attribution
    graph of `prompt` as its HTML page with the cards of its features (labelled by `labeller`: a
    callable or a local causal LM's name; default the offline rule). None: the recipe's value."""
    from clt.config.recipes import recipe
    from clt.config.training import TrainingConfig
    from clt.config.transcoder import CLTConfig

    output_dir = Path(output_dir)
    settings = recipe(DEFAULT_MODEL)
    sizes = {"num_features": num_features, "training_steps": training_steps, "batch_size": batch_size}
    given = {name: value for name, value in sizes.items() if value is not None}
    training = TrainingConfig.from_dict(
        {**settings["training"], **DEMO_TRAINING, "output_dir": str(output_dir / "train")}
        | {k: v for k, v in given.items() if k in TrainingConfig.field_names()}
    )
    transcoder = CLTConfig.from_dict(
        {"num_layers": 1, "d_model": 1, **settings["transcoder"]}
        | {k: v for k, v in given.items() if k in CLTConfig.field_names()}
    )
    stream = ExtractionConfig.from_dict({**settings["extraction"], "model": model})
    timings: dict[str, float] = {}
    start = time.perf_counter()
    trained = run_training(stream, transcoder, training, progress=progress)
    timings["train+evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    extraction = stream.replace(max_tokens=max_tokens, output_dir=str(output_dir / "store"))
    store = run_extraction(extraction, progress=progress)
    timings["extract (for the cards)"] = time.perf_counter() - start
    start = time.perf_counter()
    attribution = run_attribution(
        trained.transcoder,
        prompt,
        model=model,
        output_dir=output_dir / "attribution",
        store=store,
        labeller=labeller,
        progress=progress,
    )
    timings["attribute"] = time.perf_counter() - start
    result = DemoResult(output_dir, store, trained, attribution, timings)
    atomic_write_text(json.dumps(result.as_dict(), indent=1), output_dir / "demo_summary.json")
    return result
