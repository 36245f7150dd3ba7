"""Stage runners shared by the CLI, the demo and notebooks: config in, result object out."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from clt.config.extraction import ExtractionConfig
from clt.training.data import ActivationStore

logger = logging.getLogger(__name__)



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
class DemoResult:
    """What `clt demo` produced: paths, sizes, timings and metrics."""

    output_dir: Path
    store: ActivationStore
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """A human-readable report."""
        lines = [
            f"demo outputs in {self.output_dir}",
            f"store: {self.store}",
            f"store size on disk: {self.store.nbytes() / 2**20:.1f} MiB "
            f"({self.store.nbytes() / self.store.n_tokens / 1024:.1f} KiB/token)",
        ]
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        lines += [f"time {k}: {v:.1f} s" for k, v in self.timings.items()]
        return "\n".join(lines)


def run_demo(output_dir: str | Path = "runs/demo", *, max_tokens: int = 20_000, model: str = "smollm2-135m") -> DemoResult:
    """The end-to-end demo on the default model: extract a store of all layers."""
    output_dir = Path(output_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cfg = ExtractionConfig(model=model, max_tokens=max_tokens, output_dir=str(output_dir / "store"))
    store = run_extraction(cfg)
    timings["extract"] = time.perf_counter() - start
    result = DemoResult(output_dir, store, timings)
    (output_dir / "demo_summary.json").write_text(json.dumps(
        {"store": str(store.path), "n_tokens": store.n_tokens, "bytes": store.nbytes(), "timings": timings}, indent=1))
    return result


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
