"""Item metadata: a catalogue (`data.metadata=catalog.csv`, `.parquet` or `.jsonl`) with one row per item,
joined to the store's items by a key column, and kept in the store as `metadata.jsonl`.

The key column is `id` (an item's id: its relative path in a folder, its index in a dataset), `path` (a
folder item's path relative to data.root) or `index` (a dataset item's index), the first of these the
catalogue has (`data.metadata_key` names another choice among them). Every other column is kept, typed
str, int, float or bool; an empty cell is no value (null). Items are matched by key, never by position.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simsearch.errors import SimsearchError
from simsearch.files import write_jsonl

KEY_COLUMNS = ("id", "path", "index")
# the filter language's own words, and the fields a Milvus collection holds besides the metadata (simsearch.milvus)
RESERVED = {"label", "and", "or", "not", "in", "true", "false", "null", "like", "vector", "digest"}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
INT = re.compile(r"[-+]?\d+")
FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Catalogue:
    """A catalogue read and typed: `rows` maps each key to its values (column -> value or None)."""

    source: str
    key: str
    columns: dict[str, str]  # name -> str | int | float | bool, in the file's order
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_catalogue(path: Path | str, key: str | None = None) -> Catalogue:
    """The catalogue at `path` (.csv, .parquet, .jsonl), checked: a key column, unique keys, identifier
    column names, one type per column. Anything else is one sentence naming the problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SimsearchError(f"data.metadata={path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        names, records = _read_csv(path)
    elif suffix == ".jsonl":
        names, records = _read_jsonl(path)
    elif suffix == ".parquet":
        names, records = _read_parquet(path)
    else:
        raise SimsearchError(f"data.metadata={path}: a catalogue is a .csv, .parquet or .jsonl file, not {suffix or 'no suffix'}")
    key = _key_column(path, names, key)
    for name in names:
        if name != key and (not IDENTIFIER.fullmatch(name) or name.lower() in RESERVED or name in KEY_COLUMNS):
            raise SimsearchError(f"data.metadata={path}: the column name {name!r} cannot be filtered on (a column is "
                                 "a name of letters, digits and _, not starting with a digit, and not label, id, path, "
                                 "index, vector, digest, and, or, not, in, true, false): rename it")
    columns = {name: _column_kind(path, name, [r.get(name) for r in records]) for name in names if name != key}
    catalogue = Catalogue(str(path.resolve()), key, columns)
    for line, record in enumerate(records, start=1):
        value = record.get(key)
        if value is None or value == "":
            raise SimsearchError(f"data.metadata={path}: row {line} has no {key}")
        item_key = _key_text(value)
        if item_key in catalogue.rows:
            raise SimsearchError(f"data.metadata={path}: the {key} {item_key!r} is in more than one row (row {line} "
                                 "again): one row per item")
        catalogue.rows[item_key] = {name: _typed(record.get(name), kind) for name, kind in columns.items()}
    return catalogue


def _key_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _key_column(path: Path, names: list[str], key: str | None) -> str:
    if key is not None:
        if key not in KEY_COLUMNS or key not in names:
            raise SimsearchError(f"data.metadata_key={key} must be one of {', '.join(KEY_COLUMNS)} and a column of "
                                 f"{path} (its columns: {', '.join(names)})")
        return key
    for name in KEY_COLUMNS:
        if name in names:
            return name
    raise SimsearchError(f"data.metadata={path} has no key column: name the column that identifies each item id "
                         f"(its id), path (relative to data.root) or index (a dataset's); its columns: "
                         f"{', '.join(names[:10]) or 'none'}")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            names = list(reader.fieldnames or [])
            records = []
            for line, row in enumerate(reader, start=2):
                if None in row or any(v is None for v in row.values()):
                    raise SimsearchError(f"data.metadata={path}: line {line} has another number of cells than the header")
                records.append({name: (value if value != "" else None) for name, value in row.items()})
    except (UnicodeDecodeError, csv.Error) as error:
        raise SimsearchError(f"data.metadata={path} is not a readable UTF-8 CSV file: {error}") from None
    if len(set(names)) != len(names):
        raise SimsearchError(f"data.metadata={path}: a column name appears twice in the header")
    return names, records


def _read_jsonl(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    names: dict[str, None] = {}
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise SimsearchError(f"data.metadata={path}: line {line} is not a JSON object")
                names.update(dict.fromkeys(record))
                records.append(record)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SimsearchError(f"data.metadata={path} is not a readable JSON-lines file: {error}") from None
    return list(names), records


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SimsearchError("a .parquet catalogue needs pyarrow: `pip install pyarrow` (or use .csv / .jsonl)") from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises its own kinds for damaged files
        raise SimsearchError(f"data.metadata={path} is not a readable Parquet file: {str(error).splitlines()[0]}") from None
    return list(table.column_names), table.to_pylist()


def _column_kind(path: Path, name: str, values: list[Any]) -> str:
    """str | int | float | bool: CSV cells by what every cell of the column reads as, JSON and Parquet by type."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, str) for v in present):
        if present and all(INT.fullmatch(v.strip()) for v in present):
            return "int"
        if present and all(FLOAT.fullmatch(v.strip()) for v in present):
            return "float"
        if present and all(v.strip().lower() in ("true", "false") for v in present):
            return "bool"
        return "str"
    if all(isinstance(v, bool) for v in present):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    kinds = sorted({type(v).__name__ for v in present})
    raise SimsearchError(f"data.metadata={path}: the column {name!r} holds {', '.join(kinds)} values: a column holds "
                         "strings, integers, numbers or true/false, one kind")


def _typed(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        return {"int": lambda: int(text), "float": lambda: float(text), "bool": lambda: text.lower() == "true",
                "str": lambda: value}[kind]()
    if kind == "float":
        return float(value)
    return value


@dataclass
class Joined:
    """A catalogue joined to a store's items: one values dict per store row (None: no catalogue row),
    and what did not match, for one warning and `metadata_unmatched.jsonl`."""

    rows: list[dict[str, Any] | None]
    unmatched_rows: list[str]  # catalogue keys no item has
    items_without_row: list[str]  # ids of items the catalogue does not name


def join(catalogue: Catalogue, items: list[dict[str, Any]]) -> Joined:
    """Each item's catalogue row, found by key (id, path or index), never by position."""
    used: set[str] = set()
    rows: list[dict[str, Any] | None] = []
    missing = []
    for item in items:
        key = item.get(catalogue.key)
        found = None if key is None else catalogue.rows.get(_key_text(key))
        rows.append(found)
        if found is None:
            missing.append(str(item["id"]))
        else:
            used.add(_key_text(key))
    return Joined(rows, [key for key in catalogue.rows if key not in used], missing)


def unmatched_records(joined: Joined) -> list[dict[str, Any]]:
    return ([{"catalogue_key": key, "reason": "no item of the store has this key"} for key in joined.unmatched_rows]
            + [{"id": item_id, "reason": "no catalogue row names this item"} for item_id in joined.items_without_row])


def column_kinds(rows: list[dict[str, Any] | None]) -> dict[str, str]:
    """The columns and types of metadata given from Python (one dict per row), checked as a catalogue's."""
    names: dict[str, None] = {}
    for values in rows:
        names.update(dict.fromkeys(values or {}))
    kinds = {}
    for name in names:
        if not isinstance(name, str) or not IDENTIFIER.fullmatch(name) or name.lower() in RESERVED or name in KEY_COLUMNS:
            raise SimsearchError(f"the metadata column name {name!r} cannot be filtered on: use letters, digits and _")
        values = [(v or {}).get(name) for v in rows]
        if any(isinstance(v, str) for v in values) and not all(isinstance(v, str) or v is None for v in values):
            raise SimsearchError(f"the metadata column {name!r} mixes strings with other values")
        kinds[name] = "str" if any(isinstance(v, str) for v in values) else _column_kind(Path("metadata"), name, values)
    return kinds


def write_metadata(store_dir: Path, items: list[dict[str, Any]], rows: list[dict[str, Any] | None],
                   columns: dict[str, str], unmatched: list[dict[str, Any]]) -> dict[str, Any]:
    """metadata.jsonl (one object per row) and metadata_unmatched.jsonl in `store_dir`; the counts for the manifest."""
    if len(rows) != len(items):
        raise SimsearchError(f"metadata for {len(rows)} rows given for {len(items)} items: one per row")
    records = [{"id": str(item["id"]), **{name: _typed((values or {}).get(name), kind) for name, kind in columns.items()}}
               for item, values in zip(items, rows)]
    write_jsonl(store_dir / "metadata.jsonl", records)
    write_jsonl(store_dir / "metadata_unmatched.jsonl", unmatched)
    return {"items_without_row": sum(values is None for values in rows),
            "unmatched_rows": sum("catalogue_key" in record for record in unmatched)}
