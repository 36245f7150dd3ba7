"""Shared fixtures: tiny random models (fixed seed) and, for `slow` tests, the default model."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny ops run much faster on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    """(name, model, tokenizer) for each tiny architecture."""
    from clt.nnsight.loading import load_model

    model, tokenizer = load_model(request.param)
    return request.param, model, tokenizer


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer) of the tiny Llama."""
    from clt.nnsight.loading import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default model, SmolLM2-135M (slow to load: ~15 s)."""
    from clt.nnsight.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def relu_gpt2():
    """A GPT-2 whose MLPs are y = W2 relu(W1 x + b1) + b2: a per-layer transcoder can equal it exactly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from clt.nnsight.loading import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=128,
        activation_function="relu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval(), tokenizer


@pytest.fixture(scope="session")
def exact_plt():
    """Builder of the per-layer ReLU transcoder that equals a ReLU GPT-2's MLPs exactly."""
    from clt.config.transcoder import CLTConfig
    from clt.models.transcoder import CrossLayerTranscoder

    def build(model):
        blocks = model.transformer.h
        d, F = model.config.n_embd, blocks[0].mlp.c_fc.weight.shape[1]
        plt = CrossLayerTranscoder(
            CLTConfig(num_features=F, num_layers=len(blocks), d_model=d, activation_fn="relu", cross_layer=False)
        )
        with torch.no_grad():
            for l, block in enumerate(blocks):
                plt.W_enc[l] = block.mlp.c_fc.weight.T  # Conv1D stores [in, out]
                plt.b_enc[l] = block.mlp.c_fc.bias
                plt.W_dec[l][:, 0] = block.mlp.c_proj.weight  # [F, d]
                plt.b_dec[l] = block.mlp.c_proj.bias
        return plt

    return build


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless Chromium; installed with apt (Debian package `chromium`) when missing."""
    import os
    import shutil
    import subprocess

    def find() -> str | None:
        return shutil.which("chromium") or shutil.which("chromium-browser")

    if find() is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
        ):
            subprocess.run(command, env=env, capture_output=True, timeout=900, check=False)
    path = find()
    if path is None:
        pytest.skip(
            "headless Chromium is missing and could not be installed here "
            "(install the Debian package `chromium` as root to run the rendering tests)"
        )
    return path


@pytest.fixture(scope="session")
def browser(chromium):
    """A headless Chromium driven by Playwright (real clicks and keys), launched from the system's
    Chromium (no `playwright install`); skipped when Playwright is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the `test` extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield browser
        browser.close()


_MARKER_PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = String(document.querySelectorAll('.scatterlayer .trace.scatter path.point').length);
  document.body.appendChild(pre);
}, 500); });
</script>"""


@pytest.fixture(scope="session")
def rendered_node_markers(chromium, tmp_path_factory):
    """Function: number of node markers Chromium draws for a graph HTML file (None if it did not render)."""
    import re
    import subprocess
    from pathlib import Path

    def count(html_file: Path) -> int | None:
        page = tmp_path_factory.mktemp("render") / "page.html"
        page.write_text(Path(html_file).read_text().replace("</head>", _MARKER_PROBE + "</head>", 1))
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=10000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
        found = re.search(r'<pre id="probe">(\d+)</pre>', dom)
        return int(found.group(1)) if found else None

    return count
