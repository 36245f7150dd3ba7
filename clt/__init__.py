"""clt: circuit tracing with cross-layer transcoders — extract, train, attribute, visualise."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_dictionary"]


def __getattr__(name: str) -> Any:
    """`clt.load_dictionary` without importing torch and the models stage on `import clt`."""
    if name == "load_dictionary":
        from clt.models.dictionaries import load_dictionary

        return load_dictionary
    raise AttributeError(f"module 'clt' has no attribute {name!r}")
