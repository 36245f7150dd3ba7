"""Check `export_circuit_tracer` and the graph interop against circuit-tracer itself.

circuit-tracer (decoderesearch/circuit-tracer) pins nnsight 0.6.1 and transformers <= 4.57.3, so
it lives in its own virtualenv: `make interop-venvs` (experiments/circuit_tracer/setup_venv.sh: torch,
then circuit-tracer 0.5.0 from PyPI beside nnsight 0.6.1 and transformers 4.57.3) makes it once.

Then, from the repository root with the project's virtualenv:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/circuit_tracer/check_export.py \
        [--ct-python .venv-interop/circuit_tracer/bin/python] [--out DIR]

Three steps: (1) this venv exports small random transcoders (PLT JumpReLU with skip, CLT ReLU, CLT
JumpReLU, CLT BatchTopK, a PLT covering model layers 0 and 2 of 3, a CLT covering 1 and 3 of 5) and
writes raw inputs, our activations and reconstructions, and a graph as `to_circuit_tracer_dict`; (2)
circuit-tracer (``--check``, run in its venv) loads each folder with ``load_transcoders_from_cache``
(the config.yaml path ``ReplacementModel.from_pretrained`` takes for a local folder), recomputes
activations and reconstructions with ``compute_attribution_components``, loads the graph with
``Graph.from_pt`` and scores and prunes it, and re-saves it with ``Graph.to_pt`` (real
UnifiedConfig/LogitTarget objects); (3) this venv reads that file with `load_circuit_tracer_graph`
and compares. Prints one line per check and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CASES = {  # name: (CLTConfig overrides, transcoder layers, model layers M)
    "plt_jumprelu_skip": ({"cross_layer": False, "activation_fn": "jumprelu", "skip_connection": True}, [0, 1, 2], 3),
    "clt_relu": ({"cross_layer": True, "activation_fn": "relu"}, [0, 1, 2], 3),
    "clt_jumprelu": ({"cross_layer": True, "activation_fn": "jumprelu"}, [0, 1, 2, 3], 4),
    "clt_batchtopk": ({"cross_layer": True, "activation_fn": "batchtopk", "topk": 4}, [0, 1, 2], 3),
    "plt_relu_padded": ({"cross_layer": False, "activation_fn": "relu"}, [0, 2], 3),
    "clt_padded": ({"cross_layer": True, "activation_fn": "jumprelu"}, [1, 3], 5),
}
F, D, N = 32, 24, 20
TOL = 1e-4


# ----------------------------------------------------------------- project side


def _transcoder(overrides: dict, layers: list[int], seed: int):
    from clt.config.transcoder import CLTConfig
    from clt.models.perturb import randomize_parameters
    from clt.models.transcoder import CrossLayerTranscoder

    cfg = CLTConfig(num_features=F, num_layers=len(layers), d_model=D, layers=layers, seed=seed, **overrides)
    return randomize_parameters(CrossLayerTranscoder(cfg), seed)


def _graph():
    from clt.attribution.graph import Graph
    from clt.config.attribution import AttributionConfig

    g = torch.Generator().manual_seed(0)
    n_layers, n_pos, n_features = 3, 5, 12
    feats = torch.stack(
        [
            torch.randint(0, n_layers, (n_features,), generator=g),
            torch.randint(1, n_pos, (n_features,), generator=g),
            torch.randint(0, F, (n_features,), generator=g),
        ],
        1,
    ).unique(dim=0)
    n_feats = len(feats)
    n = n_feats + (n_layers + 1) * n_pos + 3
    adjacency = torch.randn(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.3)
    adjacency[:n_feats, :n_feats] = adjacency[:n_feats, :n_feats].tril(-1)  # acyclic
    adjacency[n_feats:-3] = 0  # error and token rows are empty
    adjacency[:, -3:] = 0  # logits are never sources
    ids = [1, 5, 6, 7, 8]
    return Graph(
        prompt="a b c d e",
        token_ids=ids,
        tokens=[str(i) for i in ids],
        features=feats,
        activations=torch.rand(len(feats), generator=g) + 0.1,
        adjacency=adjacency,
        logit_token_ids=[9, 10, 11],
        logit_tokens=["9", "10", "11"],
        logit_probabilities=torch.tensor([0.6, 0.2, 0.1]),
        n_layers=n_layers,
        config=AttributionConfig(),
        model_name="random",
    )


def write(out: Path) -> dict:
    """Export every case and the graph; return what circuit-tracer should find."""
    from safetensors.torch import save_file

    from clt.attribution.interop import to_circuit_tracer_dict
    from clt.attribution.prune import graph_scores, prune
    from clt.models.export import export_circuit_tracer

    for seed, (name, (overrides, layers, M)) in enumerate(CASES.items()):
        model = _transcoder(overrides, layers, seed)
        export_circuit_tracer(model, out / name, num_model_layers=M, overwrite=True)
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(N, M, D, generator=g) * 2 + 0.5
        with torch.no_grad():
            result = model(x[:, layers])
        acts, recon = torch.zeros(N, M, F), torch.zeros(N, M, D)
        acts[:, layers], recon[:, layers] = result.features, result.reconstruction
        save_file({"x": x, "features": acts, "reconstruction": recon}, str(out / f"{name}.io"))
    graph = _graph()
    torch.save(to_circuit_tracer_dict(graph), out / "graph.pt")
    replacement, completeness = graph_scores(graph)
    pruned = prune(graph)
    return {
        "replacement": replacement,
        "completeness": completeness,
        "node_mask": pruned.node_mask.tolist(),
        "edge_count": int(pruned.edge_mask.sum()),
    }


def read_back(out: Path) -> list[tuple[str, bool, str]]:
    """Read circuit-tracer's own Graph.to_pt file and compare it with the graph we wrote."""
    from clt.attribution.interop import load_circuit_tracer_graph

    graph, back = _graph(), load_circuit_tracer_graph(out / "graph_ct.pt")
    same = (
        torch.equal(graph.adjacency, back.adjacency)
        and torch.equal(graph.features, back.features)
        and torch.equal(graph.activations, back.activations)
        and graph.token_ids == back.token_ids
        and graph.logit_token_ids == back.logit_token_ids
        and torch.equal(graph.logit_probabilities, back.logit_probabilities)
        and graph.n_layers == back.n_layers
    )
    return [
        (
            "graph: Graph.to_pt file -> load_circuit_tracer_graph",
            same,
            f"{back.n_features} features, {back.n_nodes} nodes, logit tokens {back.logit_tokens}",
        )
    ]


