"""The `clt` command line: extract, train, evaluate, attribute, steer, features, demo.

Every subcommand's options are generated from its config dataclass; `--config FILE` reads a YAML
or JSON file of those options and the command-line options override it.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from clt.config.attribution import AttributionConfig
from clt.config.base import ConfigError
from clt.config.cli_args import add_config_arguments, config_from_args
from clt.config.constants import DEFAULT_MODEL
from clt.config.extraction import ExtractionConfig
from clt.config.intervention import InterventionConfig
from clt.config.recipes import recipe
from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig

# CLTConfig fields that `clt train` derives from the store instead of taking as options.
_DERIVED_CLT_FIELDS = ("num_layers", "d_model", "layers", "model_name", "dtype", "seed")
# Defaults of the original train_clt.py that differ from the configs' own.
TRAIN_DEFAULTS = {
    "transcoder": {"num_features": 300},
    "extraction": {"max_tokens": 100_000},
    "training": {"output_dir": "runs/train"},
}

logger = logging.getLogger("clt")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _read_config_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {file}")
    values = yaml.safe_load(file.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{file} must hold a mapping of option: value")
    return values


def _section(values: dict[str, Any], name: str) -> dict[str, Any]:
    """Options of section `name` from a config file: that section if the file has sections, else all keys."""
    if name in values and isinstance(values[name], dict):
        return values[name]
    return values


def _options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The parsed options `names`, by name."""
    return {name: getattr(args, name) for name in names}


def cmd_extract(args: argparse.Namespace) -> int:
    """Record MLP inputs/outputs of a model over a corpus into a store.

    Trace the model with nnsight and stream each layer's MLP input and output into an on-disk
    activation store (resumable).
    """
    from clt.pipeline import run_extraction

    cfg = config_from_args(ExtractionConfig, args, _section(_read_config_file(args.config), "extraction"))
    store = run_extraction(cfg)
    print(f"{store}\nsize on disk: {store.nbytes() / 2**20:.1f} MiB")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a cross-layer (or per-layer) transcoder.

    Train a transcoder on an activation store (--store), or extract one first from --model over
    --dataset. Accepts the flags of the original train_clt.py; --config reads a YAML file with
    sections extraction:, transcoder:, training: (see experiments/). With neither --config nor --store,
    the default model is trained with its recipe (experiments/configs/smollm2_recipe.yaml: streamed
    from the live model); options given override it. Several processes:
    `torchrun --nproc_per_node N -m clt.cli train --store FOLDER --parallel data|features ...`
    (see experiments/configs/).
    """
    from clt.pipeline import run_training

    values = _read_config_file(args.config)
    unknown = set(values) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ConfigError(f"{args.config}: unknown sections {sorted(unknown)}; use extraction:, transcoder:, training:")
    defaults = _train_defaults(args)
    section = {name: {**defaults[name], **(values.get(name) or {})} for name in TRAIN_DEFAULTS}
    training = config_from_args(TrainingConfig, args, section["training"])
    options = _options(args, "model", "max_tokens", "layers", "context_length", "model_dtype")
    store_dir = str(Path(training.output_dir) / "store")
    extraction = config_from_args(
        ExtractionConfig,
        argparse.Namespace(**options, corpus=args.dataset, device=training.device, output_dir=store_dir),
        section["extraction"],
    )
    transcoder = config_from_args(
        CLTConfig, args, {"num_layers": 1, "d_model": 1, "seed": training.seed, **section["transcoder"]}
    )
    if args.store is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "under torchrun every rank would extract into the same folder: run `clt extract` first, "
            "then `torchrun --nproc_per_node N -m clt.cli train --store FOLDER ...`"
        )
    result = run_training(extraction, transcoder, training, store_path=args.store)
    if result.reconstruction is not None:  # rank 0 (or the only process) reports
        print(result.summary())
    return 0


def _train_defaults(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The base of `clt train`'s settings: the model's recipe (`clt.config.recipes`) when neither a
    config file nor a store is given, else the original train_clt.py's defaults."""
    found = recipe(args.model or DEFAULT_MODEL) if args.config is None and args.store is None else None
    if found is None:
        return TRAIN_DEFAULTS
    logger.info("no --config or --store: training with the recipe of %s", args.model or DEFAULT_MODEL)
    return found


