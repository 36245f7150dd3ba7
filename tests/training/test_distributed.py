"""Distributed training (gloo, 2 spawned CPU processes) against one-process training on the same batches.

One spawn runs every 2-rank scenario (each rank imports torch once); the parent then compares the
results with one-process runs. Data parallel and feature sharding must give the same weights and
logged losses within 1e-5; checkpoints resume across world sizes; a killed rank leaves a loadable
checkpoint; mismatched set-ups fail on every rank with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.models.transcoder import CrossLayerTranscoder
from clt.store import ActivationStore
from clt.training.checkpoint import list_checkpoints
from clt.training.collectives import Dist, DistributedError, run_local
from clt.training.distributed import split_problems
from clt.training.trainer import CLTTrainer

TOL = 1e-5
LOGGED = ("total", "reconstruction", "sparsity", "preactivation", "fvu", "l0", "dead_fraction", "grad_norm")

# name: (parallel, transcoder options)
SCENARIOS = {
    "data-relu-clt": ("data", {"activation_fn": "relu"}),
    "data-jumprelu-plt": ("data", {"activation_fn": "jumprelu", "cross_layer": False}),
    "data-topk": ("data", {"activation_fn": "topk", "sparse_decode": "on"}),
    "data-batchtopk-sparse": ("data", {"activation_fn": "batchtopk", "sparse_decode": "on"}),
    "data-batchtopk-dense-all": (
        "data",
        {"activation_fn": "batchtopk", "sparse_decode": "off", "batchtopk_scope": "all"},
    ),
    "features-relu-clt": ("features", {"activation_fn": "relu", "skip_connection": True}),
    "features-jumprelu-clt": ("features", {"activation_fn": "jumprelu"}),
    "features-jumprelu-plt": ("features", {"activation_fn": "jumprelu", "cross_layer": False}),
    "features-topk-sparse": ("features", {"activation_fn": "topk", "sparse_decode": "on"}),
    "features-topk-dense": ("features", {"activation_fn": "topk", "sparse_decode": "off"}),
    "features-topk-k-above-shard": ("features", {"activation_fn": "topk", "topk": 10}),  # k > F/W = 8
    "features-batchtopk-sparse": ("features", {"activation_fn": "batchtopk", "sparse_decode": "on"}),
    "features-batchtopk-dense-plt": (
        "features",
        {"activation_fn": "batchtopk", "sparse_decode": "off", "cross_layer": False},
    ),
}


def make_store(n: int = 512, layers: int = 2, d: int = 8) -> ActivationStore:
    """Random MLP inputs and outputs with a planted sparse linear relation (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, layers, d, generator=g)
    mix = torch.randn(layers, d, d, generator=g) / d**0.5
    y = torch.relu(torch.einsum("nld,lde->nle", x, mix) - 0.3) + 0.1 * torch.randn(n, layers, d, generator=g)
    return ActivationStore.from_nnsight_activations({"inputs": x, "outputs": y}, batch_size=64)


def clt_config(**options) -> CLTConfig:
    return CLTConfig(**{"num_features": 16, "num_layers": 2, "d_model": 8, "topk": 3, **options})


def training_config(parallel: str = "data", **options) -> TrainingConfig:
    values = {
        "learning_rate": 1e-2,
        "batch_size": 64,
        "grad_accumulation_steps": 2,
        "training_steps": 6,
        "lr_warmup_steps": 1,
        "sparsity_lambda": 1e-2,
        "sparsity_warmup_steps": 2,
        "dead_after_tokens": 10**9,
        "log_every": 1,
        "grad_clip_norm": 0.5,
        "parallel": parallel,
        "dist_timeout_s": 30,
        "retain_freed_memory": False,
    }
    return TrainingConfig(**{**values, **options})


def resume_config(folder: Path, parallel: str = "features", **options) -> TrainingConfig:
    return training_config(parallel, training_steps=10, checkpoint_every=4, output_dir=str(folder), **options)


def stop_at(step: int):
    def callback(at: int, metrics: dict) -> None:
        if at == step:
            raise KeyboardInterrupt

    return callback


