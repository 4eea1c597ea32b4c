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

The package: `layout` (file names, the manifest's checksum), `reader` (`Store`), `writer` (staging, swap,
`create_store`), `verification` (checksums and their keyed cache), `lock` (`RunLock`).
"""

from simsearch.store.layout import (
    CHECKSUMMED,
    FORMAT_VERSION,
    LOCK,
    METADATA,
    METADATA_UNMATCHED,
    STAGING,
    VERIFIED,
    manifest_checksum,
)
from simsearch.store.lock import RunLock
from simsearch.store.reader import Store, read_manifest
from simsearch.store.verification import mismatched, verify_checksums
from simsearch.store.writer import (
    create_store,
    finish_interrupted_swap,
    finish_store,
    fresh_staging,
    library_versions,
    swap_in,
    write_manifest,
)

__all__ = ["CHECKSUMMED", "FORMAT_VERSION", "LOCK", "METADATA", "METADATA_UNMATCHED", "STAGING", "VERIFIED", "RunLock", "Store",
           "create_store", "finish_interrupted_swap", "finish_store", "fresh_staging", "library_versions",
           "manifest_checksum", "mismatched", "read_manifest", "swap_in", "verify_checksums", "write_manifest"]
