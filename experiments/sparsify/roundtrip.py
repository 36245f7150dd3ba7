"""sparsify's side of the format round trips (run with the sparsify venv's python; no clt import).

    python roundtrip.py train DATA OUT --features F --k K --steps N [--variants transcoder,skip,sae]
    python roundtrip.py run FOLDER DATA RESULT

``DATA``: safetensors with ``inputs``/``outputs`` [T, L, d] (float32) and ``layers`` [L] (model
layer indices). ``train`` trains, for each variant (``transcoder``, ``skip``: a skip transcoder,
``sae``: an autoencoder of the MLP inputs), one ``SparseCoder`` per layer m for N steps with
sparsify's own forward, FVU loss and Adam (the inner loop of ``Trainer.fit``, as
sparsify_steps.py) and saves it with ``save_to_disk`` to ``OUT/VARIANT/layers.{m}.mlp`` (an SAE:
``OUT/sae/layers.{m}.post_attention_layernorm``). ``run`` loads every folder of coders under
FOLDER with ``SparseCoder.load_many(folder, local=True)``, runs each coder on the inputs of its
layer (the first number of its hookpoint) and saves ``{path}.features`` [T, F] (its top-k
activations scattered into the latent dimension) and ``{path}.reconstruction`` [T, d] to RESULT
(path: the coder's folder relative to FOLDER).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig


def train(args: argparse.Namespace) -> None:
    for variant in args.variants.split(","):
        _train(args, variant)


def _train(args: argparse.Namespace, variant: str) -> None:
    data = load_file(args.data)
    torch.manual_seed(args.seed)
    xs, ys = data["inputs"], data["outputs"]
    d = xs.shape[-1]
    autoencode = variant == "sae"
    cfg = SparseCoderConfig(
        num_latents=args.features, k=args.k, skip_connection=variant == "skip", transcode=not autoencode
    )
    for i, m in enumerate(data["layers"].tolist()):
        x, y = xs[:, i].contiguous(), (xs if autoencode else ys)[:, i].contiguous()
        sae = SparseCoder(d, cfg, device="cpu", dtype=torch.float32)
        with torch.no_grad():  # Trainer.fit's bias initialisation from the first batch
            sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0)
            sae.W_dec.data += 0.1 * torch.randn_like(sae.W_dec)  # a transcoder's zero decoder would learn slowly
        optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
        for step in range(args.steps):
            rows = torch.randint(0, len(x), (args.batch,), generator=torch.Generator().manual_seed(step))
            out = sae(x=x[rows], y=y[rows], dead_mask=None)
            out.fvu.backward()
            optimizer.step()
            optimizer.zero_grad()
        sae.save_to_disk(f"{args.out}/{variant}/layers.{m}.{'post_attention_layernorm' if autoencode else 'mlp'}")
        print(f"{variant} layer {m}: fvu {float(out.fvu):.4f}")


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    data = load_file(args.data)
    index = {m: i for i, m in enumerate(data["layers"].tolist())}
    root = Path(args.folder)
    result = {}
    for folder in sorted({p.parent.parent for p in root.rglob("cfg.json")}):
        for name, sae in SparseCoder.load_many(str(folder), local=True).items():
            x = data["inputs"][:, index[int(re.search(r"\d+", name).group())]].contiguous()
            top_acts, top_indices, _ = sae.encode(x)
            path = (folder / name).relative_to(root).as_posix()
            result[f"{path}.features"] = torch.zeros(len(x), sae.num_latents).scatter_(-1, top_indices, top_acts)
            result[f"{path}.reconstruction"] = sae(x).sae_out
    save_file(result, args.result)
    print(f"ran {len(result) // 2} coders")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("data")
    t.add_argument("out")
    t.add_argument("--features", type=int, required=True)
    t.add_argument("--k", type=int, required=True)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--variants", default="transcoder", help="comma-separated: transcoder, skip, sae")
    r = sub.add_parser("run")
    r.add_argument("folder")
    r.add_argument("data")
    r.add_argument("result")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train(args) if args.command == "train" else run(args)


if __name__ == "__main__":
    main()
