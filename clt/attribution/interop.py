"""Graphs from and for circuit-tracer: its ``Graph.to_pt`` files, read without pickle's risks.

circuit-tracer (``circuit_tracer/graph.py``, 0.4.1 and 0.5.0) saves ``Graph.to_pt`` as a
``torch.save`` dict with keys ``input_string``, ``adjacency_matrix``, ``cfg``,
``active_features`` [n_active, 3] (layer, pos, feature), ``logit_targets``,
``logit_probabilities``, ``vocab_size``, ``input_tokens``, ``selected_features`` (indices into
``active_features`` of the feature nodes in the adjacency), ``activation_values`` (one per active
feature) and ``scan``; older files have ``logit_tokens`` (a tensor of ids) instead of
``logit_targets`` and no ``vocab_size``. Node order and row/column meaning match this project's.

Two entries are Python objects: ``cfg`` (its ``UnifiedConfig`` dataclass; transformer_lens's
``HookedTransformerConfig`` in older files) and ``logit_targets`` (a list of its ``LogitTarget``
named tuples). ``torch.load(weights_only=True)`` refuses them, so `load_circuit_tracer_graph`
allows exactly those names, rebuilt as inert stand-ins that only hold their fields; anything else
stays refused, with a message on how to re-save the file as plain tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from clt.attribution.adjacency import to_dense
from clt.attribution.graph import Graph, GraphFileError
from clt.config.attribution import AttributionConfig

UNIFIED_CONFIG_FIELDS = (
    "n_layers",
    "d_model",
    "d_head",
    "n_heads",
    "d_mlp",
    "d_vocab",
    "tokenizer_name",
    "model_name",
    "original_architecture",
    "n_key_value_heads",
    "dtype",
)
"""Fields of circuit-tracer's UnifiedConfig (circuit_tracer/utils/tl_nnsight_mapping.py)."""

_HF_FIELDS = {
    "n_layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "d_head": "head_dim",
    "n_heads": "num_attention_heads",
    "d_mlp": "intermediate_size",
    "d_vocab": "vocab_size",
    "n_key_value_heads": "num_key_value_heads",
    "dtype": "torch_dtype",
}
_RESAVE = (
    "re-save it as plain tensors in circuit-tracer's environment (only for a file you "
    "trust): d = torch.load(path, weights_only=False); d['cfg'] = vars(d['cfg']); "
    "d['logit_targets'] = torch.tensor([t.vocab_idx for t in d['logit_targets']]); "
    "torch.save(d, new_path)"
)


class _Fields:
    """Inert stand-in for a pickled config object: holds the fields it was saved with."""


class _LogitTarget(NamedTuple):
    """Stand-in for circuit-tracer's LogitTarget (circuit_tracer/attribution/targets.py)."""

    token_str: str
    vocab_idx: int


_STAND_INS = [
    (_Fields, "circuit_tracer.utils.tl_nnsight_mapping.UnifiedConfig"),
    (_Fields, "transformer_lens.HookedTransformerConfig.HookedTransformerConfig"),
    (_LogitTarget, "circuit_tracer.attribution.targets.LogitTarget"),
]


def load_circuit_tracer_graph(path: str | Path, tokenizer: Any = None) -> Graph:
    """Read a graph saved by circuit-tracer's ``Graph.to_pt`` (or `to_circuit_tracer_dict`).

    Token strings come from ``tokenizer.decode([id])`` when a tokenizer is given, else from the
    file's logit target strings, else the ids themselves. Only the selected feature nodes are kept
    (the count of all active features goes to ``n_active_features``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no circuit-tracer graph file at {path}")
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            data = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise GraphFileError(f"{path} holds objects that safe loading refuses ({err}); {_RESAVE}") from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise GraphFileError(
            f"{path} is not a readable torch.save file ({type(err).__name__}: "
            f"{err}); it may be truncated: save the graph again"
        ) from err
    return from_circuit_tracer_dict(data, tokenizer, source=str(path))


def from_circuit_tracer_dict(data: dict[str, Any], tokenizer: Any = None, *, source: str = "the graph") -> Graph:
    """Build a Graph from circuit-tracer's ``to_pt`` dict (see `load_circuit_tracer_graph`)."""
    if not isinstance(data, dict) or "adjacency_matrix" not in data:
        raise GraphFileError(
            f"{source} is not a circuit-tracer graph (no 'adjacency_matrix'); save it with circuit-tracer's Graph.to_pt"
        )
    try:
        adjacency = _tensor(data, "adjacency_matrix").float()
        active = _tensor(data, "active_features").long().reshape(-1, 3)
        values = _tensor(data, "activation_values").float().flatten()
        selected = _tensor(data, "selected_features").long().flatten()
        probabilities = _tensor(data, "logit_probabilities").float().flatten()
        token_ids = [int(t) for t in _tensor(data, "input_tokens").flatten().tolist()]
        logit_ids, logit_strs = _logit_targets(data)
        cfg = _fields(data.get("cfg"))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise GraphFileError(
            f"{source} is incomplete or corrupt ({type(err).__name__}: {err}); "
            "save the graph again with circuit-tracer's Graph.to_pt"
        ) from err
    n_nodes, n_sel = adjacency.shape[0], len(selected)
    n_pos, n_logits = len(token_ids), len(logit_ids)
    rest = n_nodes - n_sel - n_logits
    n_layers = cfg.get("n_layers")
    if n_layers is None and n_pos and rest % n_pos == 0:
        n_layers = rest // n_pos - 1
    if (
        n_layers is None
        or n_sel + (n_layers + 1) * n_pos + n_logits != n_nodes
        or len(values) != len(active)
        or len(probabilities) != n_logits
        or (n_sel and int(selected.max()) >= len(active))
    ):
        raise GraphFileError(
            f"{source}: sizes do not fit ({n_nodes} nodes, {n_sel} selected of "
            f"{len(active)} active features, {n_pos} tokens, {n_logits} logits, "
            f"n_layers {n_layers}); the file is corrupt or mixes two graphs"
        )
    tokens = _decode(token_ids, tokenizer, [str(t) for t in token_ids])
    logit_tokens = _decode(logit_ids, tokenizer, logit_strs)
    max_feature_nodes = n_sel if n_sel < len(active) else None
    return Graph(
        prompt=str(data.get("input_string", "")),
        token_ids=token_ids,
        tokens=tokens,
        features=active[selected],
        activations=values[selected],
        adjacency=adjacency,
        logit_token_ids=logit_ids,
        logit_tokens=logit_tokens,
        logit_probabilities=probabilities,
        n_layers=int(n_layers),
        config=AttributionConfig(max_n_logits=max(1, n_logits), max_feature_nodes=max_feature_nodes),
        model_name=cfg.get("model_name"),
        n_active_features=len(active),
    )


