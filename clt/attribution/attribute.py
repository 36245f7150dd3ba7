"""attribute: the attribution graph of a prompt through the local replacement model.

Algorithm (as circuit-tracer, with the frozen model applied as linear maps):

1. One clean forward pass records MLP inputs/outputs; the transcoder gives features and errors.
2. Targets are visited in batches: logits first, then features (all of them, or with
   `max_feature_nodes` in order of their estimated influence on the logits through the rows so far,
   re-ranked every `update_interval` batches). Within a round, targets are batched by position, so
   that a batch only works on the positions up to its last target's, and each batch runs from its
   top layer down, a target's row joining at its own layer.
3. A batch's rows come from the gradients of its targets at every MLP output and the embeddings
   (`clt.attribution.rows`): by default the frozen model's linear maps, kept once
   (`clt.attribution.linear`), else one frozen forward of the prompt copied batch-size times.
4. Rows stream into the graph's adjacency: dense for short prompts, sparse CSR when the dense matrix
   would be large. With `max_feature_nodes` the visited rows wait in a `RowStore` (float32 in
   memory, or split between memory and a temporary file: `clt.attribution.rowstore`) until the
   last feature is chosen; the graph keeps only the visited features' columns. A memory plan
   (`clt.attribution.memory`) chooses the batch size, whether attention patterns are kept and
   where the rows wait, and is logged before the work starts; a progress bar shows the ETA.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from clt.attribution.adjacency import csr_from_counts
from clt.attribution.graph import Graph
from clt.attribution.linear import Stopwatch, UnsupportedModelError
from clt.attribution.memory import CHUNK_BYTES, MemoryPlan, plan_memory
from clt.attribution.replacement import PromptState, ReplacementModel
from clt.attribution.rows import AutogradRows, Edges, LinearRows, RowEngine, encoder_rows
from clt.attribution.rowstore import RowStore
from clt.attribution.topk import topk_for_attribution
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
    desired_logit_prob, batch_size, max_feature_nodes, update_interval, zero_bos, prepend_bos,
    max_memory_gb, backward, topk_mode, calibration_tokens. Layers the transcoder does not cover
    keep their MLP outputs as error nodes; a TopK dictionary is frozen or converted (`topk_mode`,
    `clt.attribution.topk`).
    """
    cfg = config if config is not None else AttributionConfig()
    if options:
        cfg = cfg.replace(**options)
    replacement = _replacement_model(model, transcoder, tokenizer)
    chosen = topk_for_attribution(
        replacement.transcoder,
        replacement.model,
        replacement.tokenizer,
        cfg.topk_mode,
        calibration_tokens=cfg.calibration_tokens,
    )
    if chosen is not replacement.transcoder:
        replacement = ReplacementModel(replacement.model, chosen, replacement.tokenizer)
    state = replacement.prepare(prompt, zero_bos=cfg.zero_bos, prepend_bos=cfg.prepend_bos)
    unused = torch.empty(0)  # rows need the errors, embeddings and activations (and outputs: autograd)
    state = dataclasses.replace(state, mlp_inputs=unused, reconstruction=unused, preactivations=unused)
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
    direct = n_visit == K  # every feature visited: rows go straight to the graph
    logit_col = K + M * n + n
    n_cols = logit_col + n_logits
    n_nodes = n_visit + M * n + n + n_logits
    reach = torch.tensor([w.shape[1] for w in rm.transcoder.W_dec])

    def make_plan(linear: bool) -> MemoryPlan:
        plan = plan_memory(
            rm,
            state,
            n_active=K,
            decoder_writes=int(reach[active[:, 0]].sum()) if K else 0,
            n_rows=n_logits + n_visit,
            n_cols=n_cols,
            n_nodes=n_nodes,
            direct=direct,
            linear=linear,
            batch_size=max(1, min(cfg.batch_size, max(n_logits, n_visit))),
            max_memory_gb=cfg.max_memory_gb,
            row_store=cfg.row_store,
        )
        logger.info(
            "attributing %d tokens: %d active features (%d visited), %d logits; %s",
            n,
            K,
            n_visit,
            n_logits,
            plan.describe(),
        )
        return plan

    watch = Stopwatch()
    engine, plan = _engine(rm, state, active, values, make_plan, cfg.backward, watch)
    watch.lap("recording and setup")
    batch = plan.batch_size
    model_layer = torch.tensor(rm.layers, dtype=torch.long)[active[:, 0]] if K else active[:, 0]
    graph = _GraphRows(n_nodes, n_cols, plan.sparse)
    bar = tqdm(total=n_logits + n_visit, desc="attribution", unit="row", disable=not progress)

    def compute(layers: Tensor, positions: Tensor, vecs: Tensor, out: Tensor) -> Tensor:
        watch.lap("rows")
        engine.rows(layers, positions, vecs, out)
        bar.update(len(vecs))
        return out

    logit_rows = [
        compute(
            torch.full((hi - lo,), M), torch.full((hi - lo,), n - 1), logit_vecs[lo:hi], torch.zeros(hi - lo, n_cols)
        )
        for lo, hi in _batches(n_logits, batch)
    ]
    if direct:
        for lo, hi in _batches(n_logits, batch):
            graph.add(torch.arange(logit_col + lo, logit_col + hi), logit_rows.pop(0))
        order = _by_position(torch.arange(K), active, model_layer)
        for lo, hi in _batches(K, batch):
            chunk = _top_layer_first(order[lo:hi], model_layer)
            out = torch.zeros(len(chunk), n_cols)
            graph.add(chunk, compute(model_layer[chunk], active[chunk, 1], encoder_rows(rm, active, chunk), out))
            watch.lap("graph")
        bar.close()
        selected = torch.arange(K)
    else:
        with RowStore(n_logits + n_visit, n_cols, split=plan.split_rows, chunk_bytes=CHUNK_BYTES) as store:
            selected = _visit(rm, cfg, active, model_layer, logit_rows, logit_p, batch, compute, graph, store, watch)
        bar.close()

    adjacency = graph.build()
    watch.lap("graph")
    logger.info("attribution time by part: %s", watch.describe())
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


