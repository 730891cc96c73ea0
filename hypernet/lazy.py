"""Lazy package exports (PEP 562): a package names its public API without importing it.

`hdb --help` and the CLI's parsers read light config modules inside packages whose public names
live beside torch and diffusers; importing those eagerly cost ~37 s of start-up on a busy
2-core machine. A package lists where each name lives and gets a module `__getattr__`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `homes[name]` (a module path) on first use."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
