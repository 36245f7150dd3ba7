"""GraphState: what a researcher did on the graph page (pins, supernodes, labels, view), as JSON.

The page (`clt.viz.page`) saves this object to a file and to its URL fragment
(``graph.html#state=<base64url of the JSON>``); `GraphState.read` takes either back, and
`Graph.load_state` checks it against a graph. The format (version 1) is stable:

```
{"format": "clt.graph-state", "version": 1,
 "prompt": "...",                                   # the graph's prompt (informative)
 "pinned": ["feature:3:5:12", "supernode:1", ...],  # node or supernode ids, in pinning order
 "supernodes": [{"id": "supernode:1", "label": "...", "members": ["feature:3:5:12", ...]}],
 "labels": {"feature:3:5:12": "my label"},          # labels edited on the page, by node id
 "view": {"node_threshold": 0.8, "edges_per_node": 2, "link_mode": "both",
          "hide_errors": false, "subgraph_only": false, "selected": "feature:3:5:12"}}
```

Node ids are the project's unambiguous ids (`clt.attribution.graph`): ``feature:{layer}:{pos}:{feature}``,
``error:{layer}:{pos}``, ``token:{pos}``, ``logit:{token_id}``. Supernode ids are ``supernode:{n}``;
members are node ids (no nesting), each node in at most one supernode. A pinned supernode pins its
members (`pinned_nodes`), which is what the page's subgraph scores use (`subgraph_scores`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clt.files import atomic_write_text

if TYPE_CHECKING:
    from clt.attribution.graph import Graph

STATE_FORMAT = "clt.graph-state"
STATE_VERSION = 1
FRAGMENT_KEY = "state="
"""The URL fragment holding a state: ``#state=<base64url of the JSON, no padding>``."""


class GraphStateError(ValueError):
    """A graph-page state is malformed or names nodes its graph does not have."""


@dataclasses.dataclass
class Supernode:
    """Nodes grouped under one label; drawn as one node whose edges are the sums of its members'."""

    id: str
    """``supernode:{n}``."""
    label: str
    members: list[str]
    """Node ids of its members (at least two)."""


