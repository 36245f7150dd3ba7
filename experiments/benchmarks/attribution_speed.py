"""Time and measure `clt.attribution.attribute` against the code before a change and circuit-tracer, same run.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/benchmarks/attribution_speed.py \
        [--model smollm2-135m|tiny-llama] [--transcoders clt:64:8,clt:256:4] \
        [--tokens 64,256,1024,4096 | --prompt TEXT] [--max-feature-nodes 2048] [--batch-size 64] \
        [--max-memory-gb 16] [--row-store auto|memory|split] [--reference-src DIR] [--reference-tokens 64,256] \
        [--ct-python .venv-interop/circuit_tracer/bin/python] [--ct-tokens 64,256] [--memory-limit-gb 21] \
        [--timeout 14400] [--repeats 1] [--work-dir /tmp/clt-bench]

Transcoders (``kind:features per layer:active features per layer and token``, PLT or CLT): random
JumpReLU transcoders over every model layer, standardised with the model's own MLP statistics on the
default corpus, per-layer thresholds set so that about that many features fire per layer and token
(``clt:64:8`` is the demo's CLT in size and L0: 64 features per layer, ~240 active per token over 30
layers). Prompts: ``--tokens`` gives lengths, each the BOS token and the first tokens of the default
corpus; else ``--prompt`` (15 tokens). Both sides get the same token ids; circuit-tracer zeroes
features and errors at position 0, which is our ``zero_bos=True`` (the default) for a BOS token.

Each measured call runs in a fresh subprocess (so that peak memory is per run), ``--repeats`` times:

(a) ours: `clt.attribution.attribute` of this checkout (max_n_logits, desired_logit_prob,
    batch_size, max_feature_nodes as given, plus ``--max-memory-gb`` and ``--row-store``);
(b) the reference: the same child with ``PYTHONPATH=--reference-src``, a checkout of the code before
    the change (e.g. ``git worktree add /tmp/clt-ref <commit>``), same settings but the new ones;
(c) circuit-tracer's ``attribute`` (``ReplacementModel.from_pretrained(<model folder>, <transcoder
    folder>, backend="nnsight")`` in the virtualenv of ``--ct-python``; see
    experiments/circuit_tracer/check_export.py for how it is made), same settings. The model is the
    same weights saved once as a transformers folder under ``<work-dir>/models`` (SmolLM2 comes
    de-quantised from its GGUF file), and the transcoder is written with `export_circuit_tracer`.

(b) and (c) run only at the lengths of ``--reference-tokens`` and ``--ct-tokens``. A run that exceeds
``--memory-limit-gb`` of resident memory (checked every 0.2 s) or ``--timeout`` seconds is killed
and reported as failed, with the reason, as is one that crashes (its last output is kept).

Reported per setting: the wall time of the ``attribute`` call (min over repeats; loading excluded
and reported in the JSON), its peak resident memory (VmHWM, reset with /proc/self/clear_refs just
before the call: the loaded model and transcoder included, loading peaks not), the ratios to ours,
our memory plan and time by part (logged by `attribute`), and where two graphs exist, their
agreement: same feature nodes and logits, max |adjacency difference| / max |adjacency| over the
aligned node order, and both graphs' replacement and completeness scores. Everything also goes to
``<work-dir>/attribution_speed.json``. Timings on a shared machine vary by up to ~50 % between runs.
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
DEFAULT_CT_PYTHON = ".venv-interop/circuit_tracer/bin/python"
GiB = 2**30
CHILD_SCRIPT = Path(__file__).resolve().with_name("attribution_child.py")
"""Runs each measured call in a fresh process (ours, the reference's, or circuit-tracer's in its virtualenv)."""
REPO = Path(__file__).resolve().parents[2]
NEW_SETTINGS = ("max_memory_gb", "row_store")
"""Settings the reference code does not have."""


# ===================================================================== preparation (our venv)


def prepare(args: argparse.Namespace) -> list[dict]:
    """Model folder and, per transcoder and prompt, the spec of one measured setting."""
    import torch
    from attribution_setup import build_transcoder, corpus_ids, prepare_model

    from clt.data.corpus import encode_prompt
    from clt.models.export import export_circuit_tracer

    work = args.work_dir
    model, tokenizer, folder = prepare_model(args.model, work)
    prompts = (
        [corpus_ids(tokenizer, n) for n in args.tokens] if args.tokens else [encode_prompt(tokenizer, args.prompt)]
    )
    settings = {
        "max_n_logits": args.max_n_logits,
        "desired_logit_prob": args.desired_logit_prob,
        "batch_size": args.batch_size,
        "max_feature_nodes": args.max_feature_nodes,
        "max_memory_gb": args.max_memory_gb,
        "row_store": args.row_store,
    }
    specs = []
    for kind, features, active in args.transcoders:
        tag = f"{args.model}-{kind}-F{features}-a{active:g}-s{args.seed}"
        tc_path = work / "transcoders" / f"{tag}.safetensors"
        ct_dir = work / "transcoders" / f"{tag}-ct"
        if not tc_path.is_file() or not (ct_dir / "config.yaml").is_file():
            print(f"building the {kind.upper()} transcoder {tag} (once)", flush=True)
            torch.manual_seed(args.seed)
            tc = build_transcoder(model, tokenizer, kind, features, active, args.seed)
            export_circuit_tracer(tc, ct_dir, num_model_layers=tc.cfg.num_layers, overwrite=True)
            tc.save(tc_path)
        for ids in prompts:
            specs.append(
                {
                    "model": args.model,
                    "transcoder_name": f"{kind.upper()} {features}/layer ({active:g} active/layer/token)",
                    "tag": f"{tag}-n{len(ids)}",
                    "model_dir": str(folder.resolve()),
                    "transcoder": str(tc_path.resolve()),
                    "ct_transcoder": str(ct_dir.resolve()),
                    "token_ids": ids,
                    "settings": settings,
                }
            )
    return sorted(specs, key=lambda spec: len(spec["token_ids"]))  # short prompts first


# ===================================================================== runs and comparison


def run_child(python: str, mode: str, spec: dict, out: Path, args: argparse.Namespace, source: Path) -> dict:
    """One measured call in a fresh process; {"failed": reason} if it crashed, ran out of memory or time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONPATH": str(source)}
    command = [python, str(CHILD_SCRIPT), "--child", mode, "--spec", str(spec_path), "--out", str(out)]
    log = out.with_suffix(".log")
    with log.open("w") as stream:
        proc = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
        reason, peak, start = None, 0, time.perf_counter()
        while proc.poll() is None:
            peak = max(peak, _rss(proc.pid))
            if peak > args.memory_limit_gb * GiB:
                reason = f"killed: resident memory passed {args.memory_limit_gb:g} GiB"
            elif time.perf_counter() - start > args.timeout:
                reason = f"killed: ran over {args.timeout:g} s"
            if reason:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
    if reason is None and (proc.returncode != 0 or not out.is_file()):
        tail = log.read_text()[-600:].strip().splitlines()
        reason = f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}"
    if reason is not None:
        print(f"    {mode} failed ({reason}; log {log})", flush=True)
        return {"failed": reason, "peak_bytes_seen": peak, "seconds_until_failure": time.perf_counter() - start}
    return json.loads(out.read_text())


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def node_keys(graph) -> list[tuple]:
    """Keys of a Graph's nodes that do not depend on the node order."""
    keys = [("feature", *map(int, f)) for f in graph.features.tolist()]
    keys += [("error", m, p) for m in range(graph.n_layers) for p in range(graph.n_tokens)]
    keys += [("token", p) for p in range(graph.n_tokens)]
    keys += [("logit", int(t)) for t in graph.logit_token_ids]
    return keys


def compare_graphs(ours_path: str, ct_path: str) -> dict:
    """Agreement of our graph with another: the reference code's graph file or circuit-tracer's (.pt)."""
    import torch

    from clt.attribution import Graph, graph_scores
    from clt.attribution.adjacency import to_dense
    from clt.attribution.interop import load_circuit_tracer_graph

    ours = Graph.load(ours_path)
    ct = load_circuit_tracer_graph(ct_path) if ct_path.endswith(".pt") else Graph.load(ct_path)
    ko, kc = node_keys(ours), node_keys(ct)
    fo = {k for k in ko if k[0] == "feature"}
    fc = {k for k in kc if k[0] == "feature"}
    where = {k: i for i, k in enumerate(kc)}
    common = [(i, where[k]) for i, k in enumerate(ko) if k in where]
    io = torch.tensor([i for i, _ in common])
    ic = torch.tensor([j for _, j in common])
    A_o = to_dense(ours.adjacency)[io][:, io].double()
    A_c = to_dense(ct.adjacency)[ic][:, ic].double()
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


def parse_transcoders(text: str) -> list[tuple[str, int, float]]:
    """``kind:features:active,...`` → [(kind, features per layer, active per layer and token)]."""
    out = []
    for item in text.split(","):
        kind, features, active = item.strip().split(":")
        if kind not in ("plt", "clt"):
            raise argparse.ArgumentTypeError(f"transcoder kind must be plt or clt, got '{kind}'")
        out.append((kind, int(features), float(active)))
    return out


def _lengths(text: str) -> list[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="model alias (smollm2-135m, tiny-llama) or path")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt when --tokens is not given")
    parser.add_argument("--tokens", type=_lengths, default=None, help="prompt lengths, e.g. 64,256,1024,4096")
    parser.add_argument(
        "--transcoders", type=parse_transcoders, default="plt:256:4,clt:256:4", help="kind:features:active,..."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=64, help="targets per backward pass")
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--max-memory-gb", type=float, default=None, help="ours only (AttributionConfig)")
    parser.add_argument("--row-store", choices=("auto", "memory", "split"), default="auto", help="ours only")
    parser.add_argument("--reference-src", type=Path, default=None, help="checkout of the code before the change")
    parser.add_argument("--reference-tokens", type=_lengths, default=[64, 256])
    parser.add_argument("--ct-python", default=DEFAULT_CT_PYTHON, help="python of the virtualenv with circuit-tracer")
    parser.add_argument("--ct-tokens", type=_lengths, default=[64, 256])
    parser.add_argument("--memory-limit-gb", type=float, default=21.0, help="kill a run above this resident memory")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="kill a run after this many seconds")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--progress", action="store_true", help="our runs show a progress bar (with its ETA) in their log files"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/clt-bench"))
    args = parser.parse_args()
    if isinstance(args.transcoders, str):
        args.transcoders = parse_transcoders(args.transcoders)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    have_ct = Path(args.ct_python).exists()
    if not have_ct:
        print(f"{args.ct_python} does not exist: circuit-tracer is not run", flush=True)
    t_start = time.perf_counter()
    specs = prepare(args)
    prep_s = time.perf_counter() - t_start
    results = []
    for spec in specs:
        n = len(spec["token_ids"])
        sides = {"ours": (sys.executable, "ours", REPO)}
        if args.reference_src is not None and (args.tokens is None or n in args.reference_tokens):
            sides["reference"] = (sys.executable, "ours", args.reference_src.resolve())
        if have_ct and (args.tokens is None or n in args.ct_tokens):
            sides["circuit-tracer"] = (args.ct_python, "ct", REPO)
        entry = {"setting": spec["transcoder_name"], "tokens": n, "model": args.model}
        spec["save_graph"] = len(sides) > 1
        spec["progress"] = args.progress
        for side, (python, mode, source) in sides.items():
            side_spec = spec if side == "ours" else {**spec, "settings": _without_new(spec["settings"])}
            runs = []
            for r in range(args.repeats):
                print(f"[{time.perf_counter() - t_start:6.0f}s] {spec['tag']} repeat {r + 1}: {side}", flush=True)
                runs.append(
                    run_child(
                        python,
                        mode,
                        side_spec,
                        args.work_dir / "runs" / f"{spec['tag']}-{side}-r{r}.json",
                        args,
                        source,
                    )
                )
            done = [x for x in runs if "failed" not in x]
            best = min(done, key=lambda x: x["seconds"]) if done else runs[-1]
            entry[side] = {**best, "runs": runs}
        for side in ("reference", "circuit-tracer"):
            if "graph" in entry.get(side, {}) and "graph" in entry["ours"]:
                entry[f"agreement_{side}"] = compare_graphs(entry["ours"]["graph"], entry[side]["graph"])
        results.append(entry)
        (args.work_dir / "attribution_speed.json").write_text(
            json.dumps(_report(args, results, prep_s, t_start), indent=2)
        )
    report = _report(args, results, prep_s, t_start)
    out = args.work_dir / "attribution_speed.json"
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {out} (total {report['total_seconds']:.0f} s, preparation {prep_s:.0f} s)")
    return 0


