"""Package namespaces that import their heavy parts on first use.

A package `__init__` re-exports its public names, so that `from imgcls.data import Batches`
works; importing the package should not cost what importing all of them does (torch and
torchvision take seconds, and `imgcls-hpo --help` needs none of them). So an `__init__` names
where each export lives and gets a module `__getattr__` that imports it when it is first asked
for (PEP 562), as Optuna does for its optional parts.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `exports` maps each public name to the module
    that defines it. The first lookup imports that module and keeps the name in the package,
    so later lookups cost nothing."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
