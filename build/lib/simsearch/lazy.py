"""Heavy modules imported on first use, so that `simsearch search query=ID` never pays for torch."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for a module until one of its attributes is read; then imports it (once, like `import`).

    `torch = LazyModule("torch")` at the top of a file keeps `torch.cuda.is_available()` in its functions
    unchanged, while importing the file costs nothing: torch is in `sys.modules` only once used.
    """

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (imported)' if self._module is not None else ''}>"