def _without_new(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in NEW_SETTINGS}


def _report(args: argparse.Namespace, results: list[dict], prep_s: float, t_start: float) -> dict:
    import torch

    return {
        "device": f"CPU, {os.cpu_count()} cores",
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average": os.getloadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "preparation_seconds": prep_s,
        "total_seconds": time.perf_counter() - t_start,
        "results": results,
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _cell(record: dict | None, ours: dict) -> tuple[str, str, str]:
    """(seconds, peak GiB, time ratio to ours) of one side, or why it did not run."""
    if record is None:
        return "-", "-", "-"
    if "failed" in record:
        seen = record.get("peak_bytes_seen", 0) / GiB
        return f"failed ({record['failed']}, {record['seconds_until_failure']:.0f} s)", f">{seen:.1f}", "-"
    ratio = f"{record['seconds'] / ours['seconds']:.2f}" if "seconds" in ours else "-"
    return f"{record['seconds']:.1f}", f"{record['peak_bytes'] / GiB:.2f}", ratio


def print_table(report: dict) -> None:
    """The table of times and peak memory, our time by part and the graphs' agreement."""
    print(
        f"\n{report['cpu']} ({report['device']}), torch threads {report['threads']}, load average "
        f"{report['load_average'][0]:.2f}; peak GiB = peak resident memory during the attribute call (loaded "
        "model and transcoder included); ratio = time / our time"
    )
    head = (
        "transcoder",
        "tokens",
        "active",
        "ours s",
        "ours GiB",
        "reference s",
        "GiB",
        "ratio",
        "circuit-tracer s",
        "GiB",
        "ratio",
    )
    rows = []
    for e in report["results"]:
        ours = e["ours"]
        own = _cell(ours, ours)
        active = str(ours.get("n_active_features", "-"))
        rows.append(
            (
                e["setting"],
                str(e["tokens"]),
                active,
                own[0],
                own[1],
                *_cell(e.get("reference"), ours),
                *_cell(e.get("circuit-tracer"), ours),
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for e in report["results"]:
        print(f"\n{e['setting']}, {e['tokens']} tokens:")
        for line in e["ours"].get("log", []):
            print(f"  ours: {line}")
        for side in ("reference", "circuit-tracer"):
            a = e.get(f"agreement_{side}")
            if a is None:
                continue
            print(
                f"  vs {side}: same feature nodes {a['same_feature_set']} ({a['n_features_ours']} of "
                f"{a['n_active_ours']} active ours, {a['n_features_ct']} of {a['n_active_ct']}), same logits "
                f"{a['same_logit_targets']}, "
                f"max |ΔA| / max |A| = {a['max_rel_adjacency_diff']:.2e}; replacement / completeness ours "
                f"{a['scores_ours'][0]:.4f} / {a['scores_ours'][1]:.4f}, theirs {a['scores_ct_graph_by_ours'][0]:.4f}"
                f" / {a['scores_ct_graph_by_ours'][1]:.4f}"
            )


if __name__ == "__main__":
    sys.exit(main())
