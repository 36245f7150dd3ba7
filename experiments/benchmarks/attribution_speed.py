"""Time and measure `clt.attribution.attribute` against circuit-tracer's `attribute`, same run.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/attribution_speed.py \
        [--model smollm2-135m|tiny-llama] [--kinds plt,clt] [--prompt TEXT] \
        [--num-features 256] [--active-per-token 4] [--batch-size 64] [--repeats 1] \
        [--work-dir /tmp/clt-bench] [--ct-python /work/ct-venv/bin/python]

For one prompt and each transcoder kind (PLT: per-layer, CLT: cross-layer) it builds a random
JumpReLU transcoder over every model layer, standardised with the model's own MLP statistics on
the default corpus, with per-layer thresholds set so that about ``--active-per-token`` features
fire per layer and token (a few hundred to a few thousand active features per prompt). Then, each
in a fresh subprocess (so that peak memory is per run), ``--repeats`` times:

(a) ours: `clt.attribution.attribute` with default settings (AttributionConfig; ``--batch-size``
    etc. change them for both sides);
(b) the baseline: circuit-tracer's ``attribute`` (``ReplacementModel.from_pretrained(<model
    folder>, <transcoder folder>, backend="nnsight")`` in the virtualenv of ``--ct-python``) with
    the same max_n_logits, desired_logit_prob, batch_size and max_feature_nodes. The model is the
    same weights saved once as a transformers folder under ``<work-dir>/models`` (SmolLM2 comes
    de-quantised from its GGUF file; the folder's config is made readable by transformers 4.57:
    architectures, rope_theta, torch_dtype), and the transcoder is written with
    `export_circuit_tracer`. Both sides get the same token ids (BOS first): circuit-tracer zeroes
    features and errors at position 0, which is our ``zero_bos=True`` (the default) for a BOS
    token. Without ``--ct-python`` (the path does not exist) the baseline is our own `attribute`
    with batch_size=1 (one target per backward pass), and the output says so.

Reported per setting: the wall time of the ``attribute`` call (min over repeats; model and
transcoder loading excluded and reported separately in the JSON), peak resident memory during the
call (the process's VmHWM, reset with /proc/self/clear_refs just before the call, so it includes
the loaded model and transcoder, whose weights are read once beforehand so that memory-mapped
files are resident, but not the loading peaks) and its increase over the resident memory just
before the call (+MiB: the attribution's own working set), the ratios baseline/ours, and, when
circuit-tracer ran, graph agreement: same active feature set and logit targets, max |adjacency
difference| / max |adjacency| over the aligned node order (features, errors, tokens, logits), and
both graphs' replacement and completeness scores (ours: `graph_scores`; circuit-tracer:
``compute_graph_scores``). Everything also goes to ``<work-dir>/attribution_speed.json``.

Duration on a 2-core CPU (defaults: SmolLM2-135M, all 30 layers, the 15-token prompt below, 256
features per layer, ~2300 active features, PLT and CLT, one repeat): about 2.5 minutes with 2
threads, 3 minutes with OMP_NUM_THREADS=1, plus ~45 s once for the preparation (GGUF
de-quantisation, saving the model folder, building the transcoders; cached in ``--work-dir``);
each further repeat adds about 2 minutes (circuit-tracer's CLT run is most of it). ``--model
tiny-llama``: about 30 s. Timings on this shared machine vary by up to ~50 % between runs, hence
``--repeats`` (minimum time taken).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEFAULT_CT_PYTHON = "/work/ct-venv/bin/python"
CALIBRATION_TOKENS = 512
"""Tokens of the default corpus used for the transcoders' statistics and thresholds."""
MiB = 1024 * 1024
CHILD_SCRIPT = Path(__file__).resolve().with_name("attribution_child.py")
"""Runs each measured call in a fresh process (ours, or circuit-tracer's in its virtualenv)."""


# ===================================================================== preparation (our venv)


