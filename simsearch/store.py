"""The store: a directory of embeddings and what they belong to; the public format of simsearch.

    embeddings.npy  (N, D) float32 | float16, row i = item i, unit norm
    labels.npy      (N,) int64, -1 where unknown
    items.jsonl     one JSON object per row: id, path (files) or index (datasets), key, label name
    skipped.jsonl   every input that could not be read, with the reason
    metadata.jsonl  (with data.metadata) one JSON object per row: the item's id, then its catalogue columns (null
                    where it has no value); the manifest's `metadata` gives each column's type (docs/store.md)
    metadata_unmatched.jsonl  catalogue rows that matched no item, and items that no catalogue row names
    manifest.json   count, dim, dtype, data, model, fingerprint, embedded/reused, versions, sha256 of each file
                    and of itself (manifest_sha256)
    config.yaml     the resolved config of the run that wrote it

A store is replaced whole: a run writes the new one in `.staging/` beside it and moves its files in,
manifest.json last, after an fsync of each (`swap_in`); a run holds `flock` on `.lock` while it writes
(`RunLock`). Readers check the manifest against its own checksum (`manifest_sha256`), then the files
against the manifest's checksums, hashing a file again only when its identity (device, inode, size,
mtime, ctime) changed since the last verification (`.verified.json`).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import platform
import shutil
import socket
import stat
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from simsearch.catalogue import column_kinds, write_metadata
from simsearch.errors import SimsearchError
from simsearch.files import (
    file_identity,
    fsync_path,
    open_regular,
    parse_json,
    read_json,
    read_jsonl,
    sha256_of,
    write_jsonl,
    write_text_atomically,
)
from simsearch.filters import Column, evaluate, parse_filter

log = logging.getLogger(__name__)
FORMAT_VERSION = 3  # 2: items carry a `key`, the manifest a `fingerprint`; 3: the manifest its own checksum
CHECKSUMMED = ("embeddings.npy", "labels.npy", "items.jsonl", "skipped.jsonl", "config.yaml", "metadata.jsonl",
               "metadata_unmatched.jsonl")
METADATA, METADATA_UNMATCHED = "metadata.jsonl", "metadata_unmatched.jsonl"
STAGING = ".staging"  # the next store, written beside the current one
VERIFIED = ".verified.json"  # identity (device, inode, size, mtime, ctime) and checksum of each file when verified
LOCK = ".lock"
RACY_NS = 2_000_000_000  # a file modified this close to its verification is hashed again (git's racy rule)
FINITE_CHUNK_ROWS = 65_536  # rows checked for NaN/inf at a time when a store is opened without verification


def library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for name in ("simsearch", "torch", "torchvision", "lightning", "numpy", "faiss-cpu", "faiss-gpu-cu12"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, ASCII), its own `manifest_sha256` left out."""
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()).hexdigest()


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
    """A store from arrays in memory (cached features, tests, imports from elsewhere); `metadata`: one dict
    of column values per row (None: no values), kept as metadata.jsonl."""
    if not np.isfinite(embeddings).all():
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
    _filter_columns: dict[str, Column] | None = field(default=None, repr=False)

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

    def filter_columns(self) -> dict[str, Column]:
        """What a filter may name: `label` and the metadata columns, as arrays over the rows (built once)."""
        if self._filter_columns is None:
            labels = Column("str", np.asarray(self.labels, dtype=np.int64), self.classes)
            if self.classes:  # labels without class names (a store made from Python) compare as numbers
                labels.values = np.where(labels.values < len(self.classes), labels.values, -1)
            else:
                labels = Column("int", np.where(self.labels >= 0, self.labels, np.nan).astype(np.float64), [])
            columns = {"label": labels}
            metadata = self.metadata
            for name, kind in self.metadata_columns.items():
                columns[name] = Column.of(kind, [values[name] for values in metadata])
            self._filter_columns = columns
        return self._filter_columns

    def filter_rows(self, text: str | None) -> np.ndarray | None:
        """The rows (ascending) that the filter keeps; None without a filter (every row)."""
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        columns = self.filter_columns()
        tree = parse_filter(text, {name: column.kind for name, column in columns.items()})
        return np.flatnonzero(evaluate(tree, columns, len(self)))

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


def verify_checksums(store_dir: Path, manifest: dict[str, Any], full: bool = False) -> None:
    """Every file the manifest lists matches its sha256 (else one sentence naming the file)."""
    staged = " (a newer store is being swapped in: wait, or run the same extract again)" \
        if (store_dir / STAGING / "manifest.json").is_file() else ""
    for name in mismatched(store_dir, manifest.get("sha256", {}), full):
        if not (store_dir / name).exists():
            raise SimsearchError(f"store {store_dir} is incomplete: {name} is missing")
        raise SimsearchError(f"store {store_dir} is corrupt: {name} does not match its checksum in manifest.json{staged}")


