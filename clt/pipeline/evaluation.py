"""Evaluation runners: reconstruction metrics on a store, the replacement model on held-out text."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from clt.files import atomic_write_text
from clt.pipeline.loading import model_for
from clt.store import ActivationStore

logger = logging.getLogger(__name__)


def metric_lines(reconstruction: Any, replacement: Any = None) -> list[str]:
    """Report lines for reconstruction (and replacement-model) metrics."""
    r = reconstruction
    lines = [
        f"FVU {r.fvu:.4f} (per layer {' '.join(f'{v:.3f}' for v in r.fvu_per_layer)})",
        f"L0 {r.l0:.1f} active features per token over {len(r.l0_per_layer)} layers; "
        f"dead fraction {r.dead_fraction:.3f}",
    ]
    if replacement is not None:
        m = replacement
        lines.append(
            f"replacement model: KL {m.kl:.4f} nats/token, top-1 agreement {m.top1_agreement:.3f}, "
            f"CE recovered {m.ce_recovered:.3f} (CE {m.ce_original:.3f} -> {m.ce_replaced:.3f}; "
            f"zero-ablated {m.ce_zero_ablated:.3f})"
        )
    return lines


@dataclasses.dataclass
class EvaluationResult:
    """Metrics of a transcoder on a store and, with a model, of the replacement model."""

    reconstruction: Any
    replacement: Any = None

    def summary(self) -> str:
        """A human-readable report."""
        return "\n".join(metric_lines(self.reconstruction, self.replacement))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready metrics (written to `eval.json`)."""
        return {
            "reconstruction": self.reconstruction.as_dict(),
            "replacement": self.replacement.as_dict() if self.replacement is not None else None,
        }


def run_evaluation(
    transcoder: Any,
    store: ActivationStore,
    *,
    model: Any = None,
    replacement: bool = True,
    max_tokens: int = 4096,
    context_length: int | None = None,
    device: str = "cpu",
    output_path: str | Path | None = None,
) -> EvaluationResult:
    """Reconstruction metrics on `store` and (when a model is known) replacement-model metrics.

    The replacement metrics run on windows of `context_length` tokens (default: the store's own
    extraction setting, so they match the windows the transcoder was trained on).
    """
    from clt.training.metrics import reconstruction_metrics, replacement_metrics

    result = EvaluationResult(reconstruction_metrics(transcoder, store, max_tokens=max_tokens))
    if replacement and (model is not None or transcoder.cfg.model_name or store.model_name):
        lm, tokenizer = model_for(transcoder, model or transcoder.cfg.model_name or store.model_name, device)
        result.replacement = replacement_metrics(
            lm, tokenizer, transcoder.to(device), context_length=context_length or store.extra.get("context_length", 64)
        )
    if output_path is not None:
        atomic_write_text(json.dumps(result.as_dict(), indent=1), Path(output_path))
    return result
