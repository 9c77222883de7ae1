"""Module-level ``__getattr__`` (PEP 562) that imports a package's public names on first use, so
tools that only read checkpoint metadata start without loading torch."""

import importlib
import sys


def lazy_names(package: str, where: dict[str, str]):
    """A ``__getattr__`` for ``package`` that imports ``name`` from the submodule ``where[name]``
    (relative, e.g. ``".models"``) and caches it in the package's namespace."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
