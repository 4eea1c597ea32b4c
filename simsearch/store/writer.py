"""Writing a store: the next one is written whole in `.staging/` and swapped in file by file, manifest
last, so a run that dies leaves the previous store readable (or a complete one to finish swapping in)."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from simsearch.catalogue import column_kinds, write_metadata
from simsearch.errors import SimsearchError
from simsearch.files import fsync_path, sha256_of, write_jsonl, write_text_atomically
from simsearch.store.layout import CHECKSUMMED, FORMAT_VERSION, METADATA, METADATA_UNMATCHED, STAGING, manifest_checksum
from simsearch.store.reader import FINITE_CHUNK_ROWS, Store

log = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for name in ("simsearch", "torch", "torchvision", "lightning", "numpy", "faiss-cpu", "faiss-gpu-cu12"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(store_dir: Path, description: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json: the description given, plus versions, time, a checksum of each file and the
    checksum of the manifest itself (`manifest_sha256`), so that any change to it is refused."""
    manifest = {
        "format_version": FORMAT_VERSION,
        **description,
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sha256": {name: sha256_of(store_dir / name) for name in CHECKSUMMED if (store_dir / name).exists()},
    }
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    write_text_atomically(store_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def finish_store(store_dir: Path, labels: np.ndarray, items: list[dict[str, Any]], skipped: list[dict[str, Any]],
                 description: dict[str, Any]) -> dict[str, Any]:
    """Write everything but embeddings.npy (already in place), then the manifest, which comes last:
    a store without manifest.json is incomplete."""
    np.save(store_dir / "labels.npy", np.asarray(labels, dtype=np.int64))
    write_jsonl(store_dir / "items.jsonl", items)
    write_jsonl(store_dir / "skipped.jsonl", skipped)
    return write_manifest(store_dir, description)


def create_store(store_dir: Path, embeddings: np.ndarray, labels: np.ndarray, items: list[dict[str, Any]],
                 description: dict[str, Any], metadata: list[dict[str, Any] | None] | None = None) -> Store:
    """A verified store from vectors and their items (cached features, benchmarks, tests, imports from
    elsewhere), written beside any store already in `store_dir` and swapped in. `embeddings` may be a
    memory-mapped .npy of any size (checked and copied a chunk of rows at a time); `metadata`: one dict of
    column values per row (None: no values), kept as metadata.jsonl."""
    if embeddings.ndim != 2 or len(embeddings) != len(labels) or len(items) != len(labels):
        raise SimsearchError(f"a store needs one label and one item per vector: {embeddings.shape} vectors, "
                             f"{len(labels)} labels, {len(items)} items")
    for start in range(0, len(embeddings), FINITE_CHUNK_ROWS):
        if not np.isfinite(embeddings[start : start + FINITE_CHUNK_ROWS]).all():
            raise SimsearchError("the embeddings hold NaN or infinite values: a store holds finite vectors only")
    store_dir.mkdir(parents=True, exist_ok=True)
    staging = fresh_staging(store_dir)
    if (store_dir / "config.yaml").is_file():  # written by the caller beside the store
        shutil.copy2(store_dir / "config.yaml", staging / "config.yaml")
    np.save(staging / "embeddings.npy", embeddings)
    if metadata is not None:
        columns = column_kinds(metadata)
        description = {**description, "metadata": {"columns": columns, **write_metadata(staging, items, metadata, columns, [])}}
    finish_store(staging, labels, items, [], {"count": len(embeddings), "dim": int(embeddings.shape[1]),
                                              "dtype": str(embeddings.dtype), **description})
    swap_in(staging, store_dir)
    return Store.open(store_dir)


def fresh_staging(store_dir: Path) -> Path:
    """An empty `.staging/` in the store's directory (what an interrupted run left there is dropped)."""
    staging = store_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def swap_in(staging: Path, store_dir: Path) -> None:
    """Move a complete store from `staging` over the one in `store_dir`, file by file, manifest last.

    Until the manifest moves, readers see the old manifest: a file already replaced fails its
    checksum, so a reader mid-swap is refused with a sentence, never served rows of two stores.
    Killed mid-swap, the next extraction (or `finish_interrupted_swap`) completes it.
    """
    names = [name for name in (*CHECKSUMMED, "manifest.json") if (staging / name).exists()]
    try:
        for name in names:  # on disk before any is moved: a power loss cannot leave a manifest over lost data
            fsync_path(staging / name)
    except OSError:  # nothing moved yet: the previous store stays whole
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in names:
        os.replace(staging / name, store_dir / name)
    for name in {METADATA, METADATA_UNMATCHED} - set(names):  # a previous catalogue the new store has not
        (store_dir / name).unlink(missing_ok=True)
    fsync_path(store_dir)  # the renames themselves: a reported success survives a power loss
    shutil.rmtree(staging, ignore_errors=True)


def finish_interrupted_swap(store_dir: Path) -> None:
    """Complete a swap that a killed run began (a staged manifest means the staged store is complete);
    drop a staging folder that never got that far."""
    staging = store_dir / STAGING
    if (staging / "manifest.json").is_file():
        log.warning("completing the replacement of the store in %s that an earlier run began", store_dir)
        swap_in(staging, store_dir)
    elif staging.exists():
        shutil.rmtree(staging, ignore_errors=True)