def _visit(
    rm: ReplacementModel,
    cfg: AttributionConfig,
    active: Tensor,
    model_layer: Tensor,
    logit_rows: list[Tensor],
    logit_p: Tensor,
    batch: int,
    compute: Any,
    graph: _GraphRows,
    store: RowStore,
    watch: Stopwatch,
) -> Tensor:
    """Visit features in order of estimated influence until `store` is full; add the graph's rows;
    the visited features (sorted)."""
    K, n_logits, n_rows, n_cols = len(active), len(logit_p), store.n_rows, store.n_cols
    row_node = torch.zeros(n_rows, dtype=torch.long)
    row_node[:n_logits] = torch.arange(n_cols - n_logits, n_cols)
    sums = torch.zeros(n_rows)
    for out in logit_rows:
        sums[store.done : store.done + len(out)] = out.abs().sum(1)
        store.commit(store.next_rows(len(out)).copy_(out))
    visited = torch.zeros(K, dtype=torch.bool)
    while store.done < n_rows:
        watch.lap("rows")
        done = store.done
        influence = _influence(store, sums[:done], row_node[:done], logit_p, K)
        watch.lap("ranking")
        order = influence.argsort(descending=True)
        queue = order[~visited[order]][: min(cfg.update_interval * batch, n_rows - done)]
        queue = _by_position(queue, active, model_layer)
        for lo, hi in _batches(len(queue), batch):
            chunk, done = _top_layer_first(queue[lo:hi], model_layer), store.done
            out = store.next_rows(len(chunk))
            compute(model_layer[chunk], active[chunk, 1], encoder_rows(rm, active, chunk), out)
            sums[done : done + len(chunk)] = out.abs().sum(1)
            row_node[done : done + len(chunk)] = chunk
            visited[chunk] = True
            store.commit(out)
    watch.lap("rows")
    selected = visited.nonzero().squeeze(1)
    keep_cols = torch.cat([selected, torch.arange(K, n_cols)])
    node_row = torch.cat([torch.arange(graph.n - n_logits, graph.n), torch.searchsorted(selected, row_node[n_logits:])])
    for lo, hi, values in store.exact(keep_cols):  # graph rows: the selected features, then the logits
        graph.add(node_row[lo:hi], values)
    return selected


