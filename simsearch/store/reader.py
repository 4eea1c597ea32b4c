"""Reading a store: the manifest checked against its own checksum, the files against the manifest,
embeddings memory-mapped, items read on first use."""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from simsearch.errors import SimsearchError
from simsearch.files import file_identity, open_regular, parse_json, read_jsonl
from simsearch.store.layout import METADATA, STAGING, manifest_checksum
from simsearch.store.verification import verify_checksums

FINITE_CHUNK_ROWS = 65_536  # rows checked for NaN/inf at a time when a store is opened without verification


@dataclass
class Store:
    """A store opened for reading: embeddings are memory-mapped, and items.jsonl is read only when an
    item is first asked for (evaluation and search by row never read it: 10^6 items are ~400 MB as dicts)."""

    dir: Path
    embeddings: np.ndarray
    labels: np.ndarray
    manifest: dict[str, Any]
    # embeddings.npy as verified and mapped: a later reader of the path (StoredRows) checks it is the same file
    embeddings_identity: tuple[int, int, int, int] | None = field(default=None, repr=False)
    _items: list[dict[str, Any]] | None = field(default=None, repr=False)
    _items_file: BinaryIO | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _row_of_id: dict[str, int] = field(default_factory=dict, repr=False)
    _metadata: list[dict[str, Any]] | None = field(default=None, repr=False)
    # what the layers above compute from these files once per open store (the filter's columns); keyed by them
    derived: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, store_dir: Path | str, verify: bool | str = True) -> Store:
        """Open the store in `store_dir`. manifest.json must match its own checksum, always; with `verify`
        (True, the default) every file must match the manifest's checksums, hashed once, then again only
        when a file's identity (device, inode, size, mtime, ctime) changes; `verify="full"` hashes every
        file now whatever was verified before; `verify=False` trusts the files (a store you just wrote)."""
        store_dir = Path(store_dir)
        if verify not in (True, False, "full"):
            raise SimsearchError(f"verify={verify!r} must be True, False or 'full'")
        manifest = read_manifest(store_dir)
        try:
            verified: tuple[int, int, int, int] | None = file_identity((store_dir / "embeddings.npy").stat())
        except OSError:
            verified = None  # missing: the checksums (or the load) below say so
        if verify:
            verify_checksums(store_dir, manifest, full=verify == "full")
        try:  # each opened once, refused unless a regular file (a pipe in its place would hang the reader)
            with open_regular(store_dir / "embeddings.npy") as handle:
                embeddings = map_npy(handle)
                identity = file_identity(os.fstat(handle.fileno()))
            with open_regular(store_dir / "labels.npy") as handle:
                labels = np.load(handle, allow_pickle=False)
        except SimsearchError:
            raise
        except Exception as error:  # noqa: BLE001 - a damaged .npy header raises SyntaxError, TokenError, ...
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SimsearchError(f"store {store_dir} cannot be read (a damaged .npy file?): {reason}") from None
        if verified is not None and identity != verified:  # replaced between the checksum and the mapping
            raise SimsearchError(f"the store in {store_dir} was replaced while it was opened (an extraction swapping "
                                 "in a new one): open it again")
        if embeddings.ndim != 2 or labels.ndim != 1:
            raise SimsearchError(f"store {store_dir} is damaged: embeddings.npy must be 2-D and labels.npy 1-D")
        if not (len(embeddings) == len(labels) == manifest["count"]):
            raise SimsearchError(f"store {store_dir} is inconsistent: {len(embeddings)} embeddings, "
                                 f"{len(labels)} labels, manifest says {manifest['count']}")
        if not verify:  # unverified files may hold anything: never serve a NaN or infinite row
            check_finite(store_dir, embeddings)
        try:  # opened now, read later: a store replaced meanwhile cannot pair new items with these rows
            items_file = open_regular(store_dir / "items.jsonl")
        except OSError:
            raise SimsearchError(f"store {store_dir} is incomplete: items.jsonl cannot be read") from None
        store = cls(store_dir, embeddings, labels, manifest, identity, _items_file=items_file)
        weakref.finalize(store, items_file.close)
        return store

    @property
    def items(self) -> list[dict[str, Any]]:
        """One dict per row (id, path or index, key), read on first use from the items.jsonl that was
        there when the store was opened (held open since), checked against the manifest's checksum."""
        if self._items is None:
            with self._lock:
                if self._items is None:
                    self._items = self._read_items()
        return self._items

    def _read_items(self) -> list[dict[str, Any]]:
        handle, self._items_file = self._items_file, None  # read once; after a failure, from the path
        expected = self.manifest.get("sha256", {}).get("items.jsonl")
        if handle is None:
            items = read_jsonl(self.dir / "items.jsonl", expected)
        else:
            with handle:
                handle.seek(0)
                items = read_jsonl(self.dir / "items.jsonl", expected, handle)
        if len(items) != len(self):
            raise SimsearchError(f"store {self.dir} is inconsistent: {len(items)} items in items.jsonl, "
                                 f"manifest says {len(self)}")
        return items

    def __len__(self) -> int:
        return len(self.labels)

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
        if key.isascii() and key.isdigit() and int(key) < len(self):  # "²", "-0", "+1" are not rows
            return int(key)
        raise SimsearchError(f"no item '{query}' in the store {self.dir} (ids or rows 0..{len(self) - 1})")

    @property
    def metadata_columns(self) -> dict[str, str]:
        """The catalogue's columns and their types (str, int, float, bool); empty without data.metadata."""
        return dict(self.manifest.get("metadata", {}).get("columns", {}))

    @property
    def metadata(self) -> list[dict[str, Any]]:
        """Each row's catalogue values (column -> value, None where it has none), from metadata.jsonl,
        checked against the manifest's checksum and paired with items.jsonl by id; [] without a catalogue."""
        if not self.metadata_columns:
            return []
        if self._metadata is None:
            records = read_jsonl(self.dir / METADATA, self.manifest.get("sha256", {}).get(METADATA))
            ids = [str(item["id"]) for item in self.items]
            if len(records) != len(ids) or any(str(r.get("id")) != i for r, i in zip(records, ids)):
                raise SimsearchError(f"store {self.dir} is inconsistent: {METADATA} does not list the items of items.jsonl")
            columns = self.metadata_columns
            self._metadata = [{name: record.get(name) for name in columns} for record in records]
        return self._metadata

    def label_name(self, row: int) -> str | None:
        label = int(self.labels[row])
        if label < 0:
            return None
        return self.classes[label] if label < len(self.classes) else str(label)


