"""Attribution rows: the direct effects of a batch of targets on every source node.

A target reads a vector at (model layer, position): a feature its encoder row at its layer and
position, a logit its demeaned unembedding column in the final hidden state (layer M) at the last
position. From the gradients g_m at every MLP output and g_emb at the embeddings, its row over the
columns of `attribute` (features, errors, tokens, logits) is

- an error node (m, p): e_m[p] · g_m[p];
- a feature (l, p, f): a · Σ_j W_dec[l→l+j][f]·σ_out · g_{l+j}[p], computed for each target layer
  by a compiled kernel that dots each active feature's decoder row with the batch's gradients at
  its position in place (`clt.models.native.feature_edges`; without it, batched matmuls over
  positions with the decoder rows gathered, padded, from a table of that layer's rows);
- a token embedding p: emb[p] · g_emb[p].

Two engines give the gradients: `LinearRows` (`clt.attribution.linear`: the frozen model's linear
maps, no batch copies) and `AutogradRows` (the prompt copied batch-size times through the frozen
model, autograd; any architecture).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from clt.attribution.linear import LinearReplacement, Stopwatch
from clt.attribution.replacement import PromptState, ReplacementModel
from clt.models import native


class RowEngine(Protocol):
    """Writes the rows of a batch of targets into `out` [b, n_cols] (zeros on entry)."""

    def rows(self, layers: Tensor, positions: Tensor, vecs: Tensor, out: Tensor) -> None: ...


class _Writes:
    """The active features whose decoders write to one target layer, ordered by position."""

    def __init__(self, features: Tensor, positions: Tensor, rows: Tensor, activations: Tensor, table: Tensor, n: int):
        order = positions.argsort(stable=True)
        self.cols, self.positions = features[order].int(), positions[order].int()
        self.rows, self.activations, self.table = rows[order].int(), activations[order], table
        self.ptr = torch.zeros(n + 1, dtype=torch.long)
        self.ptr[1:] = torch.bincount(self.positions, minlength=n).cumsum(0)
        self.widest = int(self.ptr.diff().max())


class Edges:
    """Rows from gradients (module docstring): errors, features and tokens of one prompt."""

    def __init__(self, rm: ReplacementModel, state: PromptState, active: Tensor, values: Tensor, chunk_bytes: int):
        self.n, self.M, self.K = len(state.input_ids), rm.n_layers, len(active)
        self.errors = state.errors.permute(1, 0, 2).contiguous()  # [M, n, d]
        self.embeddings = state.embeddings
        self.chunk_bytes = chunk_bytes
        self.writes: dict[int, _Writes] = {}
        tc = rm.transcoder
        if not self.K:
            return
        n_features = tc.cfg.num_features
        reach = torch.tensor([w.shape[1] for w in tc.W_dec])  # target layers of each source layer
        pairs, which = torch.unique(active[:, 0] * n_features + active[:, 2], return_inverse=True)
        source, feature = pairs // n_features, pairs % n_features  # the distinct active features
        with torch.no_grad():
            for t, m in enumerate(rm.layers):
                used = (source <= t) & (t - source < reach[source])  # distinct features writing to t
                if not used.any():
                    continue
                rows = [tc.W_dec[l][feature[used & (source == l)], t - l] for l in source[used].unique().tolist()]
                table = torch.cat(rows).float() * tc.output_std[t].float()  # [distinct, d], in `pairs` order
                k = used[which].nonzero().squeeze(1)
                local = used.long().cumsum(0) - 1
                self.writes[m] = _Writes(k, active[k, 1], local[which[k]], values[k].float(), table, self.n)

    def layer(self, m: int, g: Tensor, out: Tensor) -> None:
        """Error and feature columns of the gradient g [b, n', d] at MLP output m."""
        n1, col = g.shape[1], self.K + m * self.n
        out[:, col : col + n1] = torch.einsum("bnd,nd->bn", g, self.errors[m, :n1])
        writes = self.writes.get(m)
        e1 = 0 if writes is None else int(writes.ptr[n1])  # the writes at the first n1 positions
        if e1 == 0:
            return
        entries = (writes.positions[:e1], writes.rows[:e1], writes.cols[:e1], writes.activations[:e1])
        if native.feature_edges(out, g, writes.table, *entries):
            return
        step = max(1, self.chunk_bytes // (writes.widest * g.shape[2] * 4))
        g_pos = g.transpose(0, 1)  # [n', b, d]
        for p0 in range(0, n1, step):
            p1 = min(p0 + step, n1)
            e0, e1 = int(writes.ptr[p0]), int(writes.ptr[p1])
            if e0 == e1:
                continue
            pos = writes.positions[e0:e1]
            slot = torch.arange(e0, e1) - writes.ptr[pos]
            padded = torch.zeros(p1 - p0, int(slot.max()) + 1, dtype=torch.long)
            padded[pos - p0, slot] = writes.rows[e0:e1].long()
            y = torch.bmm(g_pos[p0:p1], writes.table[padded].transpose(1, 2))  # [p, b, widest]
            out.index_add_(1, writes.cols[e0:e1], y[pos - p0, :, slot].T * writes.activations[e0:e1])

    def tokens(self, g_emb: Tensor, out: Tensor) -> None:
        """Token columns of the gradient at the embeddings [b, n', d]."""
        n1, col = g_emb.shape[1], self.K + self.M * self.n
        out[:, col : col + n1] = torch.einsum("bnd,nd->bn", g_emb, self.embeddings[:n1])


class LinearRows:
    """Rows from the frozen model's linear maps (`LinearReplacement`)."""

    def __init__(
        self, rm: ReplacementModel, state: PromptState, edges: Edges, *, block_size: int, keep: bool, watch: Stopwatch
    ):
        self.edges = edges
        self.linear = LinearReplacement(rm, state, block_size=block_size, keep_patterns=keep, watch=watch)

    def rows(self, layers: Tensor, positions: Tensor, vecs: Tensor, out: Tensor) -> None:
        """Rows of a batch of targets (`RowEngine`)."""
        with torch.no_grad():
            g_emb = self.linear.backward(layers, positions, vecs, lambda m, g: self.edges.layer(m, g, out[: len(g)]))
            self.edges.tokens(g_emb, out)
            self.linear.watch.lap("edges")


class AutogradRows:
    """Rows from one frozen forward pass of the prompt copied `batch` times, one backward per batch."""

    def __init__(self, rm: ReplacementModel, state: PromptState, edges: Edges, *, batch: int, watch: Stopwatch):
        self.edges, self.M, self.watch = edges, rm.n_layers, watch
        self.trace = rm.attribution_trace(state, batch)

    def rows(self, layers: Tensor, positions: Tensor, vecs: Tensor, out: Tensor) -> None:
        """Rows of a batch of targets (`RowEngine`)."""
        b, trace, M = len(vecs), self.trace, self.M
        batch, n, d = trace.embeddings.shape
        outputs, grad_outputs = [], []
        for layer in layers.unique().tolist():
            sel = (layers == layer).nonzero().squeeze(1)
            grad = torch.zeros(batch, n, d, dtype=trace.embeddings.dtype, device=trace.embeddings.device)
            grad[sel, positions[sel]] = vecs[sel].to(grad)
            outputs.append(trace.final if layer == M else trace.mlp_inputs[layer])
            grad_outputs.append(grad)
        top = int(layers.max())
        grads = torch.autograd.grad(
            outputs, [trace.embeddings, *trace.mlp_outputs[:top]], grad_outputs, retain_graph=True, allow_unused=True
        )
        self.watch.lap("autograd backward")
        with torch.no_grad():
            g_emb = grads[0][:b].float()
            for m, g in enumerate(grads[1:]):
                self.edges.layer(m, torch.zeros_like(g_emb) if g is None else g[:b].float(), out)
            self.edges.tokens(g_emb, out)
        self.watch.lap("edges")


def encoder_rows(rm: ReplacementModel, active: Tensor, chunk: Tensor) -> Tensor:
    """Raw encoder rows [k, d] of the active features `chunk` (indices into `active`)."""
    layers, features = active[chunk, 0], active[chunk, 2]
    out = torch.empty(len(chunk), rm.layout.d_model)
    with torch.no_grad():
        for layer in layers.unique().tolist():
            mask = layers == layer
            out[mask] = rm.raw_encoder(layer, features[mask]).cpu()
    return out


__all__ = ["AutogradRows", "Edges", "LinearRows", "RowEngine", "encoder_rows"]
