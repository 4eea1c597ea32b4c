"""`simsearch index`: build and save the FAISS index of a store (index.faiss, index.json)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from simsearch.errors import SimsearchError
from simsearch.index import build_index, save_index
from simsearch.store import Store


def index(cfg: DictConfig) -> dict[str, Any]:
    """Build and save `index.faiss` (and `index.json`) for the store in run.dir."""
    store = Store.open(cfg.run.dir)
    built, info = build_index(store, cfg.index, cfg.run.seed)
    try:
        save_index(built, info, store.dir)
    except RuntimeError as error:  # FAISS's own write errors (a full disk)
        raise SimsearchError(f"cannot save the index in {store.dir}: {str(error).strip().splitlines()[-1]}") from None
    print(f"index {info['factory']} over {info['ntotal']} vectors (dim {info['dim']}) built in "
          f"{info['build_seconds']:.2f} s: {store.dir / 'index.faiss'}")
    return info