def map_npy(handle: BinaryIO) -> np.ndarray:
    """The array of an open .npy file, memory-mapped read-only (what np.load(mmap_mode="r") does from a path)."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(handle)
    if dtype.hasobject:
        raise ValueError("an array of Python objects (pickles are never read)")
    return np.memmap(handle, dtype=dtype, mode="r", shape=shape, order="F" if fortran_order else "C",
                     offset=handle.tell())


def check_finite(store_dir: Path, embeddings: np.ndarray) -> None:
    """Every value finite, checked a chunk of rows at a time (bounded memory; 0.055 s for 410 MB in the page cache)."""
    for start in range(0, len(embeddings), FINITE_CHUNK_ROWS):
        chunk = np.asarray(embeddings[start : start + FINITE_CHUNK_ROWS])
        if not np.isfinite(chunk).all():
            row = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=tuple(range(1, chunk.ndim))))[0])
            raise SimsearchError(f"store {store_dir} is damaged: row {row} of embeddings.npy is not finite (NaN or "
                                 "infinite): extract the store again")


def read_manifest(store_dir: Path) -> dict[str, Any]:
    """manifest.json as a dict, or one sentence saying why there is no usable store here."""
    path = store_dir / "manifest.json"
    if not path.exists():
        if (store_dir / STAGING / "manifest.json").is_file():
            raise SimsearchError(f"the store in {store_dir} is being replaced (or its run was killed mid-swap): "
                                 f"wait for the run, or run the same `simsearch extract` again")
        raise SimsearchError(
            f"no store in {store_dir} (manifest.json missing): run `simsearch extract run.dir={store_dir}` first"
        )
    try:
        with open_regular(path) as handle:  # a pipe in its place: one sentence, not a reader that hangs
            data = handle.read()
    except OSError as error:
        raise SimsearchError(f"{path} is not a readable manifest ({type(error).__name__}): extract the store again") from None
    try:
        manifest = parse_json(data, path)  # a key given twice, nesting too deep: damage like any other
    except SimsearchError as error:
        reason = str(error).removeprefix(f"{path} is damaged: ")
        raise SimsearchError(f"{path} is not a readable manifest ({reason}): extract the store again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("count"), int) \
            or not isinstance(manifest.get("sha256", {}), dict):
        raise SimsearchError(f"{path} is not a simsearch manifest (no count or checksums): extract the store again")
    if "manifest_sha256" not in manifest:
        raise SimsearchError(f"{path} has no checksum of its own (format_version {manifest.get('format_version')}, "
                             f"an older simsearch): run the same `simsearch extract` again")
    if manifest_checksum(manifest) != manifest["manifest_sha256"]:
        raise SimsearchError(f"{path} was changed after it was written (it does not match its own checksum): "
                             "extract the store again")
    return manifest

