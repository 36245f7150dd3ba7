"""ActivationExtractor: trace a model with nnsight and collect each layer's MLP input and output.

One trace per batch of context windows records x_l (MLP input) and y_l (MLP output) for the
chosen layers; padding positions (and, by default, BOS positions) are dropped, and rows stream
into an `ActivationStore` so memory does not grow with the token count.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clt.config.constants import DEFAULT_MODEL, STORE_DTYPES, check_choice, check_output_site
from clt.data.corpus import DEFAULT_CORPUS, TokenWindow, load_texts, token_windows
from clt.data.windows import hash_window, pad_id, pad_windows
from clt.nnsight.loading import find_layout, load_model
from clt.nnsight.splice import wrap_model
from clt.store import FLOAT_DTYPES, MANIFEST, ActivationStore, StoreError, StoreWriter

logger = logging.getLogger(__name__)


class ActivationExtractor:
    """Collects MLP inputs and outputs of a language model over a corpus, with nnsight."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        layers: Iterable[int] | None = None,
        context_length: int = 128,
        batch_size: int = 8,
        prepend_bos: bool = True,
        exclude_bos: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> None:
        if model is None:
            model, tokenizer = load_model(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with the model: ActivationExtractor(model=m, tokenizer=t)")
        self.model_name = model_name
        self.model, self.tokenizer = model.eval(), tokenizer
        self.layout = find_layout(model)
        self.layers = list(range(self.layout.num_layers)) if layers is None else sorted(set(layers))
        bad = [layer for layer in self.layers if not 0 <= layer < self.layout.num_layers]
        if bad or not self.layers:
            raise ValueError(
                f"layers {bad or self.layers} are invalid: the model has layers 0..{self.layout.num_layers - 1}"
            )
        max_context = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        if max_context is not None and context_length > max_context:
            raise ValueError(f"context_length={context_length} exceeds the model's context {max_context}")
        self.context_length, self.batch_size = context_length, batch_size
        self.prepend_bos, self.exclude_bos = prepend_bos, exclude_bos
        self.device = torch.device(device)
        self.pad_id = pad_id(tokenizer)
        self.lm = wrap_model(model, tokenizer)
        self._mlps = [self.lm.get(self.layout.mlp_paths[layer]) for layer in self.layers]

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return self.layout.d_model

    def windows(self, source: Any = DEFAULT_CORPUS, *, text_field: str = "text") -> Iterator[TokenWindow]:
        """Context windows of the corpus, in a deterministic order."""
        texts = load_texts(source, text_field=text_field)
        return token_windows(texts, self.tokenizer, self.context_length, prepend_bos=self.prepend_bos)

    @torch.no_grad()
    def activations(
        self, windows: list[TokenWindow], *, dtype: torch.dtype = torch.float32, output_site: str = "mlp_out"
    ) -> dict[str, torch.Tensor]:
        """One nnsight trace over a batch of windows: inputs/outputs [n, L, d] of the kept positions, as `dtype`.

        With ``output_site='mlp_in'`` the MLP outputs are not recorded and ``outputs`` is ``inputs``.
        """
        check_output_site(output_site, ValueError)
        ids, mask = pad_windows(windows, self.pad_id)
        width = ids.shape[1]
        keep = mask.bool()
        if self.prepend_bos and self.exclude_bos:
            keep[:, 0] = False
        saved = []
        with self.lm.trace({"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}) as tracer:
            for mlp in self._mlps:
                saved.append((mlp.input.save(), mlp.output.save() if output_site == "mlp_out" else None))
            tracer.stop()
        rows = keep.view(-1).nonzero().squeeze(1).to(self.device)
        shape = (len(rows), len(self.layers), self.d_model)
        inputs = torch.empty(shape, dtype=dtype, device=self.device)
        outputs = torch.empty(shape, dtype=dtype, device=self.device) if output_site == "mlp_out" else inputs
        for i, (x, y) in enumerate(saved):  # gather the kept rows, then one converting copy per layer
            inputs.select(1, i).copy_(x.reshape(-1, self.d_model).index_select(0, rows))
            if y is not None:
                outputs.select(1, i).copy_(_first(y).reshape(-1, self.d_model).index_select(0, rows))
        inputs = inputs.cpu()
        positions = torch.arange(width).expand(len(windows), width)[keep]
        window_ids = torch.tensor([hash_window(w) for w in windows]).unsqueeze(1).expand(-1, width)[keep]
        return {
            "inputs": inputs,
            "outputs": inputs if output_site == "mlp_in" else outputs.cpu(),
            "token_ids": ids[keep],
            "positions": positions,
            "window_ids": window_ids,
        }

    def _stream(
        self,
        windows: Iterator[TokenWindow],
        max_tokens: int,
        done: int,
        progress: bool,
        dtype: torch.dtype,
        output_site: str = "mlp_out",
        stop: threading.Event | None = None,
    ) -> Iterator[tuple[dict, int]]:
        bar = tqdm(total=max_tokens, initial=done, unit="tok", desc="extracting", disable=not progress)
        consumed = 0
        try:
            while done < max_tokens:
                if stop is not None and stop.is_set():
                    raise ExtractionStopped(
                        f"extraction stopped on request after {done} tokens; run it again "
                        "with the same settings to resume"
                    )
                chunk = list(itertools.islice(windows, self.batch_size))
                if not chunk:
                    logger.warning("the corpus ran out after %d tokens (max_tokens=%d)", done, max_tokens)
                    break
                batch = self.activations(chunk, dtype=dtype, output_site=output_site)
                consumed += len(chunk)
                take = min(max_tokens - done, batch["inputs"].shape[0])
                batch = {k: v[:take] for k, v in batch.items()}
                if output_site == "mlp_in":
                    batch["outputs"] = batch["inputs"]
                done += take
                bar.update(take)
                yield batch, consumed
        finally:
            bar.close()

    def extract(
        self,
        source: Any = DEFAULT_CORPUS,
        *,
        max_tokens: int = 20_000,
        output_dir: str | Path | None = None,
        store_dtype: str = "float16",
        shard_tokens: int = 8192,
        batch_size: int = 64,
        normalize: bool = True,
        text_field: str = "text",
        progress: bool = True,
        write_behind: bool | None = None,
        compression: str = "none",
        output_site: str = "mlp_out",
        writer_rank: int = 0,
        num_writers: int = 1,
        stop: threading.Event | None = None,
    ) -> ActivationStore:
        """Extract up to `max_tokens` tokens into a store (on disk when `output_dir` is given).

        A disk store that already holds part of the same extraction is resumed from its manifest.
        `write_behind` writes each batch in a thread while the next one is traced; by default it is
        on when the model runs on an accelerator (on a CPU the thread competes with the forward pass).
        With ``num_writers > 1`` this process is writer `writer_rank` of a store filled by several:
        it takes windows writer_rank, writer_rank + num_writers, ... of those one process would read,
        and the last writer to finish merges the parts (the merged store holds the same rows).
        Setting `stop` ends the extraction before its next batch with `ExtractionStopped`; what was
        written stays, and the store resumes from it.
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if num_writers < 1 or not 0 <= writer_rank < num_writers:
            raise ValueError(
                f"writer_rank {writer_rank} is out of range for num_writers={num_writers}: "
                f"use 0..{max(num_writers, 1) - 1}"
            )
        windows = self.windows(source, text_field=text_field)
        if output_dir is None:
            if num_writers > 1:
                raise ValueError("several writers share one store folder: pass output_dir")
            parts = [
                b for b, _ in self._stream(windows, max_tokens, 0, progress, _dtype(store_dtype), output_site, stop)
            ]
            if not parts:
                raise StoreError("the corpus produced no tokens")
            merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            return ActivationStore.from_nnsight_activations(
                {**merged, "layers": self.layers, "model_name": self.model_name, "output_site": output_site},
                batch_size,
                normalize,
            )
        if num_writers > 1:
            if (Path(output_dir) / MANIFEST).is_file():
                logger.info("%s is already merged", output_dir)
                return ActivationStore.open(output_dir, batch_size=batch_size, normalize=normalize)
            windows, max_tokens = self._share(windows, max_tokens, writer_rank, num_writers)
        writer = StoreWriter(
            output_dir,
            layers=self.layers,
            d_model=self.d_model,
            model_name=self.model_name,
            dtype=store_dtype,
            shard_tokens=shard_tokens,
            extra=self._settings(source),
            compression=compression,
            output_site=output_site,
            part=(writer_rank, num_writers) if num_writers > 1 else None,
        )
        if writer.manifest["extra"] != self._settings(source):
            raise StoreError(
                f"cannot resume {output_dir}: it was extracted with {writer.manifest['extra']}, "
                f"this run uses {self._settings(source)}; use a new output folder"
            )
        skipped = writer.state.get("windows_done", 0)
        if writer.complete and writer.n_tokens >= max_tokens:
            logger.info("%s already holds %d tokens", output_dir, writer.n_tokens)
            return writer.finish(batch_size=batch_size, normalize=normalize)
        writer.manifest["complete"] = False
        stream = self._stream(
            itertools.islice(windows, skipped, None),
            max_tokens,
            writer.n_tokens,
            progress,
            _dtype(store_dtype),
            output_site,
            stop,
        )
        behind = self.device.type != "cpu" if write_behind is None else write_behind
        consumed = _write(writer, stream, skipped, behind=behind)
        return writer.finish(batch_size=batch_size, normalize=normalize, state={"windows_done": skipped + consumed})

    def _share(
        self, windows: Iterator[TokenWindow], max_tokens: int, rank: int, count: int
    ) -> tuple[Iterator[TokenWindow], int]:
        """Writer `rank`'s windows (rank, rank + count, ...) of those one process reads for `max_tokens`,
        and its tokens."""
        bos_dropped = int(self.prepend_bos and self.exclude_bos)
        mine, budget, total = [], 0, 0
        for index, window in enumerate(windows):
            if total >= max_tokens:
                break
            kept = min(len(window.token_ids) - bos_dropped, max_tokens - total)
            total += kept
            if index % count == rank:
                mine.append(window)
                budget += kept
        if budget == 0:
            raise StoreError(f"writer {rank} of {count} gets no tokens ({total} in all): use fewer writers")
        return iter(mine), budget

    def _settings(self, source: Any) -> dict[str, Any]:
        corpus = (
            source if isinstance(source, str) else str(source) if isinstance(source, Path) else type(source).__name__
        )
        return {
            "corpus": corpus,
            "context_length": self.context_length,
            "prepend_bos": self.prepend_bos,
            "exclude_bos": self.exclude_bos,
        }

    def extract_from_dataset(
        self,
        dataset_path: Any = DEFAULT_CORPUS,
        max_tokens: int = 100_000,
        *,
        store_dtype: str = "float32",
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The seed's API: an activations dict for `ActivationStore.from_nnsight_activations`."""
        store = self.extract(dataset_path, max_tokens=max_tokens, store_dtype=store_dtype, **kwargs)
        data = store.shard(0)
        return {**data, "layers": list(self.layers), "model_name": self.model_name}


class ExtractionStopped(RuntimeError):
    """An extraction ended on request (`extract(stop=...)`); its store keeps what was written and resumes."""


class BackgroundExtraction(threading.Thread):
    """Runs an extraction in a daemon thread, as the producer a followed store watches
    (``ActivationStore.open(path, follow=producer)``). `extract` gets the thread's stop event (pass it
    to `ActivationExtractor.extract(stop=...)`); `error` holds its failure."""

    def __init__(self, extract: Callable[[threading.Event], ActivationStore]) -> None:
        super().__init__(name="clt-extraction", daemon=True)
        self._extract = extract
        self.stop_requested = threading.Event()
        self.store: ActivationStore | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        """Run the extraction, keeping its store or its error."""
        try:
            self.store = self._extract(self.stop_requested)
        except ExtractionStopped as err:
            self.error = err
            logger.info("%s", err)
        except Exception as err:  # reported by the follower and by `result`
            self.error = err
            logger.error("the background extraction failed: %r", err)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the extraction before its next batch and wait for it (its store stays resumable)."""
        self.stop_requested.set()
        self.join(timeout)

    def result(self) -> ActivationStore:
        """Wait for the extraction and return its store (re-raising its error)."""
        self.join()
        if self.error is not None:
            raise self.error
        assert self.store is not None
        return self.store


def _write(writer: StoreWriter, stream: Iterator[tuple[dict, int]], skipped: int, *, behind: bool) -> int:
    """Write the batches of `stream` into `writer`; returns the number of windows consumed.

    With `behind`, a thread writes each batch while the next one is traced (one batch waits at
    most). On an error or interrupt the batches already handed over are written before it
    propagates, so the store stays consistent with its manifest and resumes after them.
    """
    consumed = 0
    if not behind:
        for batch, consumed in stream:
            writer.add(**batch)
            writer.flush_if_full({"windows_done": skipped + consumed})
        return consumed
    handover: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def work() -> None:
        while (item := handover.get()) is not None:
            if not failure:
                try:
                    writer.add(**item[0])
                    writer.flush_if_full({"windows_done": skipped + item[1]})
                except BaseException as err:  # re-raised in the producer's thread
                    failure.append(err)

    thread = threading.Thread(target=work, name="clt-store-writer", daemon=True)
    thread.start()
    try:
        for batch, consumed in stream:
            if failure:
                break
            handover.put((batch, consumed))
    finally:
        handover.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return consumed


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _dtype(name: str) -> torch.dtype:
    """The dtype activations are extracted in for a store of dtype `name` (int8 is quantised from float32)."""
    check_choice("store_dtype", name, STORE_DTYPES, ValueError)
    return torch.float32 if name == "int8" else FLOAT_DTYPES[name]
