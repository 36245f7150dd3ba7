"""attribute: the attribution graph of a prompt through the local replacement model.

Algorithm (as circuit-tracer, with the decoder contraction vectorised):

1. One clean forward pass records MLP inputs/outputs; the transcoder gives features and errors.
2. One frozen forward pass of the prompt copied `batch_size` times, with each MLP output a
   gradient leaf (so gradients stop at MLP outputs and never pass through features).
3. Per batch of targets, one backward pass: row b injects its target's input direction (encoder
   row of a feature at its layer and position, or the demeaned unembedding column of a logit at
   the last position) and reads the gradients g_m[b] at every MLP output and g_emb[b] at the
   embeddings.
4. Edge weights: a feature source (l, p, f) gets a · Σ_j W_dec[l→l+j][f] · g_{l+j}[p] (one matmul
   per source layer and position over all active features there and all target layers), an
   error source e_m[p] · g_m[p], an embedding emb[p] · g_emb[p].

Targets are visited logits first, then features (in order, or by estimated influence when
`max_feature_nodes` caps them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from clt.attribution.graph import Graph
from clt.attribution.replacement import PromptState, ReplacementModel
from clt.config.attribution import AttributionConfig
from clt.models.transcoder import CrossLayerTranscoder

logger = logging.getLogger(__name__)


def attribute(
    prompt: str | Sequence[int] | Tensor,
    model: nn.Module | ReplacementModel | str,
    transcoder: CrossLayerTranscoder | None = None,
    *,
    tokenizer: Any = None,
    config: AttributionConfig | None = None,
    progress: bool = True,
    **options: Any,
) -> Graph:
    """Attribution graph of a prompt (text or token ids); options override AttributionConfig fields.

    `model` is a Hugging Face causal LM, a model alias/path (loaded with its tokenizer), or a
    `ReplacementModel` (then `transcoder` may be omitted). Options: max_n_logits,
    desired_logit_prob, batch_size, max_feature_nodes, update_interval, zero_bos, prepend_bos.
    """
    cfg = config if config is not None else AttributionConfig()
    if options:
        cfg = cfg.replace(**options)
    replacement = _replacement_model(model, transcoder, tokenizer)
    state = replacement.prepare(prompt, zero_bos=cfg.zero_bos, prepend_bos=cfg.prepend_bos)
    return _attribute(replacement, state, cfg, prompt if isinstance(prompt, str) else None, progress)


def _replacement_model(model: Any, transcoder: CrossLayerTranscoder | None, tokenizer: Any) -> ReplacementModel:
    if isinstance(model, ReplacementModel):
        if transcoder is not None and transcoder is not model.transcoder:
            raise ValueError("pass either a ReplacementModel or a model and a transcoder, not both")
        if tokenizer is not None:
            model.tokenizer = tokenizer
        return model
    if transcoder is None:
        raise ValueError("attribute needs a transcoder: attribute(prompt, model, transcoder)")
    if isinstance(model, str):
        from clt.nnsight.loading import load_model

        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    return ReplacementModel(model, transcoder, tokenizer)


def _attribute(
    rm: ReplacementModel, state: PromptState, cfg: AttributionConfig, prompt: str | None, progress: bool
) -> Graph:
    n, M = len(state.input_ids), rm.n_layers
    by_layer = state.activations.permute(1, 0, 2)  # [L, n, F]
    active = by_layer.nonzero()  # (layer, pos, feature), sorted
    values = by_layer[active[:, 0], active[:, 1], active[:, 2]]
    K = len(active)

    probs = torch.softmax(state.logits[-1], dim=-1)
    top_p, top_ids = probs.topk(min(cfg.max_n_logits, len(probs)))
    cutoff = min(int(torch.searchsorted(top_p.cumsum(0), cfg.desired_logit_prob)) + 1, len(top_p))
    logit_ids, logit_p = top_ids[:cutoff], top_p[:cutoff]
    unembed = rm.unembedding.detach().float()
    logit_vecs = unembed[logit_ids] - unembed.mean(0)
    n_logits = len(logit_ids)

    n_visit = K if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, K)
    logit_col = K + M * n + n
    n_cols = logit_col + n_logits
    batch = max(1, min(cfg.batch_size, max(n_logits, n_visit)))
    logger.info(
        "attributing %d tokens: %d active features (%d visited), %d logits, batch %d", n, K, n_visit, n_logits, batch
    )

    engine = _RowEngine(rm, state, active, values, batch, n_cols)
    # Every feature visited: rows go straight to their adjacency rows (no second copy). With a
    # feature budget, rows are kept in visiting order and the visited ones gathered at the end.
    direct = n_visit == K
    rows = torch.zeros(n_cols, n_cols) if direct else torch.zeros(n_logits + n_visit, n_cols)
    first_logit_row = logit_col if direct else 0
    row_node = torch.zeros(n_logits + n_visit, dtype=torch.long)
    bar = tqdm(total=n_logits + n_visit, desc="attribution", disable=not progress)

    for lo in range(0, n_logits, batch):
        hi = min(lo + batch, n_logits)
        layers = torch.full((hi - lo,), M)
        positions = torch.full((hi - lo,), n - 1)
        rows[first_logit_row + lo : first_logit_row + hi] = engine.rows(layers, positions, logit_vecs[lo:hi])
        row_node[lo:hi] = torch.arange(logit_col + lo, logit_col + hi)
        bar.update(hi - lo)

    visited = torch.zeros(K, dtype=torch.bool)
    done = n_logits
    model_layer = torch.tensor(rm.layers, dtype=torch.long)[active[:, 0]] if K else active[:, 0]
    while done < n_logits + n_visit:
        if direct:
            queue = torch.arange(K)
        else:
            influence = _partial_influence(rows[:done], row_node[:done], logit_col, logit_p)
            order = influence[:K].argsort(descending=True)
            queue = order[~visited[order]][: min(cfg.update_interval * batch, n_logits + n_visit - done)]
        for lo in range(0, len(queue), batch):
            chunk = queue[lo : lo + batch]
            vecs = engine.encoder_rows(chunk)
            target = chunk if direct else slice(done, done + len(chunk))
            rows[target] = engine.rows(model_layer[chunk], active[chunk, 1], vecs)
            row_node[done : done + len(chunk)] = chunk
            visited[chunk] = True
            done += len(chunk)
            bar.update(len(chunk))
    bar.close()

    selected = visited.nonzero().squeeze(1)
    if direct:
        adjacency = rows
    else:
        keep_cols = torch.cat([selected, torch.arange(K, n_cols)])
        N = len(keep_cols)
        adjacency = torch.zeros(N, N)
        adjacency[: len(selected)] = rows[n_logits:][row_node[n_logits:].argsort()][:, keep_cols]
        adjacency[N - n_logits :] = rows[:n_logits][:, keep_cols]
        del rows

    features = active[selected].clone()
    features[:, 0] = model_layer[selected] if K else features[:, 0]
    ids = state.input_ids.tolist()
    return Graph(
        prompt=prompt if prompt is not None else "".join(rm.token_strings(ids)),
        token_ids=ids,
        tokens=rm.token_strings(ids),
        features=features.cpu(),
        activations=values[selected].float().cpu(),
        adjacency=adjacency,
        logit_token_ids=logit_ids.tolist(),
        logit_tokens=rm.token_strings(logit_ids.tolist()),
        logit_probabilities=logit_p.float().cpu(),
        n_layers=M,
        config=cfg,
        model_name=rm.transcoder.cfg.model_name or getattr(rm.model.config, "_name_or_path", None) or None,
        n_active_features=K,
    )


class _RowEngine:
    """Computes attribution rows (direct effects on a batch of targets) from one frozen trace."""

    def __init__(
        self, rm: ReplacementModel, state: PromptState, active: Tensor, values: Tensor, batch: int, n_cols: int
    ) -> None:
        self.rm, self.state, self.active, self.n_cols = rm, state, active, n_cols
        self.n, self.M, self.K = len(state.input_ids), rm.n_layers, len(active)
        self.trace = rm.attribution_trace(state, batch)
        self.errors = state.errors.permute(1, 0, 2).contiguous()  # [M, n, d]
        self.embeddings = state.embeddings
        # one block per (source layer, position): scaled decoder rows [k, J, d] and their columns
        self.groups_by_pos: dict[int, list[tuple[int, int, int, Tensor]]] = {}
        if self.K:
            keys = active[:, 0] * self.n + active[:, 1]
            starts = torch.cat([torch.tensor([0]), (keys[1:] != keys[:-1]).nonzero().squeeze(1) + 1])
            ends = torch.cat([starts[1:], torch.tensor([self.K])])
            with torch.no_grad():
                for c0, c1 in zip(starts.tolist(), ends.tolist()):
                    layer, pos = int(active[c0, 0]), int(active[c0, 1])
                    dec = rm.raw_decoder(layer, active[c0:c1, 2]) * values[c0:c1, None, None].float()
                    self.groups_by_pos.setdefault(pos, []).append((layer, c0, c1, dec.contiguous()))

    def encoder_rows(self, chunk: Tensor) -> Tensor:
        """Raw encoder rows [k, d] of the active features `chunk` (indices into `active`)."""
        layers, features = self.active[chunk, 0], self.active[chunk, 2]
        out = torch.empty(len(chunk), self.rm.layout.d_model)
        with torch.no_grad():
            for layer in layers.unique().tolist():
                mask = layers == layer
                out[mask] = self.rm.raw_encoder(layer, features[mask]).cpu()
        return out

    def rows(self, layers: Tensor, positions: Tensor, vecs: Tensor) -> Tensor:
        """Rows [b, n_cols] for targets whose input reads `vecs` [b, d] at (model layer, position);
        layer M means the final hidden state (logits)."""
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
        out = torch.zeros(b, self.n_cols)
        with torch.no_grad():
            g_emb = grads[0][:b].float()
            tok = self.K + M * n
            out[:, tok : tok + n] = torch.einsum("bnd,nd->bn", g_emb, self.embeddings).cpu()
            zero = None
            g_mlp = []
            for g in grads[1:]:
                if g is None:
                    zero = torch.zeros_like(g_emb) if zero is None else zero
                g_mlp.append(zero if g is None else g[:b].float())
            for m in range(top):  # error nodes, one layer at a time (no stacked copy of the grads)
                out[:, self.K + m * n : self.K + (m + 1) * n] = torch.einsum(
                    "bnd,nd->bn", g_mlp[m], self.errors[m]
                ).cpu()
            covered = [m for m in self.rm.layers if m < top]
            for pos, groups in self.groups_by_pos.items():  # features: per position, all layers
                g_pos = None
                for layer, c0, c1, dec in groups:
                    j = min(dec.shape[1], len(covered) - layer)
                    if j <= 0:
                        continue
                    if g_pos is None:
                        g_pos = torch.stack([g_mlp[m][:, pos] for m in covered], dim=1)  # [b, L', d]
                    g = g_pos[:, layer : layer + j].reshape(b, j * d)
                    out[:, c0:c1] = (g @ dec[:, :j].reshape(c1 - c0, j * d).T).cpu()
        return out


def _partial_influence(
    rows: Tensor, row_node: Tensor, logit_col: int, logit_p: Tensor, max_iter: int = 10_000
) -> Tensor:
    """Influence of every column node on the logits through the rows computed so far."""
    A = rows.abs()
    A = A / A.sum(1, keepdim=True).clamp_min(1e-10)
    weight = torch.zeros(rows.shape[1])
    weight[logit_col : logit_col + len(logit_p)] = logit_p.float()
    influence = torch.zeros(rows.shape[1])
    for _ in range(max_iter):
        weight = weight[row_node] @ A
        if not weight.any():
            return influence
        influence += weight
    raise RuntimeError("influence did not converge: the graph has a cycle")


__all__ = ["attribute"]
