"""`clt steer`: a prompt's next tokens and continuation with and without an intervention on features."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from clt.config.intervention import InterventionConfig
from clt.files import atomic_write_text


@dataclasses.dataclass
class SteeringResult:
    """What an intervention changed: next tokens and the generated continuation."""

    interventions: list[tuple[int, int, int, float]]
    """(model layer, position, feature, value) of every intervention."""
    config: InterventionConfig
    prompt_tokens: list[str]
    top_tokens: list[tuple[str, int, float]]
    """(token, id, probability) of the likeliest next tokens with the intervention."""
    original_top_tokens: list[tuple[str, int, float]]
    continuation: str | None
    """Text generated with the intervention (None when max_new_tokens is 0)."""
    original_continuation: str | None
    """Text generated without it."""

    def summary(self) -> str:
        """A few lines for the terminal."""

        def tops(items: list[tuple[str, int, float]]) -> str:
            return ", ".join(f"{t!r} {p:.3f}" for t, _, p in items)

        lines = [
            f"prompt: {''.join(self.prompt_tokens)!r} ({len(self.prompt_tokens)} tokens)",
            f"{len(self.interventions)} interventions ({self.config.mode} {self.config.value:g}): "
            + ", ".join(f"L{m}@{p}#{f}" for m, p, f, _ in self.interventions[:8])
            + (" …" if len(self.interventions) > 8 else ""),
            f"next tokens without: {tops(self.original_top_tokens)}",
            f"next tokens with:    {tops(self.top_tokens)}",
        ]
        if self.continuation is not None:
            lines += [
                f"continuation without: {self.original_continuation!r}",
                f"continuation with:    {self.continuation!r}",
            ]
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "config"}
        atomic_write_text(json.dumps({**data, "config": self.config.to_dict()}, indent=1), path)
        return path


def parse_features(text: str) -> list[tuple[int, int, int]]:
    """'3:5:12,4:5:7' -> [(3, 5, 12), (4, 5, 7)] (model layer, position, feature)."""
    out = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"'{item}' is not LAYER:POS:FEATURE (e.g. 3:5:12)")
        out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def run_steering(
    transcoder: Any,
    *,
    config: InterventionConfig,
    prompt: str | None = None,
    graph: str | Path | None = None,
    nodes: list[str] | None = None,
    state: str | None = None,
    features: list[tuple[int, int, int]] | None = None,
    model: Any = None,
    device: str = "cpu",
    output_path: str | Path | None = None,
) -> SteeringResult:
    """Intervene on `features` (layer, pos, feature) or on a group of a saved graph's nodes (ids,
    supernodes or 'pinned' of a page state) at `prompt` (or the graph's prompt), then generate."""
    from clt.attribution import Graph, ReplacementModel, generate, intervene, node_interventions
    from clt.pipeline.loading import model_for

    if (graph is None) == (prompt is None):
        raise ValueError("give either --prompt (with --features) or --graph (with --nodes or --features)")
    loaded = Graph.load(graph) if graph is not None else None
    interventions = [(m, p, f, config.value) for m, p, f in features or []]
    if nodes:
        if loaded is None:
            raise ValueError("--nodes names nodes of a graph: give --graph")
        interventions += node_interventions(loaded, nodes, value=config.value, state=state)
    if not interventions:
        raise ValueError("nothing to intervene on: give --features LAYER:POS:FEATURE or --nodes")
    lm, tokenizer = model_for(transcoder, model, device)
    rm = ReplacementModel(lm, transcoder.to(device), tokenizer)
    source = loaded.token_ids if loaded is not None else prompt
    options = {"freeze_attention": config.freeze_attention, "constrained_layers": config.layers()}
    result = intervene(
        rm,
        None,
        source,
        interventions,
        mode=config.mode,
        prepend_bos=config.prepend_bos,
        top_k=config.top_tokens,
        **options,
    )
    continuation = original = None
    if config.max_new_tokens > 0:
        sampling = {
            "max_new_tokens": config.max_new_tokens,
            "do_sample": config.do_sample,
            "temperature": config.temperature,
            "top_k": config.top_k,
            "top_p": config.top_p,
            "seed": config.seed,
            "use_cache": config.use_cache,
            "prepend_bos": config.prepend_bos,
        }
        continuation = generate(rm, None, source, interventions, mode=config.mode, **options, **sampling).text
        original = generate(rm, None, source, **sampling).text
    steering = SteeringResult(
        interventions=[(int(m), int(p), int(f), float(v)) for m, p, f, v in interventions],
        config=config,
        prompt_tokens=result.tokens,
        top_tokens=result.top_tokens,
        original_top_tokens=result.original_top_tokens,
        continuation=continuation,
        original_continuation=original,
    )
    if output_path is not None:
        steering.save(output_path)
    return steering


__all__ = ["SteeringResult", "parse_features", "run_steering"]