def mismatched(store_dir: Path, expected: dict[str, str], full: bool = False) -> list[str]:
    """The files of `expected` (name -> sha256) in store_dir that are missing or do not match, first one only.

    A file whose identity (device, inode, size, mtime and ctime: a ctime cannot be set back by `touch`)
    is the one of its last verification, recorded in .verified.json, and that was not modified within
    2 s of it (git's "racy" rule), is not hashed again; `full` hashes every file.
    """
    cache_path = store_dir / VERIFIED
    key = verification_key()
    cache = read_verified(cache_path, key)
    updated = dict(cache)
    bad: list[str] = []
    for name, checksum in expected.items():
        path = store_dir / name
        try:
            stat = path.stat()
        except OSError:
            bad.append(name)
            break
        seen = {"dev": stat.st_dev, "ino": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "ctime_ns": stat.st_ctime_ns, "sha256": checksum}
        known = cache.get(name) if isinstance(cache.get(name), dict) else {}
        changed_ns = max(stat.st_mtime_ns, stat.st_ctime_ns)
        if not full and known.get("verified_ns", 0) - changed_ns > RACY_NS and {k: known.get(k) for k in seen} == seen:
            continue
        if sha256_of(path) != checksum:
            updated.pop(name, None)
            bad.append(name)
            break
        updated[name] = {**seen, "verified_ns": time.time_ns()}
    if updated != cache and key is not None:
        try:
            write_text_atomically(cache_path, json.dumps({"files": updated, "mac": cache_mac(key, updated)}, indent=1) + "\n")
        except OSError:  # a read-only store (or a full disk) is verified again next time
            pass
    return bad


def cache_mac(key: bytes, files: dict[str, Any]) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def read_verified(cache_path: Path, key: bytes | None) -> dict[str, Any]:
    """The entries of .verified.json if its MAC (keyed with this user's `verification_key`) holds; else none
    (every file is hashed again): an entry edited by hand, or written by another user, is never trusted."""
    if key is None or not cache_path.exists():
        return {}
    try:
        cache = read_json(cache_path)
    except (OSError, SimsearchError):
        return {}
    if not isinstance(cache, dict) or not isinstance(cache.get("files"), dict) or not isinstance(cache.get("mac"), str):
        return {}
    if not hmac.compare_digest(cache["mac"], cache_mac(key, cache["files"])):
        log.info("ignoring %s: its MAC does not hold (edited, or written by another user): hashing the files", cache_path)
        return {}
    return cache["files"]


def verification_key() -> bytes | None:
    """This user's secret for the MAC of .verified.json, kept outside every store ($XDG_CACHE_HOME/simsearch/
    verify.key, else ~/.cache/...), made once, mode 0600; None (no cache: files hashed at every open)
    where it cannot be made or is not this user's own private file."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simsearch"
    path = folder / "verify.key"
    try:
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = folder / f".verify.key.{os.getpid()}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temporary, path)  # atomic, never over a key another process made meanwhile
            except FileExistsError:
                pass
            finally:
                temporary.unlink(missing_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                return None
            key = os.read(fd, 64)
        finally:
            os.close(fd)
    except OSError:
        return None
    return key if len(key) == 32 else None


def _write_owner(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


class RunLock:
    """`run.dir/.lock`, held while a run writes there: one writer per run.dir.

    The lock is `fcntl.flock` on the file, taken without waiting: the kernel lets one open file hold it
    and drops it when its process dies, so a dead run's lock is free with no takeover to race on. The
    holder writes its pid, host and start time into the file for the sentence that refuses the others,
    and removes the file while still holding the lock; a run that locked a file removed meanwhile
    (another inode than the path's) lets it go and tries again.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except PermissionError:
                raise SimsearchError(f"run.dir={self.path.parent} is not writable") from None
            except OSError as error:
                raise SimsearchError(f"cannot create the lock {self.path}: {error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse()
            try:
                if os.fstat(fd).st_ino != os.stat(self.path, follow_symlinks=False).st_ino:
                    raise FileNotFoundError  # the holder removed this file as it finished: lock the new one
            except FileNotFoundError:
                os.close(fd)
                continue
            self.fd = fd
            try:
                left = os.pread(fd, 4096, 0)
                if left:  # a run killed while it held the lock: the kernel released it
                    log.warning("taking over the stale lock %s of a run that ended without releasing it (%s)",
                                self.path, left.decode("utf-8", "replace").strip()[:200])
                _write_owner(fd, (json.dumps(self.owner) + "\n").encode())
            except OSError as error:
                self.__exit__()
                raise SimsearchError(f"cannot write the lock {self.path}: {error.strerror or error}") from None
            return self
        raise SimsearchError(f"cannot take the lock {self.path}: other runs keep replacing it")

    def _refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text()[:4096])
        except (OSError, ValueError, RecursionError):
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        raise SimsearchError(
            f"another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
            f"{holder.get('started', '?')}) is writing to {self.path.parent}: wait for it to finish"
        )

    def __exit__(self, *exc_info: Any) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: no one else holds this file
        except OSError:
            pass
        os.close(self.fd)  # releases the lock
        self.fd = None