@dataclasses.dataclass
class GraphState:
    """Pins, supernodes, edited labels and view settings of a graph page (module docstring)."""

    pinned: list[str] = dataclasses.field(default_factory=list)
    """Pinned node and supernode ids, in pinning order."""
    supernodes: list[Supernode] = dataclasses.field(default_factory=list)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    """Labels edited on the page, by node or supernode id."""
    view: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Threshold, edges per node, link mode, hidden errors, subgraph view, selected node."""
    prompt: str | None = None
    """Prompt of the graph the state was made on (informative)."""

    def __post_init__(self) -> None:
        ids = [s.id for s in self.supernodes]
        if len(set(ids)) != len(ids):
            raise GraphStateError(f"supernode ids must be unique, got {ids}")
        seen: dict[str, str] = {}
        for supernode in self.supernodes:
            if not supernode.id.startswith("supernode:"):
                raise GraphStateError(f"supernode ids look like 'supernode:1', got {supernode.id!r}")
            if len(supernode.members) < 2:
                raise GraphStateError(f"{supernode.id} has {len(supernode.members)} members; a supernode needs two")
            for member in supernode.members:
                if member.startswith("supernode:"):
                    raise GraphStateError(f"{supernode.id} contains {member}: supernodes do not nest")
                if member in seen:
                    raise GraphStateError(f"{member} is in both {seen[member]} and {supernode.id}")
                seen[member] = supernode.id
        unknown = [p for p in self.pinned if p.startswith("supernode:") and p not in ids]
        if unknown:
            raise GraphStateError(f"pinned supernodes {unknown} are not among the supernodes {ids}")

    def supernode(self, supernode_id: str) -> Supernode:
        """The supernode with this id."""
        for supernode in self.supernodes:
            if supernode.id == supernode_id:
                return supernode
        raise KeyError(f"no supernode {supernode_id!r}; the state has {[s.id for s in self.supernodes]}")

    def pinned_nodes(self) -> list[str]:
        """Pinned node ids with pinned supernodes replaced by their members (first occurrence kept)."""
        out: dict[str, None] = {}
        for node in self.pinned:
            for member in self.supernode(node).members if node.startswith("supernode:") else [node]:
                out[member] = None
        return list(out)

    def node_ids(self) -> set[str]:
        """Every node id the state names (pins, supernode members, labels, selection)."""
        ids = {*self.pinned, *self.labels, *(m for s in self.supernodes for m in s.members)}
        if self.view.get("selected"):
            ids.add(str(self.view["selected"]))
        return {i for i in ids if not i.startswith("supernode:")}

    def check(self, graph: Graph) -> GraphState:
        """This state, after checking that every node it names is in `graph` (GraphStateError if not)."""
        missing = []
        for node_id in sorted(self.node_ids()):
            try:
                graph.node_index(node_id)
            except KeyError:
                missing.append(node_id)
        if missing:
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            raise GraphStateError(
                f"the state names {len(missing)} nodes this graph does not have ({shown}); "
                "was it saved from another graph's page?"
            )
        return self

    # ----------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the module docstring."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "prompt": self.prompt,
            "pinned": list(self.pinned),
            "supernodes": [dataclasses.asdict(s) for s in self.supernodes],
            "labels": dict(self.labels),
            "view": dict(self.view),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphState:
        """Inverse of `to_dict`."""
        if not isinstance(data, Mapping) or data.get("format") != STATE_FORMAT:
            raise GraphStateError(f"not a graph-page state (expected format '{STATE_FORMAT}')")
        if data.get("version") != STATE_VERSION:
            raise GraphStateError(f"graph-page state version {data.get('version')} is not supported (this is 1)")
        try:
            supernodes = [
                Supernode(str(s["id"]), str(s["label"]), [str(m) for m in s["members"]]) for s in data["supernodes"]
            ]
            return cls(
                pinned=[str(p) for p in data["pinned"]],
                supernodes=supernodes,
                labels={str(k): str(v) for k, v in data["labels"].items()},
                view=dict(data.get("view") or {}),
                prompt=data.get("prompt"),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise GraphStateError(f"the graph-page state is incomplete ({type(err).__name__}: {err})") from err

    def save(self, path: str | Path) -> Path:
        """Write the state as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(self.to_dict(), indent=1), path)
        return path

    def to_fragment(self) -> str:
        """``state=<base64url>``: the URL fragment the page reads (append it after ``#``)."""
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        return FRAGMENT_KEY + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def from_fragment(cls, text: str) -> GraphState:
        """A state from a page URL, its fragment (``#state=…``) or the base64url text alone."""
        fragment = text.split("#", 1)[1] if "#" in text else text
        if FRAGMENT_KEY in fragment:
            fragment = fragment.split(FRAGMENT_KEY, 1)[1].split("&", 1)[0]
        try:
            raw = base64.urlsafe_b64decode(fragment + "=" * (-len(fragment) % 4))
            return cls.from_dict(json.loads(raw.decode()))
        except (ValueError, UnicodeDecodeError) as err:
            if isinstance(err, GraphStateError):
                raise
            raise GraphStateError(f"the URL fragment does not hold a graph-page state ({err})") from err

    @classmethod
    def read(cls, source: str | Path | Mapping[str, Any]) -> GraphState:
        """A state from a JSON file, a dict, or a page URL / fragment (`from_fragment`)."""
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        text = str(source)
        if isinstance(source, Path) or (FRAGMENT_KEY not in text and Path(text).is_file()):
            path = Path(text)
            if not path.is_file():
                raise FileNotFoundError(f"no state file at {path}")
            try:
                return cls.from_dict(json.loads(path.read_text()))
            except json.JSONDecodeError as err:
                raise GraphStateError(f"{path} is not valid JSON ({err})") from err
        return cls.from_fragment(text)


__all__ = ["FRAGMENT_KEY", "STATE_FORMAT", "STATE_VERSION", "GraphState", "GraphStateError", "Supernode"]
