"""A store in the layouts other tools read (the library under `simsearch export`).

- `clip-retrieval`: `img_emb/img_emb_0.npy` (float32, N x D) beside `metadata/metadata_0.parquet` (one row per
  vector, same order), the layout clip-retrieval's index and back end and autofaiss read directly;
- `parquet`: one `embeddings.parquet`, the metadata columns and the vector as a fixed-size list column.

Metadata columns: `id`, `key`, `image_path` (the file's absolute path; null for dataset items), `index` (a
dataset item's position; null for files), `label` (int, -1 where unknown), `label_name`, then every other
field the store's items.jsonl records carry (item metadata). The export is written whole in a hidden folder
beside `export.dir` and renamed into place; a previous export is removed only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from simsearch.errors import SimsearchError
from simsearch.files import fsync_path
from simsearch.store import Store

FORMATS = ("clip-retrieval", "parquet")
MARKER = "export.json"  # what an export folder holds besides its data: the store it came from
CHUNK_ROWS = 65_536  # rows converted and written per step: bounded memory for any store size
FIXED_COLUMNS = ("id", "key", "image_path", "index", "label", "label_name")


def write_export(store: Store, target: Path, fmt: str) -> dict[str, Any]:
    """Write `store` to the folder `target` in format `fmt`, whole in a hidden folder beside it and then
    renamed into place; returns what export.json records."""
    if fmt not in FORMATS:
        raise SimsearchError(f"export.format must be {' or '.join(FORMATS)}, not '{fmt}'")
    pa, pq = _pyarrow()
    check_target(target, store.dir)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        table = metadata_table(store, pa)
        if fmt == "clip-retrieval":
            (staging / "img_emb").mkdir()
            (staging / "metadata").mkdir()
            write_npy(store, staging / "img_emb" / "img_emb_0.npy")
            pq.write_table(table, staging / "metadata" / "metadata_0.parquet")
        else:
            write_parquet(store, table, staging / "embeddings.parquet", pa, pq)
        record = {"format": fmt, "store": str(store.dir.resolve()), "count": len(store), "dim": store.dim,
                  "store_manifest_sha256": store.manifest.get("manifest_sha256"),
                  "columns": table.column_names, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        swap_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SimsearchError("simsearch export needs pyarrow: pip install 'simsearch[formats]'") from None
    return pa, pq


def check_target(target: Path, store_dir: Path) -> None:
    """export.dir is replaced whole: it must be new, empty or an earlier export, and never hold the store."""
    real, store_real = target.resolve(), store_dir.resolve()
    if real == store_real or store_real.is_relative_to(real):
        raise SimsearchError(f"export.dir={target} holds the store {store_dir}: choose a folder of its own (it is replaced whole)")
    if target.exists() and not target.is_dir():
        raise SimsearchError(f"export.dir={target} is a file: give a folder (it is replaced whole)")
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise SimsearchError(f"export.dir={target} is a folder that is not an earlier export (no {MARKER}) and not empty: "
                             "choose a new or empty folder (it is replaced whole)")


def swap_folder(staging: Path, target: Path) -> None:
    """Rename the complete `staging` to `target`; an earlier export there is moved aside first and removed
    only once the new one is in place."""
    for path in [*staging.rglob("*"), staging]:
        fsync_path(path)
    previous = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    fsync_path(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


def chunks(count: int) -> Iterator[slice]:
    for start in range(0, count, CHUNK_ROWS):
        yield slice(start, min(start + CHUNK_ROWS, count))


def write_npy(store: Store, path: Path) -> None:
    """float32 N x D whatever the store's dtype (clip-retrieval and autofaiss read float32), chunk by chunk."""
    output = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(store), store.dim))
    for rows in chunks(len(store)):
        output[rows] = store.vectors(rows)
    output.flush()
    del output


def write_parquet(store: Store, table: Any, path: Path, pa: Any, pq: Any) -> None:
    """The metadata table with an `embedding` column of fixed-size float32 lists, one row group per chunk."""
    field = pa.field("embedding", pa.list_(pa.float32(), store.dim))
    schema = table.schema.append(field)
    with pq.ParquetWriter(path, schema) as writer:
        for rows in chunks(len(store)):
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(store.vectors(rows).reshape(-1)), store.dim)
            writer.write_table(table.slice(rows.start, rows.stop - rows.start).append_column(field, vectors))


def metadata_columns(store: Store) -> dict[str, list[Any]]:
    """One list per column, row i = item i: the fixed columns, then every other field of the items' records
    (a `metadata` object is spread into its own fields); values that are lists or objects become JSON text."""
    root = store.manifest.get("data", {}).get("root")
    columns: dict[str, list[Any]] = {name: [] for name in FIXED_COLUMNS}
    extra: list[dict[str, Any]] = []
    for row, item in enumerate(store.items):
        path = item.get("path")
        columns["id"].append(str(item.get("id", row)))
        columns["key"].append(item.get("key"))
        columns["image_path"].append(str(Path(root) / path) if path is not None and root else path)
        columns["index"].append(item.get("index"))
        columns["label"].append(int(store.labels[row]))
        columns["label_name"].append(store.label_name(row))
        fields = {k: v for k, v in item.items() if k not in ("id", "key", "path", "index", "label", "metadata")}
        if isinstance(item.get("metadata"), dict):
            fields.update(item["metadata"])
        extra.append(fields)
    names = sorted({name for fields in extra for name in fields} - set(FIXED_COLUMNS))
    for name in names:
        columns[name] = [_plain(fields.get(name)) for fields in extra]
    return columns


def _plain(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def metadata_table(store: Store, pa: Any) -> Any:
    """The metadata as an Arrow table; a column of mixed types (numbers and text) is written as text."""
    arrays = {}
    for name, values in metadata_columns(store).items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    arrays["label"] = pa.array(arrays["label"].to_pylist(), pa.int64())
    return pa.table(arrays)
