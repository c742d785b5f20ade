"""`data.source: <scheme>:<name>` readers (`torchvision:CIFAR10`), registered by scheme.

A reader registers itself with `@register_scheme("name")` on a class whose `folder(source,
layout)` says where the source's ImageFolder lives and `materialize(source, layout)` writes
it there first when needed (downloads once). Modules `data/<anything>_source.py` are found
by themselves. A new scheme: such a module, plus its name (and the names it serves) in
`dataconfig.SOURCE_SCHEMES`, which checks `data.source` before any work.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Protocol

from visionflow.core.dataconfig import source_scheme
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout


class SchemeReader(Protocol):
    def folder(self, source: str, layout: Layout) -> Path: ...

    def materialize(self, source: str, layout: Layout) -> Path: ...


_READERS: dict[str, SchemeReader] = {}


def register_scheme(name: str):
    """Class decorator: an instance of the class reads `name:` sources."""

    def deco(cls: type) -> type:
        if name in _READERS:
            raise ValueError(f"data source scheme '{name}' is already registered")
        _READERS[name] = cls()
        return cls

    return deco


def registered_schemes() -> list[str]:
    import visionflow.data as package

    for mod in pkgutil.iter_modules(package.__path__):  # each registers its own scheme
        if mod.name.endswith("_source"):
            importlib.import_module(f"{package.__name__}.{mod.name}")
    return sorted(_READERS)


def reader(source: str) -> SchemeReader | None:
    """The reader of a `<scheme>:<name>` source (None for a folder or archive path); an
    unregistered scheme: one line naming the registered ones."""
    parsed = source_scheme(source)
    if parsed is None:
        return None
    known = registered_schemes()
    if parsed[0] not in _READERS:
        raise DataError(f"data.source={source}: unknown source scheme {parsed[0]!r}, choose "
                        f"from {', '.join(known)} (or give a folder or archive path)")
    return _READERS[parsed[0]]
