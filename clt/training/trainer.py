"""CLTTrainer: AdamW on standardised activations from an ActivationStore, resumable exactly.

Per optimiser step: learning rate (linear warm-up, constant, linear decay) and sparsity λ (linear
ramp) are set from the step number; `grad_accumulation_steps` micro-batches are drawn from the
store's deterministic stream at position ``step · accumulation``; losses from
`clt.training.losses.compute_losses`; gradients clipped; AdamW steps. Everything a resumed run
needs (weights, optimiser moments, feature-activity counters, RNG) is in the checkpoint, so a run
resumed at step N reproduces the uninterrupted run bit for bit on CPU.

Under torchrun with several ranks (`TrainingConfig.parallel`, see `clt.training.distributed`)
`self.model` is this rank's `DistributedTranscoder`; `train()` returns the whole transcoder on
every rank, and only rank 0 writes the log, progress bar, checkpoints and final transcoder.
Metrics stay tensors until a log step (or a callback) needs them, so an accelerator is synced
once per log step; NaN/inf batches are then reported at the next log step or checkpoint (at
once on the CPU). On CUDA, batches travel from pinned memory without blocking, in the store's
precision (float16/bfloat16 stores) until they are standardised in float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.models.transcoder import CrossLayerTranscoder
from clt.store import FLOAT_DTYPES, ActivationBatch, ActivationStore
from clt.training import collectives, distributed
from clt.training.activity import FeatureActivity
from clt.training.checkpoint import (
    CheckpointMismatchError,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    save_checkpoint,
)
from clt.training.distributed import DistributedTranscoder
from clt.training.losses import compute_losses, fvu, sparsity_lambda_at

logger = logging.getLogger(__name__)
StepCallback = Callable[[int, dict[str, float]], None]


class CLTTrainer:
    """Trains a CrossLayerTranscoder on an ActivationStore (see the module docstring)."""

    def __init__(
        self,
        clt_config: CLTConfig,
        training_config: TrainingConfig,
        activation_store: ActivationStore,
        *,
        model: CrossLayerTranscoder | None = None,
        callbacks: list[StepCallback] | None = None,
        language_model: tuple[Any, Any] | None = None,
    ) -> None:
        store = activation_store
        c = training_config
        self.dist = collectives.init_distributed(c.parallel, c.device, c.dist_timeout_s)
        if self.dist is not None:
            collectives.check_agreement(
                self.dist,
                {
                    "transcoder": clt_config.to_dict(),
                    "training": c.to_dict(),
                    "store_tokens": store.n_tokens,
                    "store_layers": store.layers,
                },
                distributed.split_problems(
                    self.dist, clt_config, c.batch_size // c.grad_accumulation_steps, c.mixed_precision
                ),
            )
        if clt_config.num_layers != store.num_layers or clt_config.d_model != store.d_model:
            raise ValueError(
                f"the transcoder expects {clt_config.num_layers} layers of width {clt_config.d_model} but the store "
                f"holds {store.num_layers} layers of width {store.d_model}; set num_layers={store.num_layers}, "
                f"d_model={store.d_model}"
            )
        if clt_config.layers != list(range(clt_config.num_layers)) and clt_config.layers != store.layers:
            raise ValueError(f"CLTConfig.layers {clt_config.layers} differ from the store's layers {store.layers}")
        if training_config.mixed_precision == "fp16" and not training_config.device.startswith("cuda"):
            raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'bf16' on CPU")
        self.clt_config = clt_config.replace(
            layers=store.layers,
            model_name=clt_config.model_name or store.model_name,
            output_site=getattr(store, "output_site", clt_config.output_site),
        )
        self.cfg, self.store, self.callbacks = training_config, store, callbacks or []
        self.device = torch.device(collectives.local_device(c.device) if self.dist else c.device)
        if training_config.retain_freed_memory and self.device.type == "cpu":
            _retain_freed_memory()
        self.output_dir = Path(training_config.output_dir) if training_config.output_dir else None
        if self.dist is None:
            self.model = model or CrossLayerTranscoder.from_config(self.clt_config)
        else:  # sharded on the host before it moves: no device (and one host process) holds the whole dictionary
            self.model = DistributedTranscoder.build(self.clt_config, self.dist, model)
        self.model = self.model.to(self.device)
        stats = store.norm_stats()
        self.model.set_normalization(stats.input_mean, stats.input_std, stats.output_mean, stats.output_std)
        params = list(self.model.parameters())
        # one fused kernel per step instead of ~10 passes over every parameter (CPU and CUDA)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(
            params, lr=c.learning_rate, betas=tuple(c.adam_betas), weight_decay=c.weight_decay, fused=fused or None
        )
        self.scaler = torch.amp.GradScaler("cuda") if c.mixed_precision == "fp16" else None
        self.activity = FeatureActivity(self.clt_config.num_layers, self.model.cfg.num_features, self.device)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.kl = _kl_objective(training_config, language_model, store, self.model)
        if self.output_dir is not None and c.resume:
            checkpoints = list_checkpoints(self.output_dir / "checkpoints")
            latest = checkpoints[-1] if checkpoints else None
            if self.dist is not None:
                latest = collectives.broadcast_path(latest, self.dist.world_size)
            if latest is not None:
                self.load_checkpoint(latest)

    # schedules -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Learning rate at `step`: linear warm-up, constant, then linear decay to 0."""
        c = self.cfg
        scale = min(1.0, (step + 1) / c.lr_warmup_steps) if c.lr_warmup_steps else 1.0
        decay_start = int(c.lr_decay_start * c.training_steps)
        if step >= decay_start and c.training_steps > decay_start:
            scale *= max(0.0, (c.training_steps - step) / (c.training_steps - decay_start))
        return c.learning_rate * scale

    def sparsity_lambda_at(self, step: int) -> float:
        """Sparsity coefficient at `step`."""
        warmup = (
            self.cfg.sparsity_warmup_steps if self.cfg.sparsity_warmup_steps is not None else self.cfg.training_steps
        )
        return sparsity_lambda_at(step, self.cfg.sparsity_lambda, warmup)

    # training ------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _profiler(self) -> contextlib.AbstractContextManager:
        if not self.cfg.profile_steps:
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        return profile(activities=activities, record_shapes=True)

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, progress and checkpoints (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main

    def train_step(self, batches: Any) -> dict[str, float]:
        """One optimiser step over `grad_accumulation_steps` micro-batches; returns its metrics."""
        return _floats(self._step(batches))

    def _step(self, batches: Any) -> dict[str, Any]:
        """`train_step` with the metrics left as tensors: converting them syncs with the device."""
        c, model = self.cfg, self.model
        lr, lam = self.lr_at(self.step), self.sparsity_lambda_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Any] = {}
        k_aux = min(c.aux_k, self.clt_config.num_features)
        accumulation = c.grad_accumulation_steps
        data_parallel = self.dist is not None and not self.dist.sharded
        for _ in range(accumulation):
            batch = next(batches)
            self._check_batch(batch)
            x, y = model.normalize_inputs(batch.inputs), model.normalize_outputs(batch.outputs)
            dead = self.activity.dead_mask(c.dead_after_tokens)
            with self._autocast():
                terms, out = compute_losses(
                    model,
                    x,
                    y,
                    sparsity_coef=lam,
                    sparsity_c=c.sparsity_c,
                    sparsity_kind=c.sparsity_kind,
                    preactivation_coef=c.preactivation_coef,
                    dead_mask=dead,
                    k_aux=k_aux,
                    aux_coef=c.aux_coef,
                    dense_features=False,
                )
            loss = terms.total / accumulation
            self._check_loss(loss)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            reduce = collectives.all_reduce_sum if data_parallel else None
            fired = self.activity.update(out.features, reduce, counts=out.fire_counts)
            tokens = out.reconstruction[..., 0, 0].numel() * (self.dist.world_size if data_parallel else 1)
            for name, value in terms.tensors().items():
                _accumulate(sums, name, value.detach().double() / accumulation)
            _accumulate(sums, "fvu", self._fvu(out.reconstruction.float(), y) / accumulation)
            _accumulate(sums, "l0", fired.double() / tokens / accumulation)
        if self.kl is not None and self.step >= c.kl_start * c.training_steps and self.step % c.kl_every == 0:
            sums["kl"] = self.kl.step(model, self.step, c.kl_coef, self.scaler)
        if self.dist is not None:
            model.sync_gradients()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if c.grad_clip_norm:
            clip = (
                model.clip_grad_norm
                if self.dist is not None
                else functools.partial(torch.nn.utils.clip_grad_norm_, model.parameters())
            )
            sums["grad_norm"] = clip(c.grad_clip_norm).detach().double()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        sums["dead_fraction"] = self.activity.dead_mask(c.dead_after_tokens).float().mean().double()
        if self.dist is not None:
            sums = model.reduce_metrics(sums)
            self._nonfinite |= ~torch.isfinite(sums["total"])  # a NaN on any rank reaches every rank's flag
        dead_fraction = sums.pop("dead_fraction")
        sums.update(step=self.step, lr=lr, sparsity_lambda=lam, dead_fraction=dead_fraction)
        return sums

    def _fvu(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.dist is not None and not self.dist.sharded:
            return collectives.global_fvu(reconstruction, target)
        return fvu(reconstruction, target, per_layer=False).double()

    def _check_batch(self, batch: ActivationBatch) -> None:
        """Raise on NaN/inf at once on the CPU; on an accelerator note it and raise at the next log step."""
        if self.device.type == "cpu":
            _check_batch_finite(batch, self.step + 1, self.clt_config.layers or list(range(self.clt_config.num_layers)))
        else:
            self._nonfinite |= ~(torch.isfinite(batch.inputs).all() & torch.isfinite(batch.outputs).all())

    def _check_loss(self, loss: torch.Tensor) -> None:
        if self.device.type != "cpu":
            self._nonfinite |= ~torch.isfinite(loss.detach())
        elif not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {float(loss)} at step {self.step}; lower learning_rate, enable grad_clip_norm, "
                "or check the store for outliers (the last checkpoint is intact)"
            )

    def _raise_if_nonfinite(self) -> None:
        if bool(self._nonfinite):
            raise FloatingPointError(
                f"a batch or the loss held NaN/inf before step {self.step}: the store is corrupt or training "
                "diverged (lower learning_rate, enable grad_clip_norm, re-extract the store); the last checkpoint "
                "is intact"
            )

    def train(self, *, progress: bool = True) -> CrossLayerTranscoder:
        """Train to `training_steps` (resuming if a checkpoint was loaded); returns the transcoder."""
        c = self.cfg
        micro = c.batch_size // c.grad_accumulation_steps
        batches = self._batches(micro)
        self._log = self._open_log() if self.is_main else None
        self._wandb_run = self._wandb() if self.is_main else None
        self._clock = (time.perf_counter(), self.step)
        bar = tqdm(
            total=c.training_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not progress or not self.is_main,
        )
        try:
            if c.profile_steps:
                with self._profiler() as profiler:
                    self._run(batches, min(self.step + c.profile_steps, c.training_steps), bar)
                if self.is_main:
                    self._write_profile(profiler)
            self._run(batches, c.training_steps, bar)
        finally:
            bar.close()
            if self._log is not None:
                self._log.close()
        self._raise_if_nonfinite()
        if self.output_dir is not None:
            self.save_checkpoint()
        model = self.model.whole(to_all=True) if isinstance(self.model, DistributedTranscoder) else self.model
        if self.output_dir is not None and self.is_main:
            model.save_pretrained(self.output_dir / "transcoder")
            self.clt_config.save(self.output_dir / "clt_config.yaml")
            self.cfg.save(self.output_dir / "training_config.yaml")
        return model

    def _batches(self, micro: int) -> Iterator[ActivationBatch]:
        """This rank's micro-batches from the store's stream (its rows of each one in data parallel); on
        CUDA they travel in the store's precision (standardised in float32 on the device)."""
        c = self.cfg
        split = {}
        if self.dist is not None and not self.dist.sharded:
            split = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        dtype = FLOAT_DTYPES.get(self.store.dtype, torch.float32) if self.device.type == "cuda" else torch.float32
        return self.store.batches(
            micro, seed=c.seed, start=self.step * c.grad_accumulation_steps, device=self.device, dtype=dtype, **split
        )

    def _run(self, batches: Any, until: int, bar: Any) -> None:
        c = self.cfg
        while self.step < until:
            metrics = self._step(batches)
            bar.update(1)
            log = self.step % c.log_every == 0 or self.step == c.training_steps
            if log or self.callbacks:
                self._raise_if_nonfinite()
                metrics = _floats(metrics)
            if log:
                self._record(metrics)
                bar.set_postfix(loss=f"{metrics['total']:.4g}", fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}")
            for callback in self.callbacks:
                callback(self.step, metrics)
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < c.training_steps:
                self.save_checkpoint()

    def _record(self, metrics: dict[str, float]) -> None:
        started, first_step = self._clock
        metrics["tokens_per_s"] = (self.step - first_step) * self.cfg.batch_size / (time.perf_counter() - started)
        self.history.append(metrics)
        if self._log is not None:
            self._log.write(json.dumps(metrics) + "\n")
            self._log.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=self.step)

    # checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint of the current step into output_dir/checkpoints (whole dictionary,
        written by rank 0 whatever the world size)."""
        if self.output_dir is None:
            raise ValueError("set TrainingConfig.output_dir to save checkpoints")
        self._raise_if_nonfinite()
        directory = self.output_dir / "checkpoints"
        model, activity = self.model, self.activity.state()
        opt_tensors, groups = optimizer_tensors(self.optimizer)
        if isinstance(model, DistributedTranscoder):
            opt_tensors = distributed.gather_state(opt_tensors, self.dist, model.parameter_names())
            activity = distributed.gather_state(activity, self.dist)
            model = model.whole()
        if not self.is_main:
            collectives.barrier()
            return directory / f"step_{self.step:08d}"
        tensors = {**{f"activity.{k}": v for k, v in activity.items()}, "rng": torch.get_rng_state()}
        state = {"history": self.history, "training_config": self.cfg.to_dict(), **_source_identity(self.store)}
        path = save_checkpoint(directory, self.step, model, (opt_tensors, groups), tensors, state)
        if self.dist is not None:
            collectives.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from a checkpoint folder written by `save_checkpoint`."""
        model, opt_tensors, tensors, state = load_checkpoint(Path(path))
        if model.cfg.to_dict() != self.clt_config.to_dict():
            raise CheckpointMismatchError(
                f"checkpoint {path} holds a transcoder with config {model.cfg.to_dict()}, this run asks for "
                f"{self.clt_config.to_dict()}; use a new output_dir or the checkpoint's config"
            )
        identity = _source_identity(self.store)
        recorded = {key: state.get(key) for key in identity}
        if recorded != identity:
            raise CheckpointMismatchError(
                f"checkpoint {path} was trained on {recorded}, this run reads {identity}; resume with the same "
                "store (or live stream settings) or start in a new output_dir"
            )
        weights = model.state_dict()
        activity = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("activity.")}
        if isinstance(self.model, DistributedTranscoder):
            weights = distributed.shard_state(weights, self.dist)
            opt_tensors = distributed.shard_state(opt_tensors, self.dist, self.model.parameter_names())
            activity = distributed.shard_state(activity, self.dist)
        self.model.load_state_dict(weights)
        load_optimizer_tensors(self.optimizer, opt_tensors, state["param_groups"])
        self.activity.load_state(activity)
        torch.set_rng_state(tensors["rng"])
        self.step, self.history = state["step"], state.get("history", [])
        logger.info("resumed from %s at step %d", path, self.step)

    # logging -------------------------------------------------------------------------------

    def _open_log(self):
        if self.output_dir is None:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        kept = (
            [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            if path.exists()
            else []
        )
        path.write_text("".join(line + "\n" for line in kept))
        return path.open("a")

    def _wandb(self):
        if not self.cfg.wandb_project:
            return None
        try:
            import wandb
        except ImportError:
            logger.warning("wandb_project is set but wandb is not installed; logging to metrics.jsonl only")
            return None
        return wandb.init(project=self.cfg.wandb_project, config={**self.clt_config.to_dict(), **self.cfg.to_dict()})

    def _write_profile(self, profiler: Any) -> None:
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        if self.output_dir is not None:
            (self.output_dir / "profile.txt").write_text(table)
            profiler.export_chrome_trace(str(self.output_dir / "profile_trace.json"))
        logger.info("profile of %d steps:\n%s", self.cfg.profile_steps, table)


def _kl_objective(
    cfg: TrainingConfig, language_model: tuple[Any, Any] | None, store: ActivationStore, model: CrossLayerTranscoder
) -> Any:
    """The end-to-end KL term (`clt.training.e2e`) when kl_coef > 0."""
    if not cfg.kl_coef:
        return None
    if language_model is None:
        raise ValueError(
            "kl_coef > 0 needs the language model: pass CLTTrainer(..., language_model=(model, "
            "tokenizer)), or set kl_coef=0"
        )
    if isinstance(model, DistributedTranscoder):
        raise ValueError(
            "kl_coef > 0 is not supported under torchrun with several ranks yet; train with the "
            "KL term in one process, or set kl_coef=0"
        )
    from clt.training.e2e import KLObjective

    return KLObjective(*language_model, store, model, windows_per_step=cfg.kl_windows, seed=cfg.seed)


def _source_identity(store: Any) -> dict[str, Any]:
    """What a checkpoint records of its data: a store's token count, or a live stream's settings."""
    if hasattr(store, "identity"):
        return {"source": store.identity()}
    return {"store_tokens": store.n_tokens}


def _accumulate(sums: dict[str, Any], name: str, value: torch.Tensor) -> None:
    sums[name] = sums[name] + value if name in sums else value


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as Python numbers (one device sync)."""
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


def _retain_freed_memory() -> None:
    """glibc: serve blocks up to 1 GiB from the heap and keep up to 1 GiB free there (mallopt)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _check_batch_finite(batch: Any, step: int, layers: list[int]) -> None:
    """Raise, naming the layer and step, if a batch holds NaN or inf (before it reaches the model)."""
    for name, values in (("inputs", batch.inputs), ("outputs", batch.outputs)):
        total = values.sum(dtype=torch.promote_types(values.dtype, torch.float32))
        if bool(torch.isfinite(total)):  # NaN/inf anywhere makes the sum non-finite
            continue
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            layer = int((~finite).flatten(0, -3).any(0).any(-1).nonzero()[0])
            raise FloatingPointError(
                f"the batch of step {step} holds NaN/inf MLP {name} at layer {layers[layer]}: the store is "
                "corrupt (re-extract it, or the shard holding it); the last checkpoint is intact"
            )