def to_circuit_tracer_dict(
    graph: Graph, *, model_config: Any = None, scan: str | list[str] | None = None
) -> dict[str, Any]:
    """The dict circuit-tracer's ``Graph.to_pt`` writes, in tensors and plain values only.

    Save it with ``torch.save``; `load_circuit_tracer_graph` reads it back. ``cfg`` is a plain
    dict of UnifiedConfig fields (from ``model_config``, a transformers config or a mapping, where
    given; None where unknown) and ``logit_targets`` a tensor of token ids (the legacy form
    circuit-tracer's ``Graph.from_pt`` converts). For circuit-tracer's ``Graph.from_pt``, first
    turn ``cfg`` into its UnifiedConfig: ``d = torch.load(p, weights_only=True); d['cfg'] =
    UnifiedConfig.from_dict(d['cfg']); torch.save(d, p)``. Only the graph's feature nodes are
    written as active features.
    """
    cfg = _unified_config(graph, model_config)
    n = graph.n_features
    return {
        "input_string": graph.prompt,
        "adjacency_matrix": to_dense(graph.adjacency).detach().cpu().float().contiguous(),
        "cfg": cfg,
        "active_features": graph.features.detach().cpu().long().contiguous(),
        "logit_targets": torch.tensor(graph.logit_token_ids, dtype=torch.long),
        "logit_probabilities": graph.logit_probabilities.detach().cpu().float().contiguous(),
        "vocab_size": cfg["d_vocab"],
        "input_tokens": torch.tensor(graph.token_ids, dtype=torch.long),
        "selected_features": torch.arange(n, dtype=torch.long),
        "activation_values": graph.activations.detach().cpu().float().contiguous(),
        "scan": scan,
    }


def _tensor(data: dict[str, Any], key: str) -> Tensor:
    value = data[key]
    return value.detach().cpu() if isinstance(value, Tensor) else torch.as_tensor(value)


def _logit_targets(data: dict[str, Any]) -> tuple[list[int], list[str]]:
    targets = data["logit_targets"] if "logit_targets" in data else data["logit_tokens"]
    if isinstance(targets, Tensor):
        ids = [int(i) for i in targets.flatten().tolist()]
        return ids, [str(i) for i in ids]
    pairs = [(str(t[0]), int(t[1])) for t in targets]
    return [i for _, i in pairs], [s if s else str(i) for s, i in pairs]


def _fields(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return cfg
    return dict(vars(cfg))


def _decode(ids: list[int], tokenizer: Any, fallback: list[str]) -> list[str]:
    if tokenizer is None:
        return list(fallback)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    return [tokenizer.decode([i]) if vocab is None or i < vocab else s for i, s in zip(ids, fallback)]


def _unified_config(graph: Graph, model_config: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if model_config is not None:
        source = model_config if isinstance(model_config, dict) else model_config.to_dict()
        if "text_config" in source and isinstance(source["text_config"], dict):
            source = {**source, **source["text_config"]}
        for field, hf_name in _HF_FIELDS.items():
            values[field] = source.get(field, source.get(hf_name))
        architectures = source.get("architectures") or [None]
        values["original_architecture"] = source.get("original_architecture", architectures[0])
        values["model_name"] = source.get("model_name", source.get("_name_or_path"))
        if values["d_head"] is None and values["d_model"] and values["n_heads"]:
            values["d_head"] = values["d_model"] // values["n_heads"]
    cfg = {field: values.get(field) for field in UNIFIED_CONFIG_FIELDS}
    cfg["n_layers"] = graph.n_layers
    cfg["model_name"] = cfg["model_name"] or graph.model_name
    cfg["tokenizer_name"] = cfg["tokenizer_name"] or cfg["model_name"]
    if cfg["dtype"] is not None and not isinstance(cfg["dtype"], (str, torch.dtype)):
        cfg["dtype"] = str(cfg["dtype"])
    return cfg


__all__ = ["UNIFIED_CONFIG_FIELDS", "from_circuit_tracer_dict", "load_circuit_tracer_graph", "to_circuit_tracer_dict"]
