"""The README's Python quickstart runs as written (on the tiny model, in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python quickstart"
    monkeypatch.chdir(tmp_path)
    code = "\n".join(blocks).replace('"smollm2-135m"', '"tiny-llama"')
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "clt" / "final" / "model.safetensors").is_file()


def test_every_repository_path_the_readme_cites_exists():
    """Paths such as `experiments/...yaml` or `docs/...png` in the README point at files of the repository."""
    root = README.parent
    cited = set(re.findall(r"(?<![\w/.-])((?:experiments|docs|notebooks|clt|tests)/[\w./-]*\w)", README.read_text()))
    assert cited, "the README cites no repository path"
    missing = sorted(path for path in cited if not (root / path).exists())
    assert not missing, f"the README cites paths that do not exist: {missing}"
