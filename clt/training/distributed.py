"""Training across torchrun ranks: data parallel ('data') or feature sharding ('features').

One process per rank (W ranks; the process group and collectives: `clt.training.collectives`).

- data: every rank holds the whole transcoder and reads its 1/W of the rows of every global
  micro-batch (the global stream is the one-process stream). Gradients are averaged with one
  all-reduce of a flat buffer. BatchTopK keeps the k·N largest activations of the *global*
  batch: each rank all-gathers its top candidates and keeps what reaches the global k·N-th
  value. Feature activity (dead features, L0) and logged metrics are global. The auxiliary
  top-k loss divides by each rank's own residual norm (a mean of per-rank ratios), so with dead
  features it differs slightly from one process; every other term is a mean over tokens and
  matches it.
- features: every rank reads the whole batch and holds F/W features of every layer
  (`DistributedTranscoder`, a CrossLayerTranscoder of F/W features): encoder rows, decoder rows,
  thresholds and their AdamW moments. The decoders' partial sums are all-reduced (forward:
  all-reduce; backward: identity, as the reconstruction loss is the same on every rank); b_dec,
  W_skip and the standardisation buffers are replicated (gradients averaged so they stay equal).
  TopK and BatchTopK keep what reaches the global k-th value of the all-gathered per-shard
  candidates. Sparsity and pre-activation terms are per shard (summed in the logs); the global
  gradient norm clips. The auxiliary top-k loss is per shard: each shard's top k_aux dead
  features are trained to reconstruct the whole residual on their own (the logged value is the
  mean over shards), so with dead features it differs from one process. fp16 (GradScaler) is
  refused here: each rank would decide on its own to skip a step.

A rank that fails leaves the others waiting in a collective until `dist_timeout_s` (torchrun
stops them at once); the last checkpoint stays intact, as checkpoints are written atomically.
Selection keeps every entry at or above the global threshold: exact ties at the k-th value
keep a few more than k (one process keeps exactly k). Float32 pre-activations almost never tie;
under bf16/fp16 autocast (8 or 11 significant bits) ties happen and L0 can exceed k slightly.
Checkpoints always hold the whole dictionary (`gather_state` on rank 0), so a run resumes on
any world size (`shard_state`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from clt.config.training import PARALLEL_MODES
from clt.config.transcoder import CLTConfig
from clt.models.activations import ActiveEntries, BatchTopK, entries_at
from clt.models.transcoder import CrossLayerTranscoder
from clt.training.collectives import Dist, DistributedError, all_reduce, comm_device

_SHARD_DIMS = {"W_enc": 1, "b_enc": 1, "log_threshold": 1, "fire_count": 1, "tokens_since_fired": 1}


def split_problems(ctx: Dist, cfg: CLTConfig, micro_batch: int, mixed_precision: str = "no") -> list[str]:
    """What keeps `ctx` from splitting this transcoder or micro-batch (empty when it can)."""
    w = ctx.world_size
    if ctx.sharded and mixed_precision == "fp16":
        # GradScaler decides per rank whether its gradients overflowed; with sharded features one rank
        # could skip a step the others take, and the replicated b_dec/W_skip would drift apart.
        return [
            "parallel='features' does not support mixed_precision='fp16' (each rank's loss scaler "
            "would skip steps on its own); use mixed_precision='bf16' or parallel='data'"
        ]
    if not ctx.sharded:
        if micro_batch % w == 0:
            return []
        return [
            (
                f"the micro-batch of {micro_batch} rows (batch_size / grad_accumulation_steps) is not divisible "
                f"by the world size {w}; make batch_size / grad_accumulation_steps a multiple of {w}"
            )
        ]
    problems = []
    if cfg.num_features % w:
        problems.append(
            f"num_features={cfg.num_features} is not divisible by the world size {w}; use "
            f"{(cfg.num_features // w + 1) * w} features or {w} ranks that divide it"
        )
    if cfg.architecture != "transcoder" or cfg.matryoshka_prefixes:
        problems.append(
            "parallel='features' shards plain transcoders only (not MOLT or Matryoshka); use parallel='data'"
        )
    return problems


class _SumAcrossRanks(torch.autograd.Function):
    """Forward: the sum of every rank's tensor; backward: identity (the loss is replicated)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        return all_reduce(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _kth_largest(values: Tensor, k: int, world_size: int) -> Tensor:
    """k-th largest of each row of a [G, M·W] matrix whose columns are split over the ranks ([G, M] here)."""
    local = values.float().topk(min(k, values.shape[-1]), dim=-1, sorted=False).values.contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts, -1).topk(k, dim=-1, sorted=False).values.min(-1).values


