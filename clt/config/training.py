"""TrainingConfig: optimiser, schedules, loss coefficients, precision and checkpointing."""

from __future__ import annotations

import dataclasses

from clt.config.base import ConfigBase, check

SPARSITY_KINDS = ("tanh", "l1")
PRECISIONS = ("no", "bf16", "fp16")
PARALLEL_MODES = ("data", "features")


@dataclasses.dataclass
class TrainingConfig(ConfigBase):
    """How `CLTTrainer` trains a transcoder on an `ActivationStore`."""

    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    batch_size: int = 64
    """Tokens per optimiser step (split over grad_accumulation_steps micro-batches)."""
    training_steps: int = 50_000
    """Number of optimiser steps."""
    sparsity_lambda: float = 1e-3
    """Final coefficient λ of the sparsity penalty (ramped up linearly from 0)."""
    sparsity_c: float = 1.0
    """c in tanh(c · a · ‖W_dec‖)."""
    sparsity_kind: str = "tanh"
    """Sparsity penalty: 'tanh' (Anthropic) or 'l1' (a · ‖W_dec‖)."""
    sparsity_warmup_steps: int | None = None
    """Steps of the linear λ ramp (default: all training steps)."""
    preactivation_coef: float = 3e-6
    """Coefficient of the pre-activation loss Σ ReLU(θ − z)·‖W_dec‖ (JumpReLU only)."""
    aux_k: int = 256
    """k of the auxiliary top-k loss on dead features (TopK/BatchTopK; capped at num_features)."""
    aux_coef: float = 1 / 32
    """Coefficient of the auxiliary top-k loss."""
    kl_coef: float = 0.0
    """Coefficient of the end-to-end term KL(model ‖ model with the reconstructions spliced into every
    covered MLP) on token windows rebuilt from the store (0: off; needs the language model)."""
    kl_every: int = 1
    """Add the KL term every this many optimiser steps."""
    kl_start: float = 0.0
    """Fraction of training after which the KL term is added (0: from the start; e.g. 0.7: a final
    end-to-end stage over the last 30% of the steps, on a dictionary that already reconstructs)."""
    kl_windows: int = 4
    """Store token windows per KL evaluation."""
    dead_after_tokens: int = 100_000
    """A feature that has not fired in this many training tokens counts as dead."""
    lr_warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    lr_decay_start: float = 0.8
    """Fraction of training after which the learning rate decays linearly to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip_norm: float | None = 1.0
    """Clip the gradient norm to this value (None: no clipping)."""
    grad_accumulation_steps: int = 1
    """Micro-batches per optimiser step."""
    mixed_precision: str = "no"
    """'no', 'bf16' (autocast, CPU or GPU) or 'fp16' (autocast + GradScaler, GPU only)."""
    device: str = "cpu"
    """Device to train on ('cuda' under torchrun: each rank's LOCAL_RANK GPU)."""
    parallel: str = "data"
    """Under torchrun with several ranks: 'data' (each rank takes 1/W of every batch, gradients
    averaged) or 'features' (each rank holds F/W features of every layer; see
    clt.training.distributed). Ignored in a single process."""
    dist_timeout_s: float = 1800.0
    """Seconds a rank waits for the others in a collective before the run fails."""
    retain_freed_memory: bool = True
    """On CPU with glibc: keep freed blocks of up to 1 GiB in the process heap (mallopt) instead
    of unmapping them, so each step does not page-fault its large tensors again (~10% faster
    steps at L=8, F=2048, batch 512 on a 2-core CPU). Process-wide; off: glibc's default."""
    stream: bool = False
    """Train from the live model: its forward fills an in-memory shuffle buffer that batches are drawn
    from (no store is written; tokens per hour are bounded by the forward). Runs are deterministic
    given the seed and resume from checkpoints (clt.training.live)."""
    buffer_tokens: int = 32_768
    """Tokens the shuffle buffer of a live (stream) run holds: its memory is about
    buffer_tokens x layers x d_model x 4 bytes in bfloat16 (2.3 GB for SmolLM2's 30 layers)."""
    seed: int = 0
    """Seed of the batch order."""
    log_every: int = 50
    """Write a metrics line to the JSONL log every this many steps."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    output_dir: str | None = None
    """Folder for checkpoints, the metrics log and the final transcoder (None: keep in memory)."""
    resume: bool = True
    """Resume from the latest checkpoint in output_dir when there is one."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project when wandb is installed."""
    profile_steps: int = 0
    """Profile this many steps with torch.profiler (trace written to output_dir)."""

    def __post_init__(self) -> None:
        check(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(self.training_steps > 0, f"training_steps must be positive, got {self.training_steps}")
        check(self.sparsity_lambda >= 0, f"sparsity_lambda must be >= 0, got {self.sparsity_lambda}")
        check(
            self.sparsity_kind in SPARSITY_KINDS, f"sparsity_kind '{self.sparsity_kind}' is not one of {SPARSITY_KINDS}"
        )
        check(self.grad_accumulation_steps >= 1, "grad_accumulation_steps must be >= 1")
        check(self.buffer_tokens > 0, f"buffer_tokens must be positive, got {self.buffer_tokens}")
        check(
            self.batch_size % self.grad_accumulation_steps == 0,
            f"batch_size {self.batch_size} must be divisible by grad_accumulation_steps {self.grad_accumulation_steps}",
        )
        check(self.parallel in PARALLEL_MODES, f"parallel '{self.parallel}' is not one of {PARALLEL_MODES}")
        check(self.dist_timeout_s > 0, f"dist_timeout_s must be positive, got {self.dist_timeout_s}")
        check(
            self.mixed_precision in PRECISIONS, f"mixed_precision '{self.mixed_precision}' is not one of {PRECISIONS}"
        )
        check(0.0 <= self.lr_decay_start <= 1.0, f"lr_decay_start must be in [0, 1], got {self.lr_decay_start}")
        check(len(self.adam_betas) == 2, f"adam_betas must be two numbers, got {self.adam_betas}")
        check(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        check(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        check(self.kl_every >= 1, f"kl_every must be >= 1, got {self.kl_every}")
        check(0.0 <= self.kl_start < 1.0, f"kl_start must be in [0, 1), got {self.kl_start}")
        check(self.kl_windows >= 1, f"kl_windows must be >= 1, got {self.kl_windows}")
        check(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm must be positive or None")