def _influence(store: RowStore, sums: Tensor, row_node: Tensor, logit_p: Tensor, width: int) -> Tensor:
    """Influence of the first `width` columns on the logits through the stored rows: y·Â with Â the
    row-normalised |rows| and y the logit weights plus the influence on each row's own node (found
    on the small matrix among row nodes), as `prune.influence` on the graph of these rows."""
    scale = sums.clamp_min(1e-10)
    among = store.columns(row_node).abs() / scale[:, None]  # [rows, rows]: edges between row nodes
    x = torch.zeros(len(sums))
    x[: len(logit_p)] = logit_p.float()
    y = x.clone()
    for _ in range(len(sums) + 1):
        x = x @ among
        if not x.any():
            break
        y += x
    else:
        raise RuntimeError("influence did not converge: the graph has a cycle")
    return store.abs_weighted_sum(y / scale, width)


def _engine(
    rm: ReplacementModel,
    state: PromptState,
    active: Tensor,
    values: Tensor,
    make_plan: Callable[[bool], MemoryPlan],
    backward: str,
    watch: Stopwatch,
) -> tuple[RowEngine, MemoryPlan]:
    """The row engine `backward` asks for ('auto': linear unless the model's layers do not allow it)
    and its memory plan."""
    edges = Edges(rm, state, active, values, CHUNK_BYTES)
    if backward != "autograd":
        plan = make_plan(True)
        try:
            rows = LinearRows(rm, state, edges, block_size=plan.block_size, keep=plan.keep_patterns, watch=watch)
            return rows, plan
        except UnsupportedModelError as err:
            if backward == "linear":
                raise
            logger.warning("%s; using the autograd path (the prompt copied batch_size times)", err)
    plan = make_plan(False)
    return AutogradRows(rm, state, edges, batch=plan.batch_size, watch=watch), plan


def _by_position(indices: Tensor, active: Tensor, model_layer: Tensor) -> Tensor:
    """Feature indices ordered by (position, layer), so that a batch spans few positions."""
    key = active[indices, 1] * (int(model_layer.max()) + 1 if len(model_layer) else 1) + model_layer[indices]
    return indices[key.argsort(stable=True)]


def _top_layer_first(chunk: Tensor, model_layer: Tensor) -> Tensor:
    """A batch's features from the top layer down: the linear path skips each row above its layer."""
    return chunk[model_layer[chunk].argsort(descending=True, stable=True)]


def _batches(total: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, total)) for lo in range(0, total, size)]


class _GraphRows:
    """Rows streamed into a graph's adjacency: a dense matrix, or sparse CSR of the nonzero entries."""

    def __init__(self, n: int, n_cols: int, sparse: bool) -> None:
        self.n, self.n_cols, self.sparse = n, n_cols, sparse
        self.dense = None if sparse else torch.zeros(n, n)
        self.parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def add(self, node_rows: Tensor, values: Tensor) -> None:
        """Set the rows `node_rows` [b] to `values` [b, n]."""
        if self.dense is not None:
            self.dense[node_rows] = values
            return
        rows, cols = values.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=len(node_rows))
        self.parts.append((node_rows.clone(), counts, cols.int(), values[rows, cols]))

    def build(self) -> Tensor:
        """The adjacency [n, n]."""
        if self.dense is not None:
            return self.dense
        counts = torch.zeros(self.n, dtype=torch.long)
        for node_rows, part_counts, _, _ in self.parts:
            counts[node_rows] = part_counts
        crow = torch.zeros(self.n + 1, dtype=torch.long)
        crow[1:] = counts.cumsum(0)
        total = int(crow[-1])
        cols, vals = torch.empty(total, dtype=torch.int32), torch.empty(total)
        while self.parts:
            node_rows, part_counts, part_cols, part_vals = self.parts.pop()
            starts = part_counts.cumsum(0) - part_counts  # first entry of each row within the part
            dest = torch.repeat_interleave(crow[node_rows] - starts, part_counts) + torch.arange(len(part_cols))
            cols[dest], vals[dest] = part_cols, part_vals
        return csr_from_counts(counts, cols, vals)
