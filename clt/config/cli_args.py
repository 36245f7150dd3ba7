"""Command-line options generated from a config dataclass: the CLI is a view of the configs."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from clt.config.base import ConfigBase, field_docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser_for(annotation: Any):
    text = str(annotation)
    if "list[int]" in text:
        return lambda value: [int(v) for v in value.replace(",", " ").split()]
    if "list[float]" in text:
        return lambda value: [float(v) for v in value.replace(",", " ").split()]
    if "bool" in text:
        return _parse_bool
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{value}'")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type[ConfigBase],
    *,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one option per config field (default None = keep the config's value), help from its docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        default = (defaults or {}).get(field.name, default)
        text = f"{docs.get(field.name, '')} (default: {default})"
        flag = {"nargs": "?", "const": True} if hints[field.name] is bool else {}  # `--stream` alone: true
        group.add_argument(
            _flag(field.name),
            dest=field.name,
            type=_parser_for(hints[field.name]),
            default=None,
            metavar=field.name.upper(),
            help=text.replace("%", "%%"),
            **flag,
        )


def config_from_args(cls: type[ConfigBase], args: argparse.Namespace, base: dict[str, Any] | None = None) -> ConfigBase:
    """A config from a YAML/JSON file's values (`base`) overridden by the options given."""
    values = dict(base or {})
    for name in cls.field_names():
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return cls.from_dict(values)
