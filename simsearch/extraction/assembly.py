"""The store an extraction writes: which vectors come from the previous store and which from the shards
(a `Plan` by key), merged into embeddings.npy with bounded memory, with the items, the catalogue and the manifest."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from simsearch.catalogue import Catalogue, join, unmatched_records, write_metadata
from simsearch.config import save_config
from simsearch.data import ImageCollection
from simsearch.errors import SimsearchError
from simsearch.extraction.shards import embedding_dim, read_shard_keys
from simsearch.runtime import phase_bar
from simsearch.store import Store, finish_store

log = logging.getLogger(__name__)
COPY_CHUNK = 65_536  # reused rows copied per step: bounded memory for any store size
FREE_MARGIN_BYTES = 1 << 20  # beyond the vectors: labels, items, manifest of a small store


@dataclass
class Plan:
    """Where each item of the collection gets its vector: the previous store (by key), a shard of this
    run or of a killed one (by key), or nowhere yet (to embed). Unreadable items of the previous store
    are tried again: a file made readable by `chmod` keeps its key."""

    keys: list[str]
    previous_row: np.ndarray  # (N,) row in the previous store, -1 where none
    shard_of: np.ndarray  # (N,) number of the shard holding the item, -1 where none
    shard_row: np.ndarray  # (N,) row within that shard
    skip_reason: dict[int, str] = field(default_factory=dict)  # unreadable items, by position
    shards: list[Path] = field(default_factory=list)

    @classmethod
    def empty(cls, keys: list[str]) -> Plan:
        count = len(keys)
        return cls(keys, np.full(count, -1, np.int64), np.full(count, -1, np.int64), np.full(count, -1, np.int64))

    def done(self) -> np.ndarray:
        skipped = np.zeros(len(self.keys), dtype=bool)
        skipped[list(self.skip_reason)] = True
        return (self.previous_row >= 0) | (self.shard_of >= 0) | skipped

    def reuse_previous(self, previous: Store) -> None:
        position_of = {key: position for position, key in enumerate(self.keys)}
        for row, item in enumerate(previous.items):
            position = position_of.get(item.get("key"))
            if position is not None:
                self.previous_row[position] = row

    def add_shards(self, shards: list[Path]) -> None:
        position_of = {key: position for position, key in enumerate(self.keys)}
        for path in shards:
            number = len(self.shards)
            self.shards.append(path)
            keys, valid, reasons = read_shard_keys(path)
            for row, (key, ok, reason) in enumerate(zip(keys, valid.tolist(), reasons)):
                position = position_of.get(key)  # keys of items no longer in the collection are dropped
                if position is None or self.shard_of[position] >= 0 or self.previous_row[position] >= 0:
                    continue  # the sampler's padding duplicates and items done already
                if ok:
                    self.shard_of[position], self.shard_row[position] = number, row
                    self.skip_reason.pop(position, None)
                else:
                    self.skip_reason[position] = reason or "unreadable"


def reusable_store(store_dir: Path, fingerprint: dict[str, str]) -> Store | None:
    """The complete store already in run.dir, if its vectors can be reused by key (same fingerprint)."""
    if not (store_dir / "manifest.json").is_file():
        return None
    try:
        previous = Store.open(store_dir)
    except SimsearchError as error:
        log.warning("the store in %s cannot be reused (%s): every item is embedded again", store_dir, error)
        return None
    if previous.manifest.get("fingerprint") != fingerprint:
        log.info("the store in %s was made with another model or data source: it is replaced", store_dir)
        return None
    return previous


def merge_vectors(plan: Plan, previous: Store | None, dim: int, dtype: str, out_path: Path) -> np.ndarray:
    """Write `out_path` (.npy, rows in collection order, unreadable items left out) from the previous
    store's rows and the shards' rows; returns the positions written. Streams: one shard, or one chunk
    of reused rows, in memory at a time; the output is memory-mapped."""
    kept = np.flatnonzero((plan.previous_row >= 0) | (plan.shard_of >= 0))
    row_of_position = np.full(len(plan.keys), -1, dtype=np.int64)
    row_of_position[kept] = np.arange(len(kept))
    needed = len(kept) * dim * np.dtype(dtype).itemsize
    free = shutil.disk_usage(out_path.parent).free
    if needed + FREE_MARGIN_BYTES > free:
        raise SimsearchError(f"not enough free disk space for the new store in {out_path.parent.parent}: its vectors "
                             f"need {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; the previous store is untouched")
    output = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=(len(kept), dim))
    with open(out_path, "r+b") as handle:  # every block allocated now: a disk filled meanwhile is ENOSPC here, not SIGBUS
        os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    reused = np.flatnonzero(plan.previous_row >= 0)
    for start in range(0, len(reused), COPY_CHUNK):
        positions = reused[start : start + COPY_CHUNK]
        output[row_of_position[positions]] = previous.embeddings[plan.previous_row[positions]]
    for number, path in enumerate(phase_bar(plan.shards, "merging", unit="shard")):
        positions = np.flatnonzero(plan.shard_of == number)
        if len(positions):
            with safe_open(str(path), framework="numpy") as shard:
                output[row_of_position[positions]] = shard.get_tensor("embeddings")[plan.shard_row[positions]]
    output.flush()
    del output
    return kept


def describe_store(cfg: DictConfig, collection: ImageCollection, count: int, dim: int, skipped: int) -> dict[str, Any]:
    """What manifest.json records beyond the checksums: enough to rebuild the model and the data."""
    return {
        "count": count,
        "dim": dim,
        "dtype": cfg.store.dtype,
        "skipped": skipped,
        "data": {
            **OmegaConf.to_container(cfg.data, resolve=True),
            "root": str(Path(cfg.data.root).expanduser().resolve()) if cfg.data.root else None,
            "classes": list(collection.classes),
        },
        "model": {**OmegaConf.to_container(cfg.model, resolve=True), "seed": cfg.run.seed},
        "dataset": cfg.data.name,
        "split": cfg.data.split,
        "weights": cfg.model.weights,
        "image_size": cfg.model.image_size,
    }


def write_store(cfg: DictConfig, collection: ImageCollection, staging: Path, plan: Plan, previous: Store | None,
                identity: dict[str, Any], catalogue: Catalogue | None = None) -> dict[str, Any]:
    """Write the complete store into `staging` (manifest last) from the plan's sources; `identity` holds the
    run's fingerprint and the embedder's identity (`simsearch.identity`); `catalogue`: data.metadata, read."""
    dim = previous.dim if previous is not None and (plan.previous_row >= 0).any() else embedding_dim(plan.shards)
    kept = merge_vectors(plan, previous, dim, cfg.store.dtype, staging / "embeddings.npy") if dim else np.zeros(0, int)
    skipped = [{**collection.item_record(i), "reason": plan.skip_reason.get(i, "unreadable")}
               for i in np.flatnonzero((plan.previous_row < 0) & (plan.shard_of < 0)).tolist()]
    skipped += collection.unlisted
    if len(kept) == 0:
        raise SimsearchError(f"none of the {len(collection)} inputs could be read: "
                             + "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3]))
    if skipped:
        log.warning("%d of %d inputs could not be read and were skipped: listed in %s",
                    len(skipped), len(collection) + len(collection.unlisted), Path(cfg.run.dir) / "skipped.jsonl")
    labels = collection.labels[kept].astype(np.int64)
    classes = collection.classes
    items = [{**collection.item_record(int(i)), "label": classes[y] if 0 <= y < len(classes) else None}
             for i, y in zip(kept, labels.tolist())]
    save_config(cfg, staging / "config.yaml")
    reused = int((plan.previous_row >= 0).sum())
    description = {**describe_store(cfg, collection, len(kept), dim, len(skipped)), **identity,
                   "embedded": len(kept) - reused, "reused": reused}
    if catalogue is not None:
        description["metadata"] = store_metadata(cfg, catalogue, items, staging)
    return finish_store(staging, labels, items, skipped, description)


def store_metadata(cfg: DictConfig, catalogue: Catalogue, items: list[dict[str, Any]], staging: Path) -> dict[str, Any]:
    """metadata.jsonl and metadata_unmatched.jsonl from the catalogue joined by key; one warning for what did not
    match. Metadata is no part of the fingerprint: a changed row rewrites this file, never a vector."""
    joined = join(catalogue, items)
    counts = write_metadata(staging, items, joined.rows, catalogue.columns, unmatched_records(joined))
    if joined.unmatched_rows or joined.items_without_row:
        log.warning("data.metadata: %d catalogue row(s) match no item and %d item(s) have no catalogue row (e.g. %s): "
                    "listed in %s", len(joined.unmatched_rows), len(joined.items_without_row),
                    (joined.unmatched_rows + joined.items_without_row)[0], Path(cfg.run.dir) / "metadata_unmatched.jsonl")
    return {"source": catalogue.source, "key": catalogue.key, "columns": catalogue.columns, **counts}


