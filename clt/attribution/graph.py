"""Graph: an attribution graph (nodes, adjacency, prompt, logits) and its JSON files.

Node order (as circuit-tracer): features sorted by (layer, pos, feature); error nodes
(layer, pos) in layer-major order, one per model layer and position; token embeddings (pos);
logit nodes (likeliest token first). ``adjacency[target, source]`` is the direct effect of the
source node on the target node's input (rows are targets, columns sources); rows of errors and
embeddings are zero, and logits are never sources. The adjacency is a dense tensor, or for long
prompts a sparse CSR tensor of the nonzero edges (`clt.attribution.adjacency`; pruning, scores and
exports accept both, and `to_dense` gives the dense matrix).

Node ids (unambiguous, the project's own): ``feature:{layer}:{pos}:{feature}``,
``error:{layer}:{pos}``, ``token:{pos}``, ``logit:{token_id}``. Layers are model layers.
The Neuronpedia export maps them to the frontend's scheme (`clt.attribution.neuronpedia`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from clt.attribution.adjacency import csr_matrix, entries, is_sparse, mask_entries, sparse_csr
from clt.config.attribution import AttributionConfig
from clt.files import atomic_write_text

if TYPE_CHECKING:
    import networkx as nx
    import pandas as pd

    from clt.attribution.state import GraphState

logger = logging.getLogger(__name__)

FORMAT = "clt.attribution.Graph"
VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)  # 1 wrote every tensor dense; 3 added sparse (CSR) adjacencies


class GraphFileError(ValueError):
    """A graph file is corrupt, truncated or not a graph written by `Graph.save`."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One node of a graph."""

    index: int
    """Row/column in the adjacency matrix."""
    kind: str
    """'feature', 'error', 'token' or 'logit'."""
    layer: int | None
    """Model layer (features, errors); None for tokens and logits."""
    pos: int
    """Token position (the last position for logits)."""
    feature: int | None
    """Feature index within its layer (features only)."""
    token: str
    """The token at `pos` (for logits: the predicted token)."""
    token_id: int
    """Id of `token`."""
    activation: float | None
    """Feature activation, or the logit's probability; None for errors and tokens."""

    @property
    def id(self) -> str:
        """Unambiguous node id (module docstring)."""
        if self.kind == "feature":
            return f"feature:{self.layer}:{self.pos}:{self.feature}"
        if self.kind == "error":
            return f"error:{self.layer}:{self.pos}"
        if self.kind == "token":
            return f"token:{self.pos}"
        return f"logit:{self.token_id}"


