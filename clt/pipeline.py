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
