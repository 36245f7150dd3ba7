"""One measured `attribute` call in a fresh process, ours or circuit-tracer's (run by attribution_speed.py).

    python attribution_child.py --child ours|ct --spec SPEC.json --out RESULT.json [--scores]

``ours`` runs `clt.attribution.attribute` of whatever `clt` is first on PYTHONPATH (this checkout, or
the reference checkout of the code before a change), with the messages it logs (memory plan, time
by part) kept in the result; the graph is saved when the spec asks (``save_graph``) for comparison.

The spec (written by attribution_speed.py) names the model folder, the transcoder (ours and its
circuit-tracer export), the prompt's token ids and the attribution settings; the result is the
call's wall time and peak memory, the loading cost and the graph's size. Only the standard library
is imported at the top, so that circuit-tracer's virtualenv can run it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# ===================================================================== measurement helpers


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak resident memory of this process from `start` to `stop`, in bytes.

    Resets the kernel's high-water mark (VmHWM) through /proc/self/clear_refs where allowed; else
    samples the resident size every millisecond in a thread (which can miss short peaks)."""

    def __init__(self) -> None:
        self.method = "VmHWM"
        self._peak = 0
        self._thread = None
        self._stop = False

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            import threading

            self.method = "sampled RSS"
            self._peak = _status_kib("VmRSS")

            def sample() -> None:
                while not self._stop:
                    self._peak = max(self._peak, _status_kib("VmRSS"))
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()

    def stop(self) -> int:
        if self._thread is None:
            return _status_kib("VmHWM") * 1024
        self._stop = True
        self._thread.join()
        return max(self._peak, _status_kib("VmRSS")) * 1024


def _touch(parameters) -> None:
    """Read every weight once, so that memory-mapped weight files are resident before measuring
    (else the pages the call touches first would count as its memory)."""
    import torch

    with torch.no_grad():
        for p in parameters:
            p.sum()


def _loaded(parameters, t0: float) -> dict:
    """Touch the loaded `parameters`; the seconds since `t0` and the peak RSS so far (the cost of loading)."""
    _touch(parameters)
    load_s = time.perf_counter() - t0
    return {"load_peak_bytes": _status_kib("VmHWM") * 1024, "load_seconds": load_s}


def _measure(call, load: dict) -> tuple:
    """call()'s result and its record: seconds, peak bytes, rss bytes before, the `load` record, method."""
    import gc

    gc.collect()
    before = _status_kib("VmRSS") * 1024
    peak = PeakMemory()
    peak.start()
    t0 = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - t0
    record = {"seconds": seconds, "peak_bytes": peak.stop(), "rss_before_bytes": before, **load}
    return result, {**record, "memory_method": peak.method}


# ===================================================================== child processes


def child_ours(spec: dict, out: Path) -> dict:
    """`clt.attribution.attribute` on the spec's prompt ids, with its log messages."""
    import logging

    import torch

    from clt.attribution import attribute
    from clt.models.transcoder import CrossLayerTranscoder
    from clt.nnsight.loading import load_model

    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("clt.attribution")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    model, tokenizer = load_model(spec["model_dir"])
    transcoder = CrossLayerTranscoder.load(spec["transcoder"]).eval()
    load = _loaded(model.parameters(), t0)
    settings = {k: v for k, v in spec["settings"].items() if v is not None or k == "max_feature_nodes"}
    ids = torch.tensor(spec["token_ids"])
    graph, record = _measure(
        lambda: attribute(
            ids, model, transcoder, tokenizer=tokenizer, progress=spec.get("progress", False), **settings
        ),
        load,
    )
    result = {
        **record,
        "n_active_features": graph.n_active_features,
        "n_feature_nodes": graph.n_features,
        "n_logits": graph.n_logits,
        "n_nodes": graph.n_nodes,
        "sparse": bool(getattr(graph, "is_sparse", False)),
        "threads": torch.get_num_threads(),
        "settings": settings,
        "log": messages,
    }
    if spec.get("save_graph"):
        result["graph"] = str(graph.save(out.with_suffix(".graph.json")))
    return result


def child_ct(spec: dict, out: Path, scores: bool) -> dict:
    """circuit-tracer's attribute (run in its virtualenv) on the spec's prompt ids."""
    import torch
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores

    t0 = time.perf_counter()
    model = ReplacementModel.from_pretrained(
        spec["model_dir"], spec["ct_transcoder"], backend="nnsight", device=torch.device("cpu"), dtype=torch.float32
    )
    load = _loaded(model.parameters(), t0)
    s = spec["settings"]
    ids = torch.tensor(spec["token_ids"])
    graph, record = _measure(
        lambda: attribute(
            ids,
            model,
            max_n_logits=s["max_n_logits"],
            desired_logit_prob=s["desired_logit_prob"],
            batch_size=s["batch_size"],
            max_feature_nodes=s["max_feature_nodes"],
            verbose=False,
        ),
        load,
    )
    path = out.with_suffix(".graph.pt")
    graph.to_pt(str(path))
    result = {
        **record,
        "n_active_features": int(graph.active_features.shape[0]),
        "n_feature_nodes": len(graph.selected_features),
        "n_logits": len(graph.logit_targets),
        "n_nodes": int(graph.adjacency_matrix.shape[0]),
        "threads": torch.get_num_threads(),
        "graph": str(path),
    }
    if scores:
        replacement, completeness = compute_graph_scores(graph)
        result["ct_scores"] = [float(replacement), float(completeness)]
    return result


def main() -> int:
    """Run one child measurement and write its result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", required=True, choices=["ours", "ct"])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scores", action="store_true", help="circuit-tracer: also compute its graph scores")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    result = child_ct(spec, args.out, args.scores) if args.child == "ct" else child_ours(spec, args.out)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