# ----------------------------------------------------------------- circuit-tracer side


def check(out: Path) -> list[tuple[str, bool, str]]:
    """Run in circuit-tracer's venv: load, recompute, compare."""
    from circuit_tracer.graph import Graph, compute_graph_scores, prune_graph
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig
    from safetensors.torch import load_file

    results = []
    for name in CASES:
        for lazy in (False, True):
            tc, _ = load_transcoders_from_cache(
                name,
                cache_dir=out,
                device=torch.device("cpu"),
                dtype=torch.float32,
                lazy_encoder=lazy,
                lazy_decoder=lazy,
            )
            io = load_file(str(out / f"{name}.io"))
            x = io["x"].transpose(0, 1).contiguous()  # circuit-tracer: [layers, positions, d]
            with torch.no_grad():
                parts = tc.compute_attribution_components(x, zero_positions=slice(0, 0))
            acts = parts["activation_matrix"].to_dense().transpose(0, 1)
            recon = parts["reconstruction"].transpose(0, 1)
            d_act = float((acts - io["features"]).abs().max())
            d_rec = float((recon - io["reconstruction"]).abs().max())
            kind = "CLT" if isinstance(tc, CrossLayerTranscoder) else "TranscoderSet"
            detail = (
                f"max |Δ activation| {d_act:.2e}, max |Δ reconstruction| {d_rec:.2e}, {int((acts > 0).sum())} active"
            )
            results.append((f"{name} ({kind}, lazy={lazy})", d_act < TOL and d_rec < TOL, detail))
    data = torch.load(out / "graph.pt", weights_only=True)
    data["cfg"] = UnifiedConfig.from_dict(data["cfg"])
    torch.save(data, out / "graph_unified.pt")
    graph = Graph.from_pt(str(out / "graph_unified.pt"))
    expected = json.loads((out / "expected.json").read_text())
    replacement, completeness = compute_graph_scores(graph)
    pruned = prune_graph(graph)
    d_score = max(abs(replacement - expected["replacement"]), abs(completeness - expected["completeness"]))
    same_nodes = pruned.node_mask.tolist() == expected["node_mask"]
    edges = int(pruned.edge_mask.sum())
    detail = f"|Δ score| {d_score:.1e}, node masks equal {same_nodes}, edges {edges} vs {expected['edge_count']}"
    results.append(
        (
            "graph: to_circuit_tracer_dict -> Graph.from_pt, scores and pruning",
            d_score < 1e-5 and same_nodes and edges == expected["edge_count"],
            detail,
        )
    )
    graph.to_pt(str(out / "graph_ct.pt"))
    return results


def _report(results: list[tuple[str, bool, str]]) -> bool:
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return all(ok for _, ok, _ in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", type=Path, help="(internal) run circuit-tracer's side on DIR")
    parser.add_argument(
        "--ct-python",
        default=".venv-interop/circuit_tracer/bin/python",
        help="python of the virtualenv that has circuit-tracer",
    )
    parser.add_argument("--out", type=Path, help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    if args.check is not None:
        results = check(args.check)
        (args.check / "ct_results.json").write_text(json.dumps(results))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "expected.json").write_text(json.dumps(write(out)))
        proc = subprocess.run(
            [args.ct_python, __file__, "--check", str(out)], check=False, text=True, capture_output=True
        )
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            print(f"FAIL  circuit-tracer side exited with {proc.returncode}")
            return 1
        results = [tuple(r) for r in json.loads((out / "ct_results.json").read_text())]
        ok = _report(results + read_back(out))
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