class _GlobalBatchTopK(BatchTopK):
    """BatchTopK whose inference threshold follows the smallest kept activation over all ranks."""

    def _update(self, low: Tensor) -> None:
        low = all_reduce(low.nan_to_num(nan=float("inf")), dist.ReduceOp.MIN)
        super()._update(torch.where(torch.isinf(low), torch.full_like(low, float("nan")), low))


def shard_dim(name: str) -> int | None:
    """Dimension along which feature sharding splits state entry `name` (None: replicated)."""
    if name.startswith("W_dec."):
        return 0
    return _SHARD_DIMS.get(name)


def _shard(t: Tensor, dim: int | None, ctx: Dist) -> Tensor:
    if dim is None or not ctx.sharded or t.ndim == 0:
        return t
    size = t.shape[dim] // ctx.world_size
    return t.narrow(dim, ctx.rank * size, size).clone()


def _gather(t: Tensor, dim: int | None, ctx: Dist, to_all: bool) -> Tensor | None:
    """The whole of a tensor split along `dim` (on rank 0 or, with `to_all`, on every rank)."""
    if dim is None or not ctx.sharded or t.ndim == 0:
        return t
    home, t = t.device, t.to(comm_device() or t.device).contiguous()
    if to_all:
        parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim).to(home)
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)] if ctx.is_main else None
    dist.gather(t, parts, dst=0)
    return torch.cat(parts, dim).to(home) if ctx.is_main else None


def shard_state(state: dict[str, Tensor], ctx: Dist, names: dict[int, str] | None = None) -> dict[str, Tensor]:
    """This rank's part of a whole-dictionary state (model state, or optimizer tensors '{index}.{stat}'
    with `names` mapping parameter index to name)."""
    return {k: _shard(v, shard_dim(_entry(k, names)), ctx) for k, v in state.items()}


def gather_state(
    state: dict[str, Tensor], ctx: Dist, names: dict[int, str] | None = None, *, to_all: bool = False
) -> dict[str, Tensor]:
    """The whole-dictionary state from every rank's part (on rank 0; empty elsewhere unless `to_all`)."""
    whole = {k: _gather(state[k], shard_dim(_entry(k, names)), ctx, to_all) for k in sorted(state)}
    return whole if ctx.is_main or to_all else {}


def _entry(key: str, names: dict[int, str] | None) -> str:
    return key if names is None else names[int(key.split(".", 1)[0])]


def local_config(cfg: CLTConfig, ctx: Dist) -> CLTConfig:
    """The CLTConfig of this rank's part: F/W features when sharded ('auto' sparse decoding resolved for all F)."""
    if not ctx.sharded:
        return cfg
    features = cfg.num_features // ctx.world_size
    sparse = cfg.sparse_decode
    if sparse == "auto" and cfg.activation_fn in ("topk", "batchtopk"):
        sparse = "on" if cfg.topk * 8 <= cfg.num_features else "off"
    return cfg.replace(num_features=features, topk=min(cfg.topk, features), sparse_decode=sparse)


