"""SAELens's side of the format round trips (run with the SAELens venv's python; no clt import).

    python roundtrip.py create OUT --arch ARCH[,...] --d-in D --d-sae F --layers 0,2 [--k K] [--rescale]
    python roundtrip.py train DATA OUT --arch ARCH[,ARCH...] --d-sae F [--k K] [--steps N]
    python roundtrip.py run FOLDER DATA RESULT

``create`` builds, for each architecture, one SAE per layer m with SAELens's own classes
(``StandardSAE``, ``TopKSAE``, ``JumpReLUSAE``, ``Transcoder``, ``SkipTranscoder``,
``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``), gives every parameter seeded random values
(biases, thresholds and skip weights included, so a reader that drops one fails) and saves it with
``SAE.save_model`` to ``OUT/ARCH/blocks.{m}.ln2.hook_normalized`` (``metadata.hook_name``: the MLP
input in TransformerLens). ``train`` trains SAELens's training SAEs (``standard``, ``topk``,
``jumprelu``, ``batchtopk``) on the MLP inputs [T, L, d] of DATA for N steps with their own
``training_forward_pass`` loss and Adam (the inner step of SAELens's trainer), then saves each with
``save_inference_model`` (BatchTopK becomes a JumpReLU SAE there). ``run`` loads every SAE folder
under FOLDER (``cfg.json`` at any depth) with ``SAE.load_from_disk``, runs ``encode`` and
``forward`` on the inputs [T, L, d] of DATA (safetensors with ``inputs`` and ``layers``) at the
layer of its ``metadata.hook_name`` and saves ``{path}.features`` and ``{path}.reconstruction`` to
RESULT (path: the folder relative to FOLDER).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

CLASSES = {
    "standard": "StandardSAE",
    "topk": "TopKSAE",
    "jumprelu": "JumpReLUSAE",
    "transcoder": "Transcoder",
    "skip_transcoder": "SkipTranscoder",
    "jumprelu_transcoder": "JumpReLUTranscoder",
    "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder",
}


@torch.no_grad()
def create(args: argparse.Namespace) -> None:
    for arch in args.arch.split(","):
        _create(args, arch)
    print(f"created {args.arch} SAEs in {args.out}")


def _create(args: argparse.Namespace, arch: str) -> None:
    cls = getattr(sae_lens, CLASSES[arch])
    cfg_cls = getattr(sae_lens, CLASSES[arch] + "Config")
    gen = torch.Generator().manual_seed(args.seed)
    transcoder = "transcoder" in arch
    for m in [int(v) for v in args.layers.split(",")]:
        kw = {"d_in": args.d_in, "d_sae": args.d_sae}
        kw |= {"d_out": args.d_in, "apply_b_dec_to_input": False} if transcoder else {"apply_b_dec_to_input": True}
        kw |= {"k": args.k, "rescale_acts_by_decoder_norm": args.rescale} if arch == "topk" else {}
        cfg = cfg_cls(**kw)
        cfg.metadata.hook_name = f"blocks.{m}.ln2.hook_normalized"
        cfg.metadata.model_name = "tiny-llama"
        sae = cls(cfg)
        for name, p in sae.named_parameters():
            scale = {"W_enc": args.d_in**-0.5, "W_dec": args.d_sae**-0.5, "W_skip": 0.1 * args.d_in**-0.5}.get(
                name, 0.3
            )
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.3)
        sae.save_model(Path(args.out) / arch / cfg.metadata.hook_name)


TRAINING = {
    "standard": "StandardTrainingSAE",
    "topk": "TopKTrainingSAE",
    "jumprelu": "JumpReLUTrainingSAE",
    "batchtopk": "BatchTopKTrainingSAE",
}


def train(args: argparse.Namespace) -> None:
    from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput

    data = load_file(args.data)
    torch.manual_seed(args.seed)
    for arch in args.arch.split(","):
        cls = getattr(sae_lens, TRAINING[arch])
        for i, m in enumerate(data["layers"].tolist()):
            x = data["inputs"][:, i].contiguous()
            kw = {"d_in": x.shape[-1], "d_sae": args.d_sae}
            kw |= {"k": args.k} if arch in ("topk", "batchtopk") else {}
            cfg = getattr(sae_lens, TRAINING[arch] + "Config")(**kw)
            cfg.metadata.hook_name = f"blocks.{m}.ln2.hook_normalized"
            sae = cls(cfg)
            optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
            for step in range(args.steps):
                rows = torch.randint(0, len(x), (args.batch,), generator=torch.Generator().manual_seed(step))
                coefficients = {
                    name: c.value if isinstance(c, TrainCoefficientConfig) else c
                    for name, c in sae.get_coefficients().items()
                }
                out = sae.training_forward_pass(
                    TrainStepInput(x[rows], coefficients, dead_neuron_mask=None, n_training_steps=step,
                                   is_logging_step=False)
                )  # fmt: skip
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            sae.save_inference_model(Path(args.out) / arch / cfg.metadata.hook_name)
            print(f"{arch} layer {m}: loss {out.loss.item():.4f}")


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    data = load_file(args.data)
    index = {m: i for i, m in enumerate(data["layers"].tolist())}
    result = {}
    root = Path(args.folder)
    folders = sorted(p.parent for p in root.rglob("cfg.json"))
    for folder in folders:
        sae = SAE.load_from_disk(folder)
        layer = int(re.search(r"\d+", sae.cfg.metadata.hook_name or folder.name).group())
        x = data["inputs"][:, index[layer]].contiguous()
        name = folder.relative_to(root).as_posix()
        result[f"{name}.features"] = sae.encode(x)
        result[f"{name}.reconstruction"] = sae(x)
    save_file(result, args.result)
    print(f"ran {len(folders)} SAEs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create")
    c.add_argument("out")
    c.add_argument("--arch", required=True, help=f"comma-separated, of {sorted(CLASSES)}")
    c.add_argument("--d-in", type=int, required=True)
    c.add_argument("--d-sae", type=int, required=True)
    c.add_argument("--layers", default="0")
    c.add_argument("--k", type=int, default=4)
    c.add_argument("--rescale", action="store_true", help="TopK: rescale_acts_by_decoder_norm")
    c.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train")
    t.add_argument("data")
    t.add_argument("out")
    t.add_argument("--arch", required=True, help=f"comma-separated, of {sorted(TRAINING)}")
    t.add_argument("--d-sae", type=int, required=True)
    t.add_argument("--k", type=int, default=4)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("folder")
    r.add_argument("data")
    r.add_argument("result")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"create": create, "train": train, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
