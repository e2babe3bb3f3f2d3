"""Pieces shared by the commands: settings flags generated from the settings model, and
the registry with the global --models file."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..settings import FIELDS


def settings_options(*names: str, helps: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--name`` flags for these settings fields; values stay None unless given, and are
    validated by settings.coerce, never here, so a flag is parsed in one place only. ``helps``
    replaces a field's help where a command gives it another default."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            field = FIELDS[name]
            flags = [f"--{name.replace('_', '-')}", *([field.short] if field.short else [])]
            fn = click.option(*flags, name, default=None, metavar=(field.type.__name__.upper() + ("|auto" if field.auto else ""))
                              if not field.choices else "|".join(field.choices), help=(helps or {}).get(name, field.help))(fn)
        return fn

    return decorate


def cli_settings(kwargs: dict[str, Any], *names: str) -> dict[str, Any]:
    """Pop the settings flags out of a command's kwargs, leaving the command's own options."""
    return {name: kwargs.pop(name) for name in names if name in kwargs}


def load_registry(ctx: click.Context) -> Any:
    from pathlib import Path

    from .. import registry

    models_file = (ctx.find_root().obj or {}).get("models_file")
    return registry.load(Path(models_file) if models_file else None)