def save_model_folder(model, tokenizer, folder: Path) -> None:
    """Save a (possibly GGUF-de-quantised) causal LM as a folder transformers 4.57 and 5 load."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and rope.get("rope_type", "default") == "default":
        config["rope_theta"] = rope["rope_theta"]  # transformers 4.57 reads rope_theta
    config["torch_dtype"] = config["dtype"] = "float32"
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():  # transformers 5's class name is unknown to 4.57
        data = json.loads(tok_config.read_text())
        if data.get("tokenizer_class") not in (None, "PreTrainedTokenizerFast"):
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_config.write_text(json.dumps(data, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def prepare_model(name: str, work_dir: Path, prompt_ids: list[int] | None = None):
    """(model, tokenizer, folder): the model loaded from its saved folder (created once)."""
    import torch

    from clt.nnsight.loading import load_model

    folder = work_dir / "models" / name
    if not (folder / "config.json").is_file():
        print(f"saving {name} as a transformers folder in {folder} (once)", flush=True)
        model, tokenizer = load_model(name)
        save_model_folder(model, tokenizer, folder)
        reloaded, _ = load_model(str(folder))
        ids = torch.tensor([[int(tokenizer.bos_token_id or 0), 5, 6, 7, 8]])
        with torch.no_grad():
            diff = float((model(ids).logits - reloaded(ids).logits).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"the saved folder {folder} gives other logits (max |Δ| {diff})")
        del model, reloaded
    model, tokenizer = load_model(str(folder))
    return model, tokenizer, folder


def build_transcoder(model, tokenizer, kind: str, num_features: int, active_per_token: float, seed: int):
    """A random JumpReLU PLT/CLT over all model layers, standardised with the model's statistics
    on the default corpus, thresholds giving ~active_per_token features per layer and token."""
    import torch

    from clt.attribution import ReplacementModel
    from clt.config.transcoder import CLTConfig
    from clt.data.corpus import default_corpus, encode_prompt
    from clt.models.transcoder import CrossLayerTranscoder
    from clt.nnsight.loading import find_layout

    layout = find_layout(model)
    L, d, F = layout.num_layers, layout.d_model, num_features
    cfg = CLTConfig(
        num_features=F,
        num_layers=L,
        d_model=d,
        activation_fn="jumprelu",
        cross_layer=kind == "clt",
        skip_connection=False,
        seed=seed,
    )
    tc = CrossLayerTranscoder(cfg)
    text = "\n".join(default_corpus()[:20])
    rm = ReplacementModel(model, tc, tokenizer)
    window = min(CALIBRATION_TOKENS, rm.context_length or CALIBRATION_TOKENS)
    bos, *ids = encode_prompt(tokenizer, text)
    xs, ys = [], []
    for start in range(0, CALIBRATION_TOKENS, window - 1):  # windows of BOS + window-1 tokens
        clean = rm.prepare([bos, *ids[start : start + window - 1]], zero_bos=False)
        xs.append(clean.mlp_inputs[1:])  # without the BOS position
        ys.append(clean.mlp_outputs[1:])
    x, y = torch.cat(xs), torch.cat(ys)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tc.b_enc.copy_(torch.randn(L, F, generator=gen) * 0.3)
        tc.b_dec.copy_(torch.randn(L, d, generator=gen) * 0.1)
        tc.set_normalization(x.mean(0), x.std(0).clamp_min(1e-6), y.mean(0), y.std(0).clamp_min(1e-6))
        z = tc.preactivations(x).float()  # [n, L, F]
        q = min(max(1.0 - active_per_token / F, 0.0), 1.0)
        theta = torch.quantile(z.transpose(0, 1).reshape(L, -1), q, dim=1).clamp_min(1e-3)
        tc.log_threshold.copy_(theta.log()[:, None].expand(L, F))
    return tc.eval()


def prepare(args: argparse.Namespace) -> dict:
    """Model folder, prompt ids and, per kind, our transcoder file and its circuit-tracer export."""
    import torch

    from clt.data.corpus import encode_prompt
    from clt.models.export import export_circuit_tracer

    work = args.work_dir
    model, tokenizer, folder = prepare_model(args.model, work)
    ids = encode_prompt(tokenizer, args.prompt)
    settings = {
        "max_n_logits": args.max_n_logits,
        "desired_logit_prob": args.desired_logit_prob,
        "batch_size": args.batch_size,
        "max_feature_nodes": args.max_feature_nodes,
    }
    specs = {}
    for kind in args.kinds:
        tag = f"{args.model}-{kind}-F{args.num_features}-a{args.active_per_token:g}-s{args.seed}"
        tc_path = work / "transcoders" / f"{tag}.safetensors"
        ct_dir = work / "transcoders" / f"{tag}-ct"
        if not tc_path.is_file() or not (ct_dir / "config.yaml").is_file():
            print(f"building the {kind.upper()} transcoder {tag} (once)", flush=True)
            torch.manual_seed(args.seed)
            tc = build_transcoder(model, tokenizer, kind, args.num_features, args.active_per_token, args.seed)
            export_circuit_tracer(tc, ct_dir, num_model_layers=tc.cfg.num_layers, overwrite=True)
            tc.save(tc_path)
        specs[kind] = {
            "model": args.model,
            "kind": kind,
            "model_dir": str(folder.resolve()),
            "transcoder": str(tc_path.resolve()),
            "ct_transcoder": str(ct_dir.resolve()),
            "token_ids": ids,
            "tokens": [tokenizer.decode([i]) for i in ids],
            "settings": settings,
        }
    return specs


# ===================================================================== runs and comparison


def run_child(python: str, mode: str, spec: dict, out: Path, extra: list[str] = ()) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [python, str(CHILD_SCRIPT), "--child", mode, "--spec", str(spec_path), "--out", str(out), *extra],
        env=env,
        text=True,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"the {mode} run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def node_keys(graph) -> list[tuple]:
    """Keys of a Graph's nodes that do not depend on the node order."""
    keys = [("feature", *map(int, f)) for f in graph.features.tolist()]
    keys += [("error", m, p) for m in range(graph.n_layers) for p in range(graph.n_tokens)]
    keys += [("token", p) for p in range(graph.n_tokens)]
    keys += [("logit", int(t)) for t in graph.logit_token_ids]
    return keys


def compare_graphs(ours_path: str, ct_path: str) -> dict:
    """Agreement of our graph with circuit-tracer's (loaded with our interop reader)."""
    import torch

    from clt.attribution import Graph, graph_scores
    from clt.attribution.interop import load_circuit_tracer_graph

    ours, ct = Graph.load(ours_path), load_circuit_tracer_graph(ct_path)
    ko, kc = node_keys(ours), node_keys(ct)
    fo = {k for k in ko if k[0] == "feature"}
    fc = {k for k in kc if k[0] == "feature"}
    where = {k: i for i, k in enumerate(kc)}
    common = [(i, where[k]) for i, k in enumerate(ko) if k in where]
    io = torch.tensor([i for i, _ in common])
    ic = torch.tensor([j for _, j in common])
    A_o = ours.adjacency[io][:, io].double()
    A_c = ct.adjacency[ic][:, ic].double()
    scale = float(A_c.abs().max())
    diff = (A_o - A_c).abs()
    n_feat = sum(1 for k in ko if k[0] == "feature" and k in where)
    logit_rows = torch.tensor([r for r, (i, _) in enumerate(common) if ko[i][0] == "logit"])
    feature_rows = torch.arange(n_feat)
    act_o = ours.activations[[i for i, _ in common[:n_feat]]]
    act_c = ct.activations[[j for _, j in common[:n_feat]]]
    same_logits = ours.logit_token_ids == ct.logit_token_ids

    def rel(d: torch.Tensor) -> float:
        return float(d.max()) / scale if d.numel() and scale > 0 else 0.0

    return {
        "same_feature_set": fo == fc,
        "n_features_ours": len(fo),
        "n_features_ct": len(fc),
        "features_only_ours": len(fo - fc),
        "features_only_ct": len(fc - fo),
        "n_active_ours": ours.n_active_features,
        "n_active_ct": ct.n_active_features,
        "same_logit_targets": same_logits,
        "logit_ids_ours": ours.logit_token_ids,
        "logit_ids_ct": ct.logit_token_ids,
        "max_abs_logit_prob_diff": (
            float((ours.logit_probabilities - ct.logit_probabilities).abs().max()) if same_logits else None
        ),
        "max_rel_activation_diff": (
            float(((act_o - act_c).abs() / act_c.abs().clamp_min(1e-12)).max()) if n_feat else 0.0
        ),
        "same_node_order": ko == kc,
        "max_abs_adjacency": scale,
        "max_rel_adjacency_diff": rel(diff),
        "max_rel_adjacency_diff_feature_rows": rel(diff[feature_rows]) if n_feat else 0.0,
        "max_rel_adjacency_diff_logit_rows": rel(diff[logit_rows]) if len(logit_rows) else 0.0,
        "scores_ours": list(graph_scores(ours)),
        "scores_ct_graph_by_ours": list(graph_scores(ct)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="model alias (smollm2-135m, tiny-llama) or path")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--kinds", default="plt,clt", help="comma-separated: plt, clt")
    parser.add_argument("--num-features", type=int, default=256, help="features per layer")
    parser.add_argument(
        "--active-per-token",
        type=float,
        default=4.0,
        help="features active per layer and token on the calibration text",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="targets per backward pass (default: AttributionConfig's)"
    )
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/clt-bench"))
    parser.add_argument("--ct-python", default=DEFAULT_CT_PYTHON, help="python of the virtualenv with circuit-tracer")
    args = parser.parse_args()

    if args.batch_size is None:
        from clt.config.attribution import AttributionConfig

        args.batch_size = AttributionConfig().batch_size
    args.kinds = [k.strip().lower() for k in args.kinds.split(",") if k.strip()]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    have_ct = Path(args.ct_python).exists()
    baseline = "circuit-tracer" if have_ct else "ours, batch_size=1"
    if not have_ct:
        print(
            f"{args.ct_python} does not exist: the baseline is our own attribute with "
            "batch_size=1 (one target per backward pass), not circuit-tracer",
            flush=True,
        )
    t_start = time.perf_counter()
    specs = prepare(args)
    prep_s = time.perf_counter() - t_start
    runs_dir = args.work_dir / "runs"
    results = []
    for kind, spec in specs.items():
        ours_runs, base_runs = [], []
        for r in range(args.repeats):
            stem = f"{args.model}-{kind}-r{r}"
            print(f"[{time.perf_counter() - t_start:6.0f}s] {kind.upper()} repeat {r + 1}: ours", flush=True)
            ours_runs.append(run_child(sys.executable, "ours", spec, runs_dir / f"{stem}-ours.json"))
            print(f"[{time.perf_counter() - t_start:6.0f}s] {kind.upper()} repeat {r + 1}: {baseline}", flush=True)
            if have_ct:
                base_runs.append(
                    run_child(args.ct_python, "ct", spec, runs_dir / f"{stem}-ct.json", ["--scores"] if r == 0 else [])
                )
            else:
                base_runs.append(run_child(sys.executable, "ours-b1", spec, runs_dir / f"{stem}-b1.json"))
        ours = min(ours_runs, key=lambda x: x["seconds"])
        base = min(base_runs, key=lambda x: x["seconds"])
        entry = {
            "setting": kind,
            "model": args.model,
            "prompt": args.prompt,
            "tokens": spec["tokens"],
            "baseline": baseline,
            "ours_seconds": ours["seconds"],
            "baseline_seconds": base["seconds"],
            "speed_ratio": base["seconds"] / ours["seconds"],
            "ours_peak_mib": max(x["peak_bytes"] for x in ours_runs) / MiB,
            "baseline_peak_mib": max(x["peak_bytes"] for x in base_runs) / MiB,
            "ours_rss_before_mib": ours["rss_before_bytes"] / MiB,
            "baseline_rss_before_mib": base["rss_before_bytes"] / MiB,
            "ours_increase_mib": max(x["peak_bytes"] - x["rss_before_bytes"] for x in ours_runs) / MiB,
            "baseline_increase_mib": max(x["peak_bytes"] - x["rss_before_bytes"] for x in base_runs) / MiB,
            "n_active_features": ours["n_active_features"],
            "n_logits": ours["n_logits"],
            "ours_runs": ours_runs,
            "baseline_runs": base_runs,
        }
        entry["memory_ratio"] = entry["baseline_peak_mib"] / entry["ours_peak_mib"]
        if have_ct:
            entry["agreement"] = compare_graphs(ours_runs[0]["graph"], base_runs[0]["graph"])
            entry["agreement"]["scores_ct"] = base_runs[0].get("ct_scores")
        results.append(entry)

    total_s = time.perf_counter() - t_start
    load = os.getloadavg()
    report = {
        "device": f"CPU, {os.cpu_count()} cores",
        "threads": ours["threads"],
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average": load,
        "baseline": baseline,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "preparation_seconds": prep_s,
        "total_seconds": total_s,
        "results": results,
    }
    out = args.work_dir / "attribution_speed.json"
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {out} (total {total_s:.0f} s, preparation {prep_s:.0f} s)")
    return 0


def print_table(report: dict) -> None:
    results = report["results"]
    print(
        f"\ndevice: {report['device']}, torch threads {report['threads']}, load average "
        f"{report['load_average'][0]:.2f}; baseline: {report['baseline']}; peak MiB = peak "
        "resident memory during the attribute call (model and transcoder included); +MiB = peak minus "
        "resident memory just before the call"
    )
    head = (
        "setting",
        "ours s",
        "baseline s",
        "speed ratio",
        "peak MiB ours",
        "peak MiB baseline",
        "memory ratio",
        "+MiB ours",
        "+MiB baseline",
    )
    rows = []
    for e in results:
        name = (
            f"{e['model']} {e['setting'].upper()} ({e['n_active_features']} active, "
            f"{e['n_logits']} logits, {len(e['tokens'])} tokens)"
        )
        rows.append(
            (
                name,
                f"{e['ours_seconds']:.2f}",
                f"{e['baseline_seconds']:.2f}",
                f"{e['speed_ratio']:.2f}",
                f"{e['ours_peak_mib']:.0f}",
                f"{e['baseline_peak_mib']:.0f}",
                f"{e['memory_ratio']:.2f}",
                f"{e['ours_increase_mib']:.0f}",
                f"{e['baseline_increase_mib']:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for e in results:
        a = e.get("agreement")
        if a is None:
            continue
        dp = a["max_abs_logit_prob_diff"]
        dp = "n/a" if dp is None else f"{dp:.1e}"
        print(
            f"\n{e['setting'].upper()} agreement with circuit-tracer: same feature nodes "
            f"{a['same_feature_set']} ({a['n_features_ours']} of {a['n_active_ours']} active "
            f"ours, {a['n_features_ct']} of {a['n_active_ct']} circuit-tracer), same logit "
            f"targets {a['same_logit_targets']} (max |Δp| {dp}), "
            f"same node order {a['same_node_order']}"
        )
        print(
            f"  max |ΔA| / max |A| = {a['max_rel_adjacency_diff']:.2e} (feature rows "
            f"{a['max_rel_adjacency_diff_feature_rows']:.2e}, logit rows "
            f"{a['max_rel_adjacency_diff_logit_rows']:.2e}); max relative activation "
            f"difference {a['max_rel_activation_diff']:.2e}"
        )
        ct = a.get("scores_ct") or [float("nan")] * 2
        print(
            f"  replacement / completeness: ours {a['scores_ours'][0]:.4f} / "
            f"{a['scores_ours'][1]:.4f}, circuit-tracer {ct[0]:.4f} / {ct[1]:.4f} "
            f"(its graph by our graph_scores: {a['scores_ct_graph_by_ours'][0]:.4f} / "
            f"{a['scores_ct_graph_by_ours'][1]:.4f})"
        )


if __name__ == "__main__":
    sys.exit(main())
