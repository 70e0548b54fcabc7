"""Lazy package exports: ``name -> submodule`` resolved on first attribute access.

Packages whose submodules differ in weight (torch, scipy) export their public names through
this, so ``import megareuse.<package>.<light module>`` never pays for the heavy ones.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, namespace: dict[str, Any], exports: dict[str, list[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """Returns (``__all__``, ``__getattr__``, ``__dir__``) for ``package`` whose module globals
    are ``namespace``; ``exports`` maps submodule names to the names they provide."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(module_of))

    return sorted(module_of), __getattr__, __dir__