def _open_store(path: str | None, what: str) -> Any:
    from clt.store import ActivationStore

    if path is None:
        return None
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no activation store at {path}; create one with `clt extract` ({what})")
    return ActivationStore.open(path)


def _feature_list(value: str) -> list[tuple[int, int]]:
    """'0:12,3:7' -> [(0, 12), (3, 7)] (layer:feature pairs)."""
    pairs = []
    for item in value.replace(" ", ",").split(","):
        if not item:
            continue
        layer, sep, feature = item.partition(":")
        if not sep or not layer.isdigit() or not feature.isdigit():
            raise argparse.ArgumentTypeError(f"'{item}' is not LAYER:FEATURE (e.g. 0:12)")
        pairs.append((int(layer), int(feature)))
    return pairs


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Metrics of a trained transcoder.

    FVU, L0 and dead features on an activation store, and the replacement model's KL, top-1
    agreement and CE loss recovered (model with the transcoder spliced in).
    """
    from clt.pipeline import load_transcoder, run_evaluation

    transcoder = load_transcoder(args.transcoder, args.device)
    store = _open_store(args.store, "the store the transcoder was trained on")
    result = run_evaluation(
        transcoder,
        store,
        model=args.model,
        replacement=not args.no_replacement,
        max_tokens=args.max_tokens,
        device=args.device,
        output_path=args.output,
    )
    print(result.summary())
    if args.output:
        print(f"metrics written to {args.output}")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    """Attribution graph of a prompt (JSON + interactive HTML page).

    Build the attribution graph of a prompt through the replacement model, prune it, score it and
    write graph.json, graph.html (the graph page: open it in a browser, offline) and neuronpedia.json;
    with --store, cards.json with the cards of the page's features, embedded in the page.
    """
    from clt.config.attribution import AttributionConfig
    from clt.pipeline import load_transcoder, run_attribution

    config = config_from_args(AttributionConfig, args, _section(_read_config_file(args.config), "attribution"))
    transcoder = load_transcoder(args.transcoder, args.device)
    result = run_attribution(
        transcoder,
        args.prompt,
        model=args.model,
        config=config,
        output_dir=args.output_dir,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        store=_open_store(args.store, "for feature labels"),
        labeller=args.labeller,
        device=args.device,
    )
    print(result.summary())
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    """Intervene on features and generate: does a circuit do what the graph says?

    Set, scale or add to features (--features LAYER:POS:FEATURE, or --nodes of a saved graph:
    node ids, supernode ids or 'pinned' from the graph page's saved --state) at a prompt, and print
    the likeliest next tokens and a continuation with and without the intervention. With
    --constrained-layers all --freeze-attention true the change is the graph's direct effects.
    """
    from clt.pipeline import load_transcoder, run_steering
    from clt.pipeline.steering import parse_features

    config = config_from_args(InterventionConfig, args, _section(_read_config_file(args.config), "intervention"))
    result = run_steering(
        load_transcoder(args.transcoder, args.device),
        config=config,
        prompt=args.prompt,
        graph=args.graph,
        nodes=[n for n in (args.nodes or "").replace(" ", ",").split(",") if n] or None,
        state=args.state,
        features=parse_features(args.features) if args.features else None,
        model=args.model,
        device=args.device,
        output_path=args.output,
    )
    print(result.summary())
    if args.output:
        print(f"result written to {args.output}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    """Feature cards: what makes features fire.

    For each feature: top activating contexts from the store's corpus, density, activation
    histogram, promoted/suppressed output tokens and an automatic label; cards.json plus an HTML
    card per feature.
    """
    from clt.pipeline import load_transcoder, run_features

    transcoder = load_transcoder(args.transcoder)
    out = Path(args.output_dir)
    cards = run_features(
        transcoder,
        _open_store(args.store, "the store the transcoder was trained on"),
        model=args.model,
        features=args.features,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        cache=out / "cards.json",
        figures_dir=out,
        n_figures=args.figures,
        labeller=args.labeller,
    )
    for card in list(cards.values())[: args.figures]:
        print(f"{card.key}: density {card.density:.4f}, max {card.max_activation:.3g}, label [{card.label}]")
    print(f"{len(cards)} feature cards in {out / 'cards.json'}; HTML cards in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the default model, offline.

    Train a transcoder with the default model's recipe, streamed from the live model (shortened to
    250 steps), evaluate it on held-out text, extract a small store for its feature cards, build an
    attribution graph and write it as the graph page (HTML) with the cards of its features.
    """
    from clt.pipeline import run_demo

    result = run_demo(
        **_options(
            args, "output_dir", "model", "max_tokens", "num_features", "training_steps", "batch_size", "labeller"
        )
    )
    print(result.summary())
    return 0


def _subcommand(
    sub: Any, func: Callable[[argparse.Namespace], int], parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add the subcommand `func` (``cmd_NAME``) runs: help from its docstring's first line, description the rest."""
    summary, _, details = inspect.cleandoc(func.__doc__ or "").partition("\n\n")
    parser = sub.add_parser(
        func.__name__.removeprefix("cmd_"),
        parents=list(parents),
        help=summary[:1].lower() + summary[1:].rstrip("."),
        description=" ".join(details.split()) or summary,
    )
    parser.set_defaults(func=func)
    return parser


_LABELLER_HELP = (
    "label features with a local transformers causal LM (an alias, hub id or folder) instead of the offline "
    "rule (tokens over-represented in the top contexts, and the top promoted token)"
)


def build_parser() -> argparse.ArgumentParser:
    """The `clt` argument parser with all subcommands."""
    parser = _Parser(
        prog="clt",
        description=(
            "Circuit tracing with cross-layer transcoders. Typical flow: `clt extract` (record MLP activations "
            "of a model into a store) -> `clt train` (fit a transcoder) -> `clt attribute` (graph for a prompt). "
            "`clt demo` runs it all on the default model (SmolLM2-135M, offline)."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    extract = _subcommand(sub, cmd_extract)
    extract.add_argument("--config", help="YAML/JSON file of options (command-line options override it)")
    add_config_arguments(extract, ExtractionConfig)

    train = _subcommand(sub, cmd_train)
    train.add_argument("--config", help="YAML/JSON file with extraction/transcoder/training sections")
    train.add_argument("--store", help="existing activation store folder (skips extraction)")
    train.add_argument("--model", help=f"model to extract from (default: {DEFAULT_MODEL})")
    train.add_argument("--dataset", help="corpus: 'pydoc' (default), a .txt/.jsonl file or a folder")
    train.add_argument("--max-tokens", type=int, help="tokens to extract when no --store is given (default: 100000)")
    train.add_argument(
        "--layers",
        type=lambda v: [int(i) for i in v.replace(",", " ").split()],
        help="model layers to cover, e.g. 0,1,2 (default: all)",
    )
    train.add_argument("--context-length", type=int, help="tokens per context window (default: 128)")
    train.add_argument(
        "--model-dtype",
        help="precision of the model's forward: auto (bfloat16 where the CPU computes it natively), float32, "
        "bfloat16 (default: auto)",
    )
    add_config_arguments(train, CLTConfig, skip=_DERIVED_CLT_FIELDS, defaults=TRAIN_DEFAULTS["transcoder"])
    add_config_arguments(train, TrainingConfig, defaults=TRAIN_DEFAULTS["training"])

    common = _Parser(add_help=False)
    common.add_argument(
        "--transcoder",
        required=True,
        help="transcoder or SAE: a save_pretrained folder, a `clt train` output folder, a .safetensors file, a "
        "sparsify, SAELens or circuit-tracer folder, or a hub id (owner/repo[/subfolder]) already in the local "
        "Hugging Face cache (nothing is downloaded)",
    )
    common.add_argument("--model", help="model alias or path (default: the model the transcoder was trained on)")
    common.add_argument("--device", default="cpu", help="torch device (default: cpu)")

    evaluate = _subcommand(sub, cmd_evaluate, [common])
    evaluate.add_argument("--store", required=True, help="activation store folder to evaluate on")
    evaluate.add_argument("--max-tokens", type=int, default=4096, help="store tokens to evaluate (default: 4096)")
    evaluate.add_argument("--no-replacement", action="store_true", help="skip the replacement-model metrics")
    evaluate.add_argument("--output", help="write the metrics as JSON to this file")

    attribute = _subcommand(sub, cmd_attribute, [common])
    attribute.add_argument("--prompt", required=True, help="the text to attribute (BOS is prepended)")
    attribute.add_argument("--output-dir", default="runs/attribute", help="folder for the graph files")
    attribute.add_argument("--store", help="activation store: adds feature cards and labels to the graph")
    attribute.add_argument(
        "--node-threshold", type=float, default=0.8, help="keep nodes holding this fraction of influence (default: 0.8)"
    )
    attribute.add_argument(
        "--edge-threshold",
        type=float,
        default=0.98,
        help="keep edges holding this fraction of influence (default: 0.98)",
    )
    attribute.add_argument("--labeller", help=_LABELLER_HELP)
    attribute.add_argument("--config", help="YAML/JSON file of attribution options")
    add_config_arguments(attribute, AttributionConfig)

    steer = _subcommand(sub, cmd_steer, [common])
    steer.add_argument("--prompt", help="the text to intervene on (BOS is prepended); or give --graph")
    steer.add_argument("--graph", help="a graph.json from `clt attribute`: its prompt, and the nodes --nodes names")
    steer.add_argument(
        "--nodes",
        help="node ids (feature:LAYER:POS:FEATURE), supernode ids (supernode:N) or 'pinned', comma-separated",
    )
    steer.add_argument("--state", help="the graph page's saved state: a JSON file or the page URL (#state=...)")
    steer.add_argument("--features", help="LAYER:POS:FEATURE triples, e.g. 3:5:12,4:5:7 (model layers)")
    steer.add_argument("--output", help="write the result as JSON to this file")
    steer.add_argument("--config", help="YAML/JSON file of intervention options")
    add_config_arguments(steer, InterventionConfig)

    features = _subcommand(sub, cmd_features, [common])
    features.add_argument("--store", required=True, help="activation store folder (with token ids)")
    features.add_argument(
        "--features", type=_feature_list, help="LAYER:FEATURE pairs, e.g. 0:12,3:7 (default: every feature that fires)"
    )
    features.add_argument("--top-k", type=int, default=8, help="top activating contexts per feature (default: 8)")
    features.add_argument("--max-tokens", type=int, help="store tokens to scan (default: all)")
    features.add_argument("--figures", type=int, default=10, help="HTML cards to write (default: 10)")
    features.add_argument("--output-dir", default="runs/features", help="folder for cards.json and HTML cards")
    features.add_argument("--labeller", help=_LABELLER_HELP)

    demo = _subcommand(sub, cmd_demo)
    demo.add_argument("--output-dir", default="runs/demo", help="folder for the store, transcoder and graph")
    demo.add_argument(
        "--max-tokens", type=int, default=8_000, help="tokens to extract for the feature cards (default: 8000)"
    )
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or path (default: {DEFAULT_MODEL})")
    demo.add_argument("--num-features", type=int, help="transcoder features per layer (default: the recipe's)")
    demo.add_argument("--training-steps", type=int, help="training steps (default: 250)")
    demo.add_argument("--batch-size", type=int, help="tokens per training step (default: the recipe's)")
    demo.add_argument("--labeller", help=_LABELLER_HELP)
    return parser


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, RuntimeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `clt` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 logs
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except EXPECTED_ERRORS as err:
        if args.verbose:
            raise
        sys.stderr.write(f"clt {args.command}: error: {err}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; a disk store or checkpoint written so far is kept and resumable\n")
        return 130


def _exit_rank(code: int) -> None:
    """End a torchrun rank without Python's shutdown: gloo's worker threads may still release the
    last collective's tensors then and abort the process (pytorch/pytorch#179291). Everything is
    written (atomically) by now; only the interpreter's teardown is skipped."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)


def console() -> None:
    """The `clt` console script (and `python -m clt.cli`): `main`, then the process's exit."""
    status = main()
    _exit_rank(status)
    raise SystemExit(status)


if __name__ == "__main__":
    console()
