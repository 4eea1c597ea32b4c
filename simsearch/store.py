"""The store: a directory of embeddings and what they belong to; the public format of simsearch.

    embeddings.npy  (N, D) float32 | float16, row i = item i, unit norm
    labels.npy      (N,) int64, -1 where unknown
    items.jsonl     one JSON object per row: id, path (files) or index (datasets), label name
    skipped.jsonl   every input that could not be read, with the reason
    manifest.json   count, dim, dtype, data, model, versions, time, sha256 of each file
    config.yaml     the resolved config of the run that wrote it
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simsearch.errors import SimsearchError

FORMAT_VERSION = 1
CHECKSUMMED = ("embeddings.npy", "labels.npy", "items.jsonl", "skipped.jsonl", "config.yaml")


def sha256_of(path: Path, block_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


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
    """Write manifest.json: the description given, plus versions, time and a checksum of each file."""
    manifest = {
        "format_version": FORMAT_VERSION,
        **description,
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sha256": {name: sha256_of(store_dir / name) for name in CHECKSUMMED if (store_dir / name).exists()},
    }
    (store_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
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
                 description: dict[str, Any]) -> Store:
    """A store from arrays in memory (cached features, tests, imports from elsewhere)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / "manifest.json").unlink(missing_ok=True)
    np.save(store_dir / "embeddings.npy", embeddings)
    finish_store(store_dir, labels, items, [], {"count": len(embeddings), "dim": int(embeddings.shape[1]),
                                                "dtype": str(embeddings.dtype), **description})
    return Store.open(store_dir)


@dataclass
class Store:
    """A store opened for reading; embeddings are memory-mapped, not loaded."""

    dir: Path
    embeddings: np.ndarray
    labels: np.ndarray
    items: list[dict[str, Any]]
    manifest: dict[str, Any]
    _row_of_id: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, store_dir: Path | str, verify: bool = False) -> Store:
        store_dir = Path(store_dir)
        manifest_path = store_dir / "manifest.json"
        if not manifest_path.is_file():
            raise SimsearchError(
                f"no store in {store_dir} (manifest.json missing): run `simsearch extract run.dir={store_dir}` first"
            )
        manifest = json.loads(manifest_path.read_text())
        if verify:
            verify_checksums(store_dir, manifest)
        embeddings = np.load(store_dir / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(store_dir / "labels.npy", allow_pickle=False)
        items = read_jsonl(store_dir / "items.jsonl")
        if not (len(embeddings) == len(labels) == len(items) == manifest["count"]):
            raise SimsearchError(
                f"store {store_dir} is inconsistent: {len(embeddings)} embeddings, {len(labels)} labels, "
                f"{len(items)} items, manifest says {manifest['count']}"
            )
        return cls(store_dir, embeddings, labels, items, manifest)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("data", {}).get("classes", []))

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    def vectors(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows as contiguous float32 (the store may hold float16)."""
        selected = self.embeddings if rows is None else self.embeddings[rows]
        return np.array(selected, dtype=np.float32, order="C")  # a writable copy

    def row_of(self, query: str | int) -> int:
        """The row of an item given by id (preferred) or by row number."""
        if not self._row_of_id:
            self._row_of_id = {str(item["id"]): row for row, item in enumerate(self.items)}
        key = str(query)
        if key in self._row_of_id:
            return self._row_of_id[key]
        if key.lstrip("-").isdigit() and 0 <= int(key) < len(self):
            return int(key)
        raise SimsearchError(f"no item '{query}' in the store {self.dir} (ids or rows 0..{len(self) - 1})")

    def label_name(self, row: int) -> str | None:
        label = int(self.labels[row])
        if label < 0:
            return None
        return self.classes[label] if label < len(self.classes) else str(label)


def verify_checksums(store_dir: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest.get("sha256", {}).items():
        path = store_dir / name
        if not path.is_file():
            raise SimsearchError(f"store {store_dir} is incomplete: {name} is missing")
        if sha256_of(path) != expected:
            raise SimsearchError(f"store {store_dir} is corrupt: {name} does not match its checksum in manifest.json")
