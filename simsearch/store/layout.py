"""The names of a store's files and the manifest's own checksum: what the reader, the writer and the
verification share (the format itself is described in `simsearch.store`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

CHECKSUMMED = ("embeddings.npy", "labels.npy", "items.jsonl", "skipped.jsonl", "config.yaml", "metadata.jsonl",
               "metadata_unmatched.jsonl")
METADATA, METADATA_UNMATCHED = "metadata.jsonl", "metadata_unmatched.jsonl"
STAGING = ".staging"  # the next store, written beside the current one
VERIFIED = ".verified.json"  # identity (device, inode, size, mtime, ctime) and checksum of each file when verified
LOCK = ".lock"
FORMAT_VERSION = 3  # 2: items carry a `key`, the manifest a `fingerprint`; 3: the manifest its own checksum


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, ASCII), its own `manifest_sha256` left out."""
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()).hexdigest()

