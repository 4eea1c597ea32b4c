"""`simsearch index`: build and save the FAISS index of a store (index.faiss, index.json), or publish the store
into its Milvus collection and keep it in step (index.backend=milvus)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from simsearch.errors import SimsearchError
from simsearch.index import build_index, check_backend, save_index
from simsearch.milvus import MilvusIndex
from simsearch.store import Store


def index(cfg: DictConfig) -> dict[str, Any]:
    """Build and save `index.faiss` (and `index.json`) for the store in run.dir."""
    store = Store.open(cfg.run.dir)
    if check_backend(cfg.index) == "milvus":
        report = MilvusIndex(store, cfg.index).publish()
        print(f"Milvus collection {report['collection']} at {report['uri']} in step with {report['count']} items: "
              f"{report['upserted']} upserted, {report['deleted']} deleted, {report['unchanged']} unchanged "
              f"({report['seconds']:.2f} s)")
        return report
    built, info = build_index(store, cfg.index, cfg.run.seed)
    try:
        save_index(built, info, store.dir)
    except RuntimeError as error:  # FAISS's own write errors (a full disk)
        raise SimsearchError(f"cannot save the index in {store.dir}: {str(error).strip().splitlines()[-1]}") from None
    print(f"index {info['factory']} over {info['ntotal']} vectors (dim {info['dim']}) built in "
          f"{info['build_seconds']:.2f} s: {store.dir / 'index.faiss'}")
    return info


