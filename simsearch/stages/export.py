"""`simsearch export`: the store in run.dir written to `export.dir` in `export.format` (`simsearch.export`:
clip-retrieval's img_emb/ + metadata/, or one Parquet table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from simsearch.export import write_export
from simsearch.store import Store


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write the store in run.dir to `export.dir` in `export.format`; returns what export.json records."""
    store = Store.open(cfg.run.dir)
    target = Path(cfg.export.dir).expanduser()
    record = write_export(store, target, cfg.export.format)
    print(f"exported {len(store)} vectors (dim {store.dim}) as {record['format']}: {target}")
    return record
