"""Stage runners shared by the CLI, the demo and notebooks: config in, result object out."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from clt.config.extraction import ExtractionConfig
from clt.files import atomic_write_text
from clt.training.data import ActivationStore

logger = logging.getLogger(__name__)

DEMO_TRANSCODER: dict[str, Any] = {"activation_fn": "batchtopk", "topk": 8, "cross_layer": True}
"""The demo's transcoder: a CLT whose BatchTopK keeps 8 features per token and layer on average."""
DEMO_TRAINING: dict[str, Any] = {"learning_rate": 5e-4, "checkpoint_every": 0}
"""The demo's training options beyond size: a high learning rate for a short run."""

def run_extraction(cfg: ExtractionConfig, *, progress: bool = True) -> ActivationStore:
    """Extract activations as `cfg` says into `cfg.output_dir`; writes the resolved config beside them."""
    from clt.nnsight.extractors import ActivationExtractor

    extractor = ActivationExtractor(cfg.model, layers=cfg.layers, context_length=cfg.context_length,
                                    batch_size=cfg.batch_size, prepend_bos=cfg.prepend_bos,
                                    exclude_bos=cfg.exclude_bos, device=cfg.device)
    store = extractor.extract(cfg.corpus, max_tokens=cfg.max_tokens, output_dir=cfg.output_dir,
                              store_dtype=cfg.store_dtype, shard_tokens=cfg.shard_tokens,
                              text_field=cfg.text_field, progress=progress)
    cfg.save(Path(cfg.output_dir) / "extraction.yaml")
    return store


@dataclasses.dataclass
class TrainingResult:
    """What `run_training` produced: the transcoder, where it is, and its metrics."""

    transcoder: Any
    store: ActivationStore
    output_dir: Path | None
    history: list[dict[str, float]]
    reconstruction: Any
    replacement: Any = None

    def summary(self) -> str:
        """A human-readable report."""
        r = self.reconstruction
        lines = [f"transcoder: {self.transcoder.extra_repr()}",
                 f"trained on: {self.store}",
                 f"FVU {r.fvu:.4f} (per layer {' '.join(f'{v:.3f}' for v in r.fvu_per_layer)})",
                 f"L0 {r.l0:.1f} active features per token over {len(r.l0_per_layer)} layers; "
                 f"dead fraction {r.dead_fraction:.3f}"]
        if self.replacement is not None:
            m = self.replacement
            lines.append(f"replacement model: KL {m.kl:.4f} nats/token, top-1 agreement {m.top1_agreement:.3f}, "
                         f"CE recovered {m.ce_recovered:.3f} (CE {m.ce_original:.3f} -> {m.ce_replaced:.3f}; "
                         f"zero-ablated {m.ce_zero_ablated:.3f})")
        if self.output_dir is not None:
            lines.append(f"saved to {self.output_dir / 'transcoder'} (metrics log: {self.output_dir / 'metrics.jsonl'})")
        return "\n".join(lines)


def run_training(extraction: ExtractionConfig, transcoder: Any, training: Any, *, store_path: str | Path | None = None,
                 store: ActivationStore | None = None, replacement: bool = True, progress: bool = True) -> TrainingResult:
    """Train a transcoder on a store (opened from `store_path`, given, or extracted first), then evaluate it."""
    from clt.training.metrics import reconstruction_metrics, replacement_metrics
    from clt.training.trainer import CLTTrainer

    if store is None:
        store = (ActivationStore.open(store_path, batch_size=training.batch_size) if store_path
                 else run_extraction(extraction, progress=progress))
    transcoder = transcoder.replace(num_layers=store.num_layers, d_model=store.d_model, layers=store.layers,
                                    model_name=store.model_name)
    trainer = CLTTrainer(transcoder, training, store)
    model = trainer.train(progress=progress)
    result = TrainingResult(model, store, trainer.output_dir, trainer.history,
                            reconstruction_metrics(model, store, max_tokens=4096))
    if replacement and store.model_name:
        from clt.nnsight.models import load_model

        lm, tokenizer = load_model(store.model_name, device=training.device)
        result.replacement = replacement_metrics(lm, tokenizer, model.to(training.device),
                                                 context_length=extraction.context_length)
    if trainer.output_dir is not None:
        metrics = {"reconstruction": result.reconstruction.as_dict(),
                   "replacement": result.replacement.as_dict() if result.replacement else None}
        (trainer.output_dir / "eval.json").write_text(json.dumps(metrics, indent=1))
    return result


@dataclasses.dataclass
class DemoResult:
    """What `clt demo` produced: paths, timings and the result of each stage."""

    output_dir: Path
    store: ActivationStore
    training: TrainingResult | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """A human-readable report."""
        nbytes = self.store.nbytes()
        lines = [f"demo outputs in {self.output_dir}", f"store: {self.store}",
                 f"store size on disk: {nbytes / 2**20:.1f} MiB ({nbytes / self.store.n_tokens / 1024:.1f} KiB/token)"]
        if self.training is not None:
            lines.append(self.training.summary())
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        lines += [f"time {k}: {v:.1f} s" for k, v in self.timings.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (written to `demo_summary.json`)."""
        out: dict[str, Any] = {"store": str(self.store.path), "n_tokens": self.store.n_tokens,
                               "bytes": self.store.nbytes(), "timings": self.timings, **self.extra}
        if self.training is not None:
            out["reconstruction"] = self.training.reconstruction.as_dict()
            out["replacement"] = self.training.replacement.as_dict() if self.training.replacement else None
        return out


def run_demo(output_dir: str | Path = "runs/demo", *, model: str = "smollm2-135m", max_tokens: int = 20_000,
             num_features: int = 64, training_steps: int = 600, batch_size: int = 128,
             progress: bool = True) -> DemoResult:
    """The end-to-end demo: extract a store of all layers, train a CLT on it and evaluate it."""
    from clt.config.training import TrainingConfig
    from clt.config.transcoder import CLTConfig

    output_dir = Path(output_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    extraction = ExtractionConfig(model=model, max_tokens=max_tokens, output_dir=str(output_dir / "store"))
    store = run_extraction(extraction, progress=progress)
    timings["extract"] = time.perf_counter() - start
    start = time.perf_counter()
    transcoder = CLTConfig(num_features=num_features, num_layers=store.num_layers, d_model=store.d_model,
                           **DEMO_TRANSCODER)
    training = TrainingConfig(batch_size=batch_size, training_steps=training_steps,
                              output_dir=str(output_dir / "train"), **DEMO_TRAINING)
    trained = run_training(extraction, transcoder, training, store=store, progress=progress)
    timings["train+evaluate"] = time.perf_counter() - start
    result = DemoResult(output_dir, store, trained, timings)
    atomic_write_text(json.dumps(result.as_dict(), indent=1), output_dir / "demo_summary.json")
    return result
