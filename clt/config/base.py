"""Shared behaviour of the stage configs: dict/JSON/YAML round trips with typo detection."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

from clt.files import atomic_write_text

C = TypeVar("C", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says how to fix it."""


@dataclasses.dataclass
class ConfigBase:
    """Mixin for stage configs: `to_dict`, `from_dict` (rejects unknown keys), JSON and YAML."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain Python values."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the config's fields."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build a config, naming any unknown key and the closest known one."""
        if not isinstance(values, dict):
            raise ConfigError(f"{cls.__name__} expects a mapping, got {type(values).__name__}")
        known = cls.field_names()
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(known)}."
                raise ConfigError(f"{cls.__name__} has no option '{key}'.{hint}")
        return cls(**values)

    def subset(self, *names: str) -> dict[str, Any]:
        """The values of the fields `names`, by name (keyword arguments for the code a config drives)."""
        return {name: getattr(self, name) for name in names}

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON or YAML, chosen by the file suffix."""
        path = Path(path)
        text = (
            yaml.safe_dump(self.to_dict(), sort_keys=False)
            if path.suffix in (".yaml", ".yml")
            else json.dumps(self.to_dict(), indent=2)
        )
        atomic_write_text(text, path)
        return path

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read a config written by `save` (JSON or YAML)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        try:
            values = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.').upper()}: {err}") from err
        return cls.from_dict(values or {})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, by field name."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is ConfigBase:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs
