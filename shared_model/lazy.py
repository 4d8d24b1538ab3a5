"""PEP 562 lazy exports for the wings' `__init__.py`: a wing names its public API without importing
torch, Opacus or pycocoevalcap until a name that needs them is first used (a Flower message pays for
the imports it uses, no more)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, whose name N lives in its submodule `exports[N]`."""
    names = sorted(exports)

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