@dataclasses.dataclass
class Graph:
    """An attribution graph; node order and the meaning of rows and columns: module docstring."""

    prompt: str
    """The prompt text (decoded tokens when attributed from ids)."""
    token_ids: list[int]
    """Prompt token ids (BOS included when prepended)."""
    tokens: list[str]
    """Decoded text of each prompt token."""
    features: Tensor
    """Feature nodes [n_features, 3] (model layer, pos, feature index), long."""
    activations: Tensor
    """Activation of each feature node [n_features]."""
    adjacency: Tensor
    """Direct effects [n_nodes, n_nodes], rows targets, columns sources (dense, or sparse CSR)."""
    logit_token_ids: list[int]
    """Token id of each logit node, likeliest first."""
    logit_tokens: list[str]
    """Decoded text of each logit node's token."""
    logit_probabilities: Tensor
    """Probability of each logit node's token at the last position [n_logits]."""
    n_layers: int
    """Model layers (one error node per layer and position)."""
    config: AttributionConfig
    """Settings the graph was built with."""
    model_name: str | None = None
    """Model the graph was computed on, when known."""
    n_active_features: int | None = None
    """Active features before `max_feature_nodes` selection."""

    def __post_init__(self) -> None:
        if self.adjacency.layout == torch.sparse_coo:
            self.adjacency = csr_matrix(*entries(self.adjacency), int(self.adjacency.shape[0]))
        expected = self.n_features + self.n_errors + self.n_tokens + self.n_logits
        if tuple(self.adjacency.shape) != (expected, expected):
            raise ValueError(
                f"adjacency has shape {list(self.adjacency.shape)} but the nodes need "
                f"[{expected}, {expected}] ({self.n_features} features, {self.n_errors}"
                f" errors, {self.n_tokens} tokens, {self.n_logits} logits)"
            )

    # ----------------------------------------------------------------- layout

    @property
    def is_sparse(self) -> bool:
        """Whether the adjacency is a sparse (CSR) tensor."""
        return is_sparse(self.adjacency)

    @property
    def n_tokens(self) -> int:
        """Prompt positions n."""
        return len(self.token_ids)

    @property
    def n_features(self) -> int:
        """Feature nodes."""
        return int(self.features.shape[0])

    @property
    def n_errors(self) -> int:
        """Error nodes (n_layers × n_tokens)."""
        return self.n_layers * self.n_tokens

    @property
    def n_logits(self) -> int:
        """Logit nodes."""
        return len(self.logit_token_ids)

    @property
    def n_nodes(self) -> int:
        """All nodes."""
        return self.n_features + self.n_errors + self.n_tokens + self.n_logits

    @property
    def feature_slice(self) -> slice:
        """Rows/columns of feature nodes."""
        return slice(0, self.n_features)

    @property
    def error_slice(self) -> slice:
        """Rows/columns of error nodes (index = start + layer · n_tokens + pos)."""
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def token_slice(self) -> slice:
        """Rows/columns of token-embedding nodes."""
        start = self.n_features + self.n_errors
        return slice(start, start + self.n_tokens)

    @property
    def logit_slice(self) -> slice:
        """Rows/columns of logit nodes."""
        return slice(self.n_nodes - self.n_logits, self.n_nodes)

    def logit_weights(self) -> Tensor:
        """Vector [n_nodes]: the logit probabilities at logit nodes, 0 elsewhere."""
        weights = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        weights[self.logit_slice] = self.logit_probabilities.to(weights.dtype)
        return weights

    def node(self, index: int) -> Node:
        """The node at row/column `index`."""
        if not 0 <= index < self.n_nodes:
            raise IndexError(f"node index {index} is out of range [0, {self.n_nodes})")
        last = self.n_tokens - 1
        if index < self.n_features:
            layer, pos, feature = (int(v) for v in self.features[index])
            return Node(
                index,
                "feature",
                layer,
                pos,
                feature,
                self.tokens[pos],
                self.token_ids[pos],
                float(self.activations[index]),
            )
        if index < self.token_slice.start:
            layer, pos = divmod(index - self.n_features, self.n_tokens)
            return Node(index, "error", layer, pos, None, self.tokens[pos], self.token_ids[pos], None)
        if index < self.logit_slice.start:
            pos = index - self.token_slice.start
            return Node(index, "token", None, pos, None, self.tokens[pos], self.token_ids[pos], None)
        k = index - self.logit_slice.start
        return Node(
            index,
            "logit",
            None,
            last,
            None,
            self.logit_tokens[k],
            self.logit_token_ids[k],
            float(self.logit_probabilities[k]),
        )

    @property
    def nodes(self) -> list[Node]:
        """All nodes in adjacency order."""
        return [self.node(i) for i in range(self.n_nodes)]

    def node_index(self, node_id: str) -> int:
        """Row/column of the node with id `node_id` (see the module docstring for ids)."""
        kind, *parts = node_id.split(":")
        try:
            numbers = [int(p) for p in parts]
            if kind == "feature":
                matches = ((self.features == torch.tensor(numbers)).all(1)).nonzero()
                if len(matches):
                    return int(matches[0, 0])
            elif kind == "error" and 0 <= numbers[1] < self.n_tokens and 0 <= numbers[0] < self.n_layers:
                return self.error_slice.start + numbers[0] * self.n_tokens + numbers[1]
            elif kind == "token" and 0 <= numbers[0] < self.n_tokens:
                return self.token_slice.start + numbers[0]
            elif kind == "logit" and numbers[0] in self.logit_token_ids:
                return self.logit_slice.start + self.logit_token_ids.index(numbers[0])
        except (ValueError, IndexError):
            pass
        raise KeyError(f"no node '{node_id}' in this graph")

    # ----------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; tensors as base64 little-endian bytes with dtype and shape (exact)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            **{name: _plain(getattr(self, name)) for name in _FIELDS},
            "config": self.config.to_dict(),
            "tensors": {name: _encode(getattr(self, name)) for name in _TENSORS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Graph:
        """Inverse of `to_dict`."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise GraphFileError(f"not a graph file (expected format '{FORMAT}'); write graphs with Graph.save")
        if data.get("version") not in _READABLE_VERSIONS:
            raise GraphFileError(
                f"graph file version {data.get('version')} is not supported (this is version {VERSION})"
            )
        try:
            tensors = {name: _decode(data["tensors"][name]) for name in _TENSORS}
            fields = {name: data[name] for name in _FIELDS}
            return cls(**fields, config=AttributionConfig.from_dict(data["config"]), **tensors)
        except (KeyError, TypeError, ValueError) as err:
            raise GraphFileError(
                f"the graph file is incomplete or corrupt ({type(err).__name__}: {err}); write it again with Graph.save"
            ) from err

    def save(self, path: str | Path) -> Path:
        """Write the graph as one JSON file (atomic; pickle-free; exact round trip with `load`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(self.to_dict()), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Read a graph written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no graph file at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise GraphFileError(f"{path} is not valid JSON ({err}); it may be truncated") from err
        return cls.from_dict(data)

    def load_state(self, source: str | Path | dict[str, Any]) -> GraphState:
        """The graph page's saved state (a JSON file, a page URL or its ``#state=`` fragment, or a
        dict), checked against this graph's node ids (`clt.attribution.state`)."""
        from clt.attribution.state import GraphState

        return GraphState.read(source).check(self)

    def to_neuronpedia_json(self, path: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
        """Pruned graph in the Neuronpedia frontend's JSON schema (`clt.attribution.neuronpedia`)."""
        from clt.attribution.neuronpedia import to_neuronpedia_json

        return to_neuronpedia_json(self, path, **kwargs)

    # ----------------------------------------------------------------- exports

    def nodes_df(self, node_mask: Tensor | None = None) -> pd.DataFrame:
        """Nodes as a DataFrame indexed by node index: id, kind, layer, pos, feature, token,
        token_id, activation, influence; only the nodes in `node_mask` when given."""
        import pandas as pd

        records = self._node_records(node_mask)
        frame = pd.DataFrame.from_records(records, columns=["index", "id", *_NODE_ATTRIBUTES, "influence"])
        frame = frame.set_index("index")
        return frame.astype({"layer": "Int64", "feature": "Int64", "activation": "Float64"})

    def edges_df(
        self, threshold: float = 0.0, node_mask: Tensor | None = None, edge_mask: Tensor | None = None
    ) -> pd.DataFrame:
        """Edges with |weight| > `threshold` as a DataFrame: source_id, target_id, source, target
        (node indices), weight = adjacency[target, source]; restricted to the masks when given."""
        import pandas as pd

        targets, sources, weights = self._edge_list(threshold, node_mask, edge_mask)
        ids = [self.node(i).id for i in range(self.n_nodes)]
        return pd.DataFrame(
            {
                "source_id": [ids[s] for s in sources],
                "target_id": [ids[t] for t in targets],
                "source": pd.Series(sources, dtype="int64"),
                "target": pd.Series(targets, dtype="int64"),
                "weight": pd.Series(weights, dtype="float64"),
            }
        )

    def to_networkx(self, node_mask: Tensor | None = None, edge_mask: Tensor | None = None) -> nx.DiGraph:
        """A networkx DiGraph keyed by node id (attributes as `nodes_df`, plus index), with one
        edge source → target per nonzero weight (`weight` = adjacency[target, source])."""
        import networkx as nx

        graph = nx.DiGraph(
            prompt=self.prompt, tokens=list(self.tokens), model_name=self.model_name, n_layers=self.n_layers
        )
        ids: dict[int, str] = {}
        for record in self._node_records(node_mask):
            ids[record["index"]] = node_id = record.pop("id")
            graph.add_node(node_id, **record)
        targets, sources, weights = self._edge_list(0.0, node_mask, edge_mask)
        graph.add_weighted_edges_from((ids[s], ids[t], w) for t, s, w in zip(targets, sources, weights))
        return graph

    def _node_records(self, node_mask: Tensor | None) -> list[dict[str, Any]]:
        """index, id, the `_NODE_ATTRIBUTES` and influence of each node (those in `node_mask`)."""
        influence = self._influence()
        records = []
        for index in self._kept_indices(node_mask):
            node = self.node(index)
            attributes = {name: getattr(node, name) for name in _NODE_ATTRIBUTES}
            records.append({"index": index, "id": node.id, **attributes, "influence": influence[index]})
        return records

    def _influence(self) -> list[float]:
        from clt.attribution.prune import node_influence

        return node_influence(self.adjacency, self.logit_weights()).tolist()

    def _kept_indices(self, node_mask: Tensor | None) -> list[int]:
        if node_mask is None:
            return list(range(self.n_nodes))
        self._check_mask(node_mask, (self.n_nodes,), "node_mask")
        return node_mask.nonzero().squeeze(1).tolist()

    def _edge_list(
        self, threshold: float, node_mask: Tensor | None, edge_mask: Tensor | None
    ) -> tuple[list[int], list[int], list[float]]:
        """(targets, sources, weights) of edges with |weight| > threshold inside the masks."""
        targets, sources, values = entries(self.adjacency)
        keep = values.abs() > threshold
        if edge_mask is not None:
            self._check_mask(edge_mask, (self.n_nodes, self.n_nodes), "edge_mask")
            if is_sparse(edge_mask):
                kept_t, kept_s = mask_entries(edge_mask)
                keep &= torch.isin(targets * self.n_nodes + sources, kept_t * self.n_nodes + kept_s)
            else:
                keep &= edge_mask[targets, sources]
        if node_mask is not None:
            self._check_mask(node_mask, (self.n_nodes,), "node_mask")
            keep &= node_mask[targets] & node_mask[sources]
        return targets[keep].tolist(), sources[keep].tolist(), values[keep].double().tolist()

    def _check_mask(self, mask: Tensor, shape: tuple[int, ...], name: str) -> None:
        if tuple(mask.shape) != shape or mask.dtype != torch.bool:
            raise ValueError(
                f"{name} must be a bool tensor of shape {list(shape)} (as from "
                f"prune(graph)) but has shape {list(mask.shape)} and dtype "
                f"{mask.dtype}"
            )


_TENSORS = ("features", "activations", "adjacency", "logit_probabilities")
_FIELDS = (
    "prompt",
    "token_ids",
    "tokens",
    "logit_token_ids",
    "logit_tokens",
    "n_layers",
    "model_name",
    "n_active_features",
)
_NODE_ATTRIBUTES = ("kind", "layer", "pos", "feature", "token", "token_id", "activation")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _encode(t: Tensor) -> dict[str, Any]:
    """`_encode_dense`, or for a sparse CSR matrix its shape and index/value arrays."""
    if not is_sparse(t):
        return _encode_dense(t)
    index = torch.int32 if t.values().numel() < 2**31 - 1 and max(t.shape) < 2**31 - 1 else torch.int64
    parts = (t.crow_indices().to(index), t.col_indices().to(index), t.values())
    return {
        "layout": "sparse_csr",
        "shape": list(t.shape),
        **{name: _encode_dense(part) for name, part in zip(_CSR_PARTS, parts)},
    }


def _decode(spec: dict[str, Any]) -> Tensor:
    """Inverse of `_encode`."""
    if spec.get("layout") != "sparse_csr":
        return _decode_dense(spec)
    crow, col, values = (_decode_dense(spec[name]) for name in _CSR_PARTS)
    n_rows, n_cols = spec["shape"]
    if (
        len(crow) != n_rows + 1
        or int(crow[0]) != 0
        or bool((crow.diff() < 0).any())
        or int(crow[-1]) != len(col)
        or len(col) != len(values)
        or (len(col) and (int(col.min()) < 0 or int(col.max()) >= n_cols))
    ):
        raise ValueError(f"the sparse {[n_rows, n_cols]} adjacency's index arrays do not fit together")
    return sparse_csr(crow, col, values, (n_rows, n_cols))


_CSR_PARTS = ("crow_indices", "col_indices", "values")


def _encode_dense(t: Tensor) -> dict[str, Any]:
    """dtype, shape and base64 little-endian bytes; a mostly-zero tensor as a bit mask of its
    nonzero entries plus their values in row-major order (an attribution graph's adjacency is
    ~75 % zeros, so this makes the file ~3.5x smaller)."""
    array = t.detach().cpu().contiguous().numpy()
    spec: dict[str, Any] = {"dtype": str(array.dtype), "shape": list(array.shape)}
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    nonzero = little != 0
    if (
        array.size
        and array.dtype.kind in "fiu"
        and nonzero.sum() * array.itemsize + array.size / 8 < 0.75 * array.nbytes
    ):
        spec["nonzero_mask"] = base64.b64encode(np.packbits(nonzero.reshape(-1)).tobytes()).decode("ascii")
        little = little[nonzero]
    spec["data"] = base64.b64encode(little.tobytes()).decode("ascii")
    return spec


def _decode_dense(spec: dict[str, Any]) -> Tensor:
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    values = np.frombuffer(base64.b64decode(spec["data"], validate=True), dtype=dtype)
    shape = tuple(spec["shape"])
    if "nonzero_mask" in spec:
        size = int(np.prod(shape))
        bits = np.frombuffer(base64.b64decode(spec["nonzero_mask"], validate=True), dtype=np.uint8)
        mask = np.unpackbits(bits, count=size).astype(bool) if bits.size * 8 >= size else None
        if mask is None or int(mask.sum()) != values.size:
            raise ValueError(f"the nonzero mask of a {list(shape)} tensor does not match its {values.size} values")
        dense = np.zeros(size, dtype=dtype)
        dense[mask] = values
        values = dense
    array = values.reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


__all__ = ["Graph", "GraphFileError", "Node"]