def write_result(folder: Path, model: torch.nn.Module, history: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    (folder / "history.json").write_text(json.dumps(history))


# ------------------------------------------------------------------------------ the 2-rank side


def _job_all(rank: int, out: Path) -> None:
    store = make_store()
    for name, (parallel, options) in SCENARIOS.items():
        trainer = CLTTrainer(clt_config(**options), training_config(parallel), store)
        model = trainer.train(progress=False)
        if rank == 0:
            write_result(out / name, model, trainer.history)
    bad = {
        "features-not-divisible": (clt_config(num_features=15), training_config("features")),
        "batch-not-divisible": (clt_config(), training_config("data", batch_size=66)),
        "configs-differ": (clt_config(), training_config("data", learning_rate=1e-2 * (1 + rank))),
    }
    for name, (cfg, training) in bad.items():
        try:
            CLTTrainer(cfg, training, store)
            message = "no error"
        except DistributedError as err:
            message = str(err)
        (out / f"{name}.{rank}.txt").write_text(message)
    with contextlib.suppress(
        KeyboardInterrupt
    ):  # 2 ranks write checkpoints 4 (and stop at 6); one process resumes them (parent)
        CLTTrainer(
            clt_config(activation_fn="jumprelu"), resume_config(out / "two-to-one"), store, callbacks=[stop_at(6)]
        ).train(progress=False)
    trainer = CLTTrainer(clt_config(activation_fn="topk", sparse_decode="on"), resume_config(out / "one-to-two"), store)
    (out / f"one-to-two.start.{rank}.txt").write_text(str(trainer.step))
    model = trainer.train(progress=False)
    if rank == 0:
        write_result(out / "one-to-two-result", model, trainer.history)


def _job_kill(rank: int, out: Path) -> None:
    def die(step: int, metrics: dict) -> None:
        if step == 6 and rank == 1:
            os._exit(3)

    CLTTrainer(clt_config(activation_fn="relu"), resume_config(out / "killed"), make_store(), callbacks=[die]).train(
        progress=False
    )


JOBS = {"all": _job_all, "kill": _job_kill}


def spawn(job: str, out: Path, timeout: float = 150.0) -> None:
    """Run `job` on 2 spawned gloo ranks; raises if one fails or it runs past `timeout`."""
    run_local(JOBS[job], (out,), world_size=2, timeout_s=timeout)


# ------------------------------------------------------------------------------ the parent side


def single(cfg: CLTConfig, training: TrainingConfig, **kw) -> CLTTrainer:
    trainer = CLTTrainer(cfg, training, make_store(), **kw)
    trainer.train(progress=False)
    return trainer


def max_weight_error(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    reference = model.state_dict()
    assert sorted(weights) == sorted(reference)
    return max(
        float((weights[k].double() - reference[k].double()).abs().max()) for k in reference if reference[k].numel()
    )


def max_metric_error(history: list[dict], reference: list[dict]) -> float:
    assert [h["step"] for h in history] == [h["step"] for h in reference]
    return max(abs(h[k] - r[k]) / max(1.0, abs(r[k])) for h, r in zip(history, reference) for k in LOGGED if k in r)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    with contextlib.suppress(KeyboardInterrupt):  # the 1-process half of the 1 -> 2 resume: checkpoint 4, stopped at 6
        single(
            clt_config(activation_fn="topk", sparse_decode="on"),
            resume_config(out / "one-to-two"),
            callbacks=[stop_at(6)],
        )
    spawn("all", out)
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process(two_ranks, name):
    _, options = SCENARIOS[name]
    reference = single(clt_config(**options), training_config())
    weights = load_file(str(two_ranks / name / "weights.safetensors"))
    history = json.loads((two_ranks / name / "history.json").read_text())
    assert max_weight_error(weights, reference.model) < TOL
    assert max_metric_error(history, reference.history) < TOL
    initial = CrossLayerTranscoder(clt_config(**options)).W_enc.detach()
    moved = float((weights["W_enc"] - initial).abs().max())
    assert moved > 1e-3  # training changed the weights: the comparison is not vacuous


@pytest.mark.parametrize(
    "name,expected",
    [
        ("features-not-divisible", "num_features=15 is not divisible by the world size 2"),
        ("batch-not-divisible", "micro-batch of 33 rows"),
        ("configs-differ", "the ranks disagree"),
    ],
)
def test_mismatched_setups_fail_on_every_rank(two_ranks, name, expected):
    for rank in (0, 1):
        assert expected in (two_ranks / f"{name}.{rank}.txt").read_text()


def test_feature_sharding_refuses_fp16_loss_scaling():
    """Each rank's GradScaler would skip steps on its own and the replicated parameters would drift."""
    cfg = CLTConfig(num_features=16, num_layers=2, d_model=8)
    sharded, data = Dist(rank=0, world_size=2, mode="features"), Dist(rank=0, world_size=2, mode="data")
    assert "does not support mixed_precision='fp16'" in split_problems(sharded, cfg, 64, "fp16")[0]
    assert split_problems(sharded, cfg, 64, "bf16") == [] and split_problems(data, cfg, 64, "fp16") == []


def test_checkpoint_of_two_ranks_resumes_in_one_process(two_ranks):
    folder = two_ranks / "two-to-one"
    assert [p.name for p in list_checkpoints(folder / "checkpoints")] == ["step_00000004"]
    cfg = clt_config(activation_fn="jumprelu")
    resumed = CLTTrainer(cfg, resume_config(folder), make_store())
    assert resumed.step == 4
    resumed.train(progress=False)
    whole = single(cfg, resume_config(two_ranks / "two-to-one-whole"))
    assert max_weight_error(whole.model.state_dict(), resumed.model) < TOL
    assert max_metric_error(resumed.history, whole.history) < TOL


def test_checkpoint_of_one_process_resumes_on_two_ranks(two_ranks):
    assert [(two_ranks / f"one-to-two.start.{r}.txt").read_text() for r in (0, 1)] == ["4", "4"]
    whole = single(clt_config(activation_fn="topk", sparse_decode="on"), resume_config(two_ranks / "one-to-two-whole"))
    weights = load_file(str(two_ranks / "one-to-two-result" / "weights.safetensors"))
    assert max_weight_error(weights, whole.model) < TOL
    history = json.loads((two_ranks / "one-to-two-result" / "history.json").read_text())
    assert max_metric_error(history, whole.history) < TOL


def test_killed_rank_leaves_a_resumable_checkpoint(tmp_path):
    with pytest.raises((torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException)):
        spawn("kill", tmp_path, timeout=90)
    assert [p.name for p in list_checkpoints(tmp_path / "killed" / "checkpoints")] == ["step_00000004"]
    cfg = clt_config(activation_fn="relu")
    resumed = CLTTrainer(cfg, resume_config(tmp_path / "killed"), make_store())
    assert resumed.step == 4
    resumed.train(progress=False)
    whole = single(cfg, resume_config(tmp_path / "whole"))
    assert max_weight_error(whole.model.state_dict(), resumed.model) < TOL


def test_cli_train_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m clt.cli train --store ...`: one summary, one log, the same
    transcoder as one process."""
    import subprocess
    import sys

    make_store().save(tmp_path / "store")
    options = (
        "--num-features 16 --activation-fn relu --batch-size 32 --training-steps 4 --log-every 2 --parallel features"
    )
    flags = ["train", "--store", str(tmp_path / "store"), *options.split()]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "clt.cli",
            *flags,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("FVU") == 1
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]
    from clt.cli import main

    assert main([*flags, "--output-dir", str(tmp_path / "one")]) == 0
    two = CrossLayerTranscoder.from_pretrained(tmp_path / "two" / "transcoder")
    one = CrossLayerTranscoder.from_pretrained(tmp_path / "one" / "transcoder")
    assert max_weight_error(two.state_dict(), one) < TOL


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "experiments" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_realistic_run_configs_are_valid(path):
    """Every run config in experiments/configs/ is valid; the distributed ones say how to launch them."""
    import yaml

    from clt.config.extraction import ExtractionConfig

    values = yaml.safe_load(path.read_text())
    assert sorted(values) == ["extraction", "training", "transcoder"]
    ExtractionConfig.from_dict(values["extraction"])
    training = TrainingConfig.from_dict(values["training"])
    cfg = CLTConfig.from_dict({"num_layers": 12, "d_model": 768, **values["transcoder"]})
    if "parallel" not in values["training"]:  # a one-process run (the recipe)
        return
    assert training.parallel in ("data", "features") and "torchrun --standalone" in path.read_text()
    assert training.parallel == "data" or cfg.num_features % 8 == 0
