"""simsearch: content-based image similarity search with ResNet-50 embeddings, FAISS and Lightning.

The Python API lives in `simsearch.api`: `simsearch.open(run_dir)` and `simsearch.extract(...)` return a
`Store` to search and evaluate. It is imported on first use, so `import simsearch` stays cheap (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["open", "extract", "Store", "Results", "SimsearchError"]


def open(run_dir: str | Path, *overrides: str, verify: bool | str = True) -> Any:  # noqa: A001 - the API's name
    """Open the store in `run_dir` for search and evaluation: see `simsearch.api.open`."""
    from simsearch import api

    return api.open(run_dir, *overrides, verify=verify)


def extract(*overrides: str, **keywords: Any) -> Any:
    """Embed a folder or dataset into a store and open it: see `simsearch.api.extract`."""
    from simsearch import api

    return api.extract(*overrides, **keywords)


def __getattr__(name: str) -> Any:
    if name in ("Store", "Results"):
        from simsearch import api

        return getattr(api, name)
    if name == "SimsearchError":
        from simsearch.errors import SimsearchError

        return SimsearchError
    raise AttributeError(f"module 'simsearch' has no attribute {name!r}")

