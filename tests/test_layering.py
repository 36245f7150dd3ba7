"""Imports flow one way: a module imports only its own stage or earlier ones (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clt"
STAGES = (
    "files",
    "config",
    "data",
    "store",
    "models",
    "sparse",
    "nnsight",
    "training",
    "attribution",
    "interp",
    "viz",
    "pipeline",
    "cli",
)
"""The stages in import order (DESIGN.md): extract → store → train → attribute → show."""


def stage_of(module: str) -> str | None:
    """The stage of a dotted module name inside the package ('clt.store.reader' -> 'store')."""
    parts = module.split(".")
    if parts[0] != "clt" or len(parts) < 2:
        return None
    return parts[1]


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module's source, at any depth."""
    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names if stage_of(name) is None]
    return found


def back_edges(root: Path) -> list[str]:
    """'file:line imports a later stage' for every import of a later stage under `root`."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("clt", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        own = stage_of(module)
        if own is None:  # clt/__init__.py
            continue
        for line, name in imported_modules(path.read_text(), module):
            other = stage_of(name)
            if other in STAGES and STAGES.index(other) > STAGES.index(own):
                problems.append(f"{path.relative_to(root.parent)}:{line} ({own}) imports {name} ({other})")
    return problems


def test_every_package_module_belongs_to_a_stage():
    stages = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("__")}
    stages -= {"py.typed"}
    assert stages <= set(STAGES), f"modules of no stage: {sorted(stages - set(STAGES))}; add them to STAGES"


def test_no_module_imports_a_later_stage():
    problems = back_edges(PACKAGE)
    assert not problems, "imports against the data flow:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "planted",
    [
        "from clt.training.trainer import CLTTrainer\n",
        "def lazy():\n    from clt.viz import graph_figure\n",
        "import clt.attribution.graph\n",
        "from ..training import metrics\n",
    ],
)
def test_a_planted_back_edge_is_found(tmp_path, planted):
    """The check fails on a store module that imports training (eagerly, lazily, absolutely or relatively)."""
    root = tmp_path / "clt"
    (root / "store").mkdir(parents=True)
    (root / "store" / "reader.py").write_text("import torch\nfrom clt.config import CLTConfig\n" + planted)
    assert back_edges(root) and all("(store) imports" in p for p in back_edges(root))
    (root / "store" / "reader.py").write_text("import torch\nfrom clt.config import CLTConfig\n")
    assert back_edges(root) == []
