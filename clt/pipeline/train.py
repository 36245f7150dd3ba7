"""Extraction and training runners: a store from a config, a transcoder trained on a store or live."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from clt.config.extraction import ExtractionConfig
from clt.pipeline.evaluation import heldout_corpus, metric_lines, run_evaluation, run_heldout_evaluation
from clt.pipeline.loading import model_for
from clt.store import ActivationStore, writable_folder

logger = logging.getLogger(__name__)

_EXTRACTOR_FIELDS = ("layers", "context_length", "batch_size", "prepend_bos", "exclude_bos", "device")
"""ExtractionConfig fields that are options of `ActivationExtractor` (besides the model)."""
_EXTRACT_FIELDS = (
    "max_tokens",
    "output_dir",
    "store_dtype",
    "shard_tokens",
    "text_field",
    "compression",
    "output_site",
    "writer_rank",
    "num_writers",
)
"""ExtractionConfig fields that are options of `ActivationExtractor.extract` (besides the corpus)."""


def run_extraction(cfg: ExtractionConfig, *, progress: bool = True, stop: Any = None) -> ActivationStore:
    """Extract activations as `cfg` says into `cfg.output_dir`; writes the resolved config beside them.

    `stop` (a threading.Event) ends the extraction early with `ExtractionStopped`; the store resumes.
    """
    from clt.nnsight.extractors import ActivationExtractor

    writable_folder(cfg.output_dir)  # fail before the model loads
    extractor = ActivationExtractor(cfg.model, dtype=_forward_dtype(cfg), **cfg.subset(*_EXTRACTOR_FIELDS))
    store = extractor.extract(cfg.corpus, progress=progress, stop=stop, **cfg.subset(*_EXTRACT_FIELDS))
    cfg.save(Path(cfg.output_dir) / "extraction.yaml")
    return store


def _forward_dtype(cfg: ExtractionConfig) -> Any:
    from clt.nnsight.precision import resolve_model_dtype

    return resolve_model_dtype(cfg.model_dtype, cfg.device)


def live_source(extraction: ExtractionConfig, training: Any) -> Any:
    """`LiveActivations`: the model `extraction` names, run in its forward dtype, streaming its corpus
    through a shuffle buffer of `training.buffer_tokens` tokens."""
    from clt.nnsight.extractors import ActivationExtractor
    from clt.training.live import LiveActivations

    extractor = ActivationExtractor(
        extraction.model, dtype=_forward_dtype(extraction), **extraction.subset(*_EXTRACTOR_FIELDS)
    )
    logger.info("training from the live model %s (%s forward)", extraction.model, _forward_dtype(extraction))
    return LiveActivations(
        extractor,
        extraction.corpus,
        buffer_tokens=training.buffer_tokens,
        batch_size=training.batch_size,
        seed=training.seed,
        text_field=extraction.text_field,
    )


@dataclasses.dataclass
class TrainingResult:
    """What `run_training` produced: the transcoder, where it is, and its metrics."""

    transcoder: Any
    store: Any
    """The ActivationStore trained on, or the LiveActivations stream."""
    output_dir: Path | None
    history: list[dict[str, float]]
    reconstruction: Any
    replacement: Any = None
    evaluation: Any = None
    """The whole `EvaluationResult` (held-out corpus, graph scores)."""

    def summary(self) -> str:
        """A human-readable report."""
        lines = [
            f"transcoder: {self.transcoder.extra_repr()}",
            f"trained on: {self.store}",
            *(self.evaluation.summary().splitlines() if self.evaluation is not None else []),
        ]
        if self.evaluation is None and self.reconstruction is not None:
            lines += metric_lines(self.reconstruction, self.replacement)
        if self.output_dir is not None:
            lines.append(
                f"saved to {self.output_dir / 'transcoder'} (metrics log: {self.output_dir / 'metrics.jsonl'})"
            )
        return "\n".join(lines)


def run_training(
    extraction: ExtractionConfig,
    transcoder: Any,
    training: Any,
    *,
    store_path: str | Path | None = None,
    store: ActivationStore | None = None,
    replacement: bool = True,
    progress: bool = True,
) -> TrainingResult:
    """Train a transcoder on a store (opened from `store_path`, given, or extracted first) or, with
    `training.stream`, on the live model, then evaluate it (on held-out text where the corpus has a
    held-out split, as 'stdlib' has)."""
    from clt.training.trainer import CLTTrainer

    if store is None and training.stream:
        store = live_source(extraction, training)
    elif store is None:
        store = (
            ActivationStore.open(store_path, batch_size=training.batch_size)
            if store_path
            else run_extraction(extraction, progress=progress)
        )
    transcoder = transcoder.replace(
        num_layers=store.num_layers, d_model=store.d_model, layers=store.layers, model_name=store.model_name
    )
    if training.kl_coef and not store.model_name:
        raise ValueError(
            "kl_coef > 0 needs the language model, but the store records none; train with CLTTrainer("
            "..., language_model=(model, tokenizer)) or set kl_coef=0"
        )
    language_model = None
    if training.kl_coef:  # a live stream's own model (in its forward dtype), else the store's model
        extractor = getattr(store, "extractor", None)
        language_model = (
            (extractor.model, extractor.tokenizer)
            if extractor is not None
            else model_for(None, store.model_name, training.device)
        )
    trainer = CLTTrainer(transcoder, training, store, language_model=language_model)
    model = trainer.train(progress=progress)
    if not trainer.is_main:  # under torchrun rank 0 evaluates and reports
        return TrainingResult(model, store, trainer.output_dir, trainer.history, None)
    output_path = None if trainer.output_dir is None else trainer.output_dir / "eval.json"
    heldout = heldout_corpus(extraction.corpus)
    if heldout is not None and replacement:
        evaluation = run_heldout_evaluation(model, corpus=heldout, device=training.device, output_path=output_path)
    elif isinstance(store, ActivationStore):
        evaluation = run_evaluation(
            model,
            store,
            replacement=replacement and bool(store.model_name),
            device=training.device,
            output_path=output_path,
        )
    else:
        evaluation = run_heldout_evaluation(
            model, corpus=extraction.corpus, device=training.device, output_path=output_path
        )
    return TrainingResult(
        model,
        store,
        trainer.output_dir,
        trainer.history,
        evaluation.reconstruction,
        evaluation.replacement,
        evaluation,
    )


def run_streaming(
    extraction: ExtractionConfig,
    transcoder: Any,
    training: Any,
    *,
    replacement: bool = True,
    progress: bool = True,
    timeout: float = 600.0,
) -> TrainingResult:
    """Extract in a background thread and train on the store while it is being written, then evaluate.

    Training starts after the first shard (normalisation statistics from the shards present then) and
    reads epoch 0 in the order the shards are written; see `ActivationStore.open(follow=...)`. If
    training fails or is interrupted, the extraction stops after its current batch (the store resumes).
    """
    from clt.nnsight.extractors import BackgroundExtraction

    producer = BackgroundExtraction(lambda stop: run_extraction(extraction, progress=False, stop=stop))
    producer.start()
    try:
        store = ActivationStore.open(
            extraction.output_dir, batch_size=training.batch_size, follow=producer, timeout=timeout
        )
        result = run_training(extraction, transcoder, training, store=store, replacement=replacement, progress=progress)
    except BaseException:
        producer.stop()  # no model keeps running behind a failed or interrupted run; the store resumes
        raise
    producer.result()
    return result