class DistributedTranscoder(CrossLayerTranscoder):
    """A rank's transcoder: all features (data) or F/W of them (features), selecting and summing across ranks."""

    def __init__(self, cfg: CLTConfig, ctx: Dist) -> None:
        super().__init__(local_config(cfg, ctx))
        self.full_cfg, self.ctx = cfg, ctx
        if cfg.activation_fn == "batchtopk":
            self.batchtopk = _GlobalBatchTopK(cfg.num_layers, cfg.topk, cfg.batchtopk_scope, cfg.batchtopk_momentum)

    @classmethod
    def from_full(cls, model: CrossLayerTranscoder, ctx: Dist) -> DistributedTranscoder:
        """This rank's part of a whole transcoder (same device and weights)."""
        if type(model) is not CrossLayerTranscoder:
            raise DistributedError(
                f"distributed training takes a CrossLayerTranscoder, got {type(model).__name__}; "
                "train it in one process"
            )
        part = cls(model.cfg, ctx)
        part.load_state_dict(shard_state(model.state_dict(), ctx))
        return part.to(model.W_enc.device)

    @classmethod
    def build(cls, cfg: CLTConfig, ctx: Dist, model: CrossLayerTranscoder | None = None) -> DistributedTranscoder:
        """This rank's part of `model` or of a new transcoder from `cfg`; with feature sharding only rank 0
        builds the whole new dictionary (on the host) and scatters the parts, so no other rank ever holds it."""
        if model is not None or not ctx.sharded:
            return cls.from_full(model or CrossLayerTranscoder.from_config(cfg), ctx)
        whole = CrossLayerTranscoder.from_config(cfg).state_dict() if ctx.is_main else {}
        part = cls(cfg, ctx)
        state = part.state_dict()
        device = comm_device()
        for name in sorted(state):
            mine = state[name].to(device or state[name].device)
            dim = shard_dim(name)
            if dim is None:
                if ctx.is_main:
                    mine.copy_(whole[name])
                dist.broadcast(mine, src=0)
            else:
                parts = None
                if ctx.is_main:
                    parts = [p.to(mine.device).contiguous() for p in whole[name].chunk(ctx.world_size, dim)]
                dist.scatter(mine, parts, src=0)
            state[name].copy_(mine)
            whole.pop(name, None)
        return part

    def whole(self, *, to_all: bool = False) -> CrossLayerTranscoder | None:
        """The whole transcoder gathered from every rank (on rank 0, or everywhere with `to_all`)."""
        state = gather_state(self.state_dict(), self.ctx, to_all=to_all)
        if not state:
            return None
        model = CrossLayerTranscoder(self.full_cfg)
        model.load_state_dict(state)
        return model.to(self.W_enc.device)

    def parameter_names(self) -> dict[int, str]:
        """Parameter index (optimizer order) → name."""
        return dict(enumerate(name for name, _ in self.named_parameters()))

    # ---------------------------------------------------------------- selection across ranks

    def _global_selection(self) -> bool:
        act = self.full_cfg.activation_fn
        return (act == "batchtopk" and self.batchtopk.training) or (act == "topk" and self.ctx.sharded)

    def _keep(self, z: Tensor) -> Tensor:
        """Entries of z [N, L, F_rank] at or above the global TopK/BatchTopK threshold."""
        a = torch.relu(z.detach()).float()
        n, num_layers, features = a.shape
        c, w = self.full_cfg, self.ctx.world_size
        if c.activation_fn == "topk":
            tau = _kth_largest(a.reshape(n * num_layers, features), min(c.topk, c.num_features), w)
            return a >= tau.view(n, num_layers, 1)
        tokens = n if self.ctx.sharded else n * w
        if c.batchtopk_scope == "layer":
            kk = min(c.topk * tokens, tokens * c.num_features)
            tau = _kth_largest(a.transpose(0, 1).reshape(num_layers, -1), kk, w)
            return a >= tau.view(1, num_layers, 1)
        kk = min(c.topk * tokens * num_layers, tokens * num_layers * c.num_features)
        return a >= _kth_largest(a.reshape(1, -1), kk, w)

    def activate(self, z: Tensor) -> Tensor:
        """The configured nonlinearity, TopK/BatchTopK selected across ranks."""
        if not self._global_selection():
            return super().activate(z)
        a = torch.where(self._keep(z), torch.relu(z), torch.zeros((), dtype=z.dtype, device=z.device))
        if self.full_cfg.activation_fn == "batchtopk":
            self.batchtopk.update_threshold(a)
        return a

    def _select_active(self, z: Tensor) -> ActiveEntries:
        if not self._global_selection():
            return super()._select_active(z)
        keep = self._keep(z) & (z > 0)
        return entries_at(z, *keep.transpose(0, 1).nonzero().unbind(1))

    def _add_bias_and_skip(self, out: Tensor, x_std: Tensor | None, bias: bool = True) -> Tensor:
        if self.ctx.sharded:
            out = _SumAcrossRanks.apply(out)
        return super()._add_bias_and_skip(out, x_std, bias)

    # ---------------------------------------------------------------- gradients

    def _replicated(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.named_parameters() if not self.ctx.sharded or shard_dim(name) is None]

    def sync_gradients(self) -> None:
        """Average the gradients of replicated parameters (all of them in data mode) in one flat all-reduce."""
        params = self._replicated()
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.ctx.world_size
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Clip to the global gradient norm (as torch.nn.utils.clip_grad_norm_ on the whole model); returns it."""
        if not self.ctx.sharded:
            return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        own = shared = self.W_enc.new_zeros((), dtype=torch.float32)
        for name, p in self.named_parameters():
            if p.grad is not None:
                if shard_dim(name) is None:
                    shared = shared + p.grad.float().square().sum()
                else:
                    own = own + p.grad.float().square().sum()
        total = (all_reduce(own) + shared).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total

    # ---------------------------------------------------------------- metrics

    def reduce_metrics(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Global metrics from this rank's: per-shard terms summed (features), others averaged; one all-reduce."""
        names = list(metrics)
        summed = {"sparsity", "preactivation", "l0"} if self.ctx.sharded else set()
        values = torch.stack([torch.as_tensor(metrics[k]).detach().double().to(self.W_enc.device) for k in names])
        dist.all_reduce(values)
        out = {k: v if k in summed else v / self.ctx.world_size for k, v in zip(names, values.unbind())}
        if self.ctx.sharded and "total" in out:
            out["total"] = sum(out[k] for k in ("reconstruction", "sparsity", "preactivation", "auxiliary") if k in out)
        return out


__all__ = [
    "PARALLEL_MODES",
    "DistributedTranscoder",
    "gather_state",
    "local_config",
    "shard_dim",
    "shard_state",
    "split_problems",
]
