"""Checking a store's files against its manifest, hashing a file again only when its identity changed.

The record of what was verified (`.verified.json`) carries an HMAC keyed by a secret of this user's, kept
outside every store, so an entry written by hand or by another user is never trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from simsearch.errors import SimsearchError
from simsearch.files import read_json, sha256_of, write_text_atomically
from simsearch.store.layout import STAGING, VERIFIED

log = logging.getLogger(__name__)
RACY_NS = 2_000_000_000  # a file modified this close to its verification is hashed again (git's racy rule)


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

