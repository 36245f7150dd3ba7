"""Size and opening time of the graph page for long prompts, on synthetic graphs shaped like real ones.

A synthetic graph has SmolLM2's 30 layers, `--tokens` positions and `--features` feature nodes spread
over (layer, position); every node reads from every node of an earlier layer at the same or an
earlier position with probability `--density` (the causal cone a real attribution graph fills),
weights drawn from a normal law. The page is built with the default limits and opened in headless
Chromium (Playwright); the script prints one JSON line per graph: nodes, page features, matrix
entries, page size in MB, seconds to build it, to open it and to score a pinned subgraph.

    python experiments/graph_page_size.py --tokens 64 --features 6000
    python experiments/graph_page_size.py --tokens 256 --features 2048
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from clt.attribution import Graph
from clt.config.attribution import AttributionConfig
from clt.viz import graph_html


def synthetic_graph(n_tokens: int, n_layers: int, n_features: int, density: float, seed: int = 0) -> Graph:
    """A graph with the node layout and causal sparsity of an attribution graph (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    layers = torch.randint(0, n_layers, (n_features,), generator=gen)
    positions = torch.randint(1, n_tokens, (n_features,), generator=gen)
    order = (layers * n_tokens + positions).argsort()
    layers, positions = layers[order], positions[order]
    features = torch.stack([layers, positions, torch.randint(0, 64, (n_features,), generator=gen)], 1)
    n_logits = 10
    error_layer = torch.arange(n_layers).repeat_interleave(n_tokens)
    error_pos = torch.arange(n_tokens).repeat(n_layers)
    # per node: the layer it reads at (targets) / writes from (sources), and its position
    node_layer = torch.cat([layers, error_layer, torch.full((n_tokens,), -1), torch.full((n_logits,), n_layers)])
    node_pos = torch.cat([positions, error_pos, torch.arange(n_tokens), torch.full((n_logits,), n_tokens - 1)])
    n = len(node_layer)
    is_target = torch.zeros(n, dtype=torch.bool)
    is_target[:n_features] = True
    is_target[n - n_logits :] = True
    adjacency = torch.zeros(n, n)
    for rows in torch.arange(n).split(1024):
        cone = (node_layer[None, : n - n_logits] < node_layer[rows, None]) & (
            node_pos[None, : n - n_logits] <= node_pos[rows, None]
        )
        cone &= is_target[rows, None] & (torch.rand(cone.shape, generator=gen) < density)
        weights = torch.randn(cone.shape, generator=gen) * 0.1
        adjacency[rows, : n - n_logits] = torch.where(cone, weights, torch.zeros(()))
    probabilities = torch.softmax(torch.randn(n_logits, generator=gen), 0)
    return Graph(
        prompt=" ".join(f"t{i}" for i in range(n_tokens)),
        token_ids=list(range(n_tokens)),
        tokens=[f" t{i}" for i in range(n_tokens)],
        features=features,
        activations=torch.rand(n_features, generator=gen) + 0.1,
        adjacency=adjacency,
        logit_token_ids=list(range(1000, 1000 + n_logits)),
        logit_tokens=[f" x{i}" for i in range(n_logits)],
        logit_probabilities=probabilities.sort(descending=True).values,
        n_layers=n_layers,
        config=AttributionConfig(),
    )


def measure(graph: Graph, folder: Path) -> dict[str, float]:
    """Page size, build time, and the time Chromium takes to open it and to score three pinned nodes."""
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    page_html = graph_html(graph)
    built = time.perf_counter() - start
    path = folder / "page.html"
    path.write_text(page_html)
    data = page_html.split('id="clt-data">', 1)[1].split("</script>", 1)[0]
    payload = json.loads(data)
    entries = sum(
        len(b["values"]["data"]) * 3 // 4 // (8 if name == "errors" else 4) for name, b in payload["blocks"].items()
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        start = time.perf_counter()
        page.goto(path.as_uri(), timeout=300_000)
        page.wait_for_function("window.cltApp !== undefined", timeout=300_000)
        opened = time.perf_counter() - start
        start = time.perf_counter()
        page.evaluate(
            """() => { const N = cltApp.D.nodes;
            N.id.filter((id, i) => N.kind[i] === 'f').slice(0, 3).forEach(id => cltApp.togglePin(id)); }"""
        )
        scored = time.perf_counter() - start
        browser.close()
    return {
        "page_features": payload["nodes"]["kind"].count("f"),
        "matrix_entries": entries,
        "page_mb": round(len(page_html.encode()) / 2**20, 2),
        "build_s": round(built, 2),
        "open_s": round(opened, 2),
        "pin_three_s": round(scored, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--features", type=int, default=6000)
    parser.add_argument("--density", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    graph = synthetic_graph(args.tokens, args.layers, args.features, args.density)
    with tempfile.TemporaryDirectory() as folder:
        result = measure(graph, Path(folder))
    print(json.dumps({"tokens": args.tokens, "layers": args.layers, "nodes": graph.n_nodes, **result}))


if __name__ == "__main__":
    main()
