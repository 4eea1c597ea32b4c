"""Queries and their answers: one dispatch (`parse_query`, `answer`) for the CLI, the Python API and the server.

A query is an item of the store, a vector, or an image to embed exactly as the store's items were (the
one preparation rule of `simsearch.pixels`, then the store's query encoder). Nothing here imports torch:
a search by item or by vector answers without it; a search by image loads the model
(`simsearch.model.query`) on first use, the one deferred import here, for the start-up time of the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from simsearch.drawing import metadata_line
from simsearch.errors import SimsearchError
from simsearch.index import search_among
from simsearch.knn import Searcher, search_without_self
from simsearch.pixels import UnreadableImage, decode_image, prepare_image
from simsearch.selection import Selection, select
from simsearch.store import Store


@dataclass
class Neighbour:
    rank: int
    row: int
    id: str
    path: str | None
    label: str | None
    score: float
    relevant: bool | None
    metadata: dict[str, Any] | None = None  # the item's catalogue values (data.metadata); None without a catalogue


@dataclass
class SearchResult:
    query: dict[str, Any]  # id/row/label of an item query, or the path of an image file
    neighbours: list[Neighbour]
    precision: float | None  # Precision@K when the query has a label (K: the k asked for, whatever a filter left)
    filter: str | None = None  # the filter the neighbours were chosen under (search.filter)
    k: int | None = None  # the number of neighbours asked for


@dataclass
class Query:
    """What to search for: an item of the store (`row`), a vector, or an image to embed."""

    kind: str  # item | vector | image
    caption: str
    row: int | None = None
    vector: np.ndarray | None = None
    image: Image.Image | None = None


def parse_query(store: Store, query: Any) -> Query:
    """Any query a user may give, as one `Query`:

    - `int`: a row of the store (the item itself is left out of its results);
    - `str`: an item id (or a row number), else the path of an image file or of a .npy vector;
    - `pathlib.Path`: an image file or a .npy vector (even when an item has that id);
    - a PIL image; anything else numpy reads as D numbers (a vector, normalised).
    """
    if isinstance(query, bool):
        raise SimsearchError("a query cannot be True or False: give a row, an id, a path, an image or a vector")
    if isinstance(query, (int, np.integer)):
        if not 0 <= int(query) < len(store):
            raise SimsearchError(f"row {int(query)} is not in the store (rows 0..{len(store) - 1})")
        return item_query(store, int(query))
    if isinstance(query, Image.Image):
        if not (query.width and query.height):
            raise SimsearchError(f"the query image is empty ({query.width} x {query.height} pixels)")
        return Query("image", "image", image=prepare_image(query))  # as a stored image: EXIF, transparency, 16 bit
    if isinstance(query, Path):
        return file_query(store, query.expanduser(), str(query))
    if isinstance(query, str):
        _ = store.items  # read first: a damaged or since-replaced items.jsonl is said as such, not as "no such item"
        try:
            return item_query(store, store.row_of(query))
        except SimsearchError:
            return file_query(store, Path(query).expanduser(), query)
    return Query("vector", "vector", vector=as_query_vector(_as_array(query), store.dim))


def item_query(store: Store, row: int) -> Query:
    """An item of the store as the query; its caption `ID (LABEL)`, or the id alone in an unlabelled store."""
    label = store.label_name(row)
    return Query("item", str(store.items[row]["id"]) + (f" ({label})" if label is not None else ""), row=row)


def file_query(store: Store, path: Path, typed: str) -> Query:
    """A .npy vector or an image file; a path that does not exist says so first."""
    if not typed.strip():
        raise SimsearchError("the query is empty: give an item id, a row, an image file or a .npy vector")
    if not path.exists():
        raise SimsearchError(f"query={typed!r}: no such file, and no item of the store has that id "
                             f"(ids, or rows 0..{len(store) - 1})")
    if path.is_dir():
        raise SimsearchError(f"query={typed!r} is a folder, not an image file")
    if not path.is_file():
        raise SimsearchError(f"query={typed!r} is not a regular file (a pipe, socket or device): give an image file")
    if path.suffix.lower() == ".npy":
        return Query("vector", path.name, vector=read_query_vector(path, store.dim))
    return Query("image", path.name, image=read_query_image(path))


def _as_array(query: Any) -> np.ndarray:
    if hasattr(query, "detach"):  # a torch tensor, perhaps on a GPU
        query = query.detach().float().cpu().numpy()
    if np.iscomplexobj(query):
        raise SimsearchError("a query vector must hold real numbers, not complex ones")
    try:
        return np.asarray(query, dtype=np.float64)  # float64: 1e38 and its norm stay finite
    except (TypeError, ValueError):
        raise SimsearchError(
            f"cannot search for a {type(query).__name__}: give a row, an id, a path, a PIL image or a vector"
        ) from None


def read_query_vector(path: Path, dim: int) -> np.ndarray:
    """One query vector from a .npy file (no pickle), checked against the store's width."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SimsearchError(f"cannot read the query vector {path}: {error}") from None
    return as_query_vector(array, dim)


def as_query_vector(vector: Any, dim: int) -> np.ndarray:
    """A (D,) or (1, D) finite vector as unit-norm float32 (1, D): the store's vectors are unit norm."""
    array = np.asarray(vector, dtype=np.float64)
    if array.size != dim or array.ndim > 2:
        raise SimsearchError(f"a query vector must have the store's {dim} values, not shape {array.shape}")
    array = array.reshape(1, dim)
    if not np.isfinite(array).all():
        raise SimsearchError("a query vector must be finite and not all zeros: this one holds NaN or infinite values")
    largest = float(np.abs(array).max())
    if largest == 0:
        raise SimsearchError("a query vector must be finite and not all zeros: this one is all zeros")
    array = array / largest  # scaled first: the norm of (1e38, 1e38) overflows, its direction does not
    return (array / np.linalg.norm(array)).astype(np.float32)


def read_query_image(path: Path) -> Image.Image:
    try:
        return decode_image(path)
    except UnreadableImage as error:
        raise SimsearchError(f"cannot read the query image {path}: {error}") from None


def neighbours_of(store: Store, searcher: Searcher, vector: np.ndarray, k: int, own_row: int | None,
                  query_label: int | None, selection: Selection | None = None) -> SearchResult:
    """The top-k of one vector; with a `selection` (a parsed filter), among the rows it keeps only."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise SimsearchError(f"k={k!r} must be a whole number of neighbours, e.g. k=10")
    k = int(k)
    if not 1 <= k <= len(store) - (own_row is not None):
        raise SimsearchError(f"k={k} is out of range: 1..{len(store) - (own_row is not None)} for this store")
    vector = vector.reshape(1, -1).astype(np.float32)
    if selection is not None:
        scores, rows = filtered_search(store, searcher, vector, k, selection, own_row)
    elif own_row is None:
        scores, rows = searcher.search(vector, k)
    else:
        scores, rows = search_without_self(searcher, vector, np.array([own_row]), k)
    labelled = query_label is not None and query_label >= 0
    neighbours = []
    for rank, (row, score) in enumerate(zip(rows[0].tolist(), scores[0].tolist()), start=1):
        if row < 0:
            continue
        item = store.items[row]
        relevant = bool(store.labels[row] == query_label) if labelled else None
        neighbours.append(Neighbour(rank, row, str(item["id"]), item.get("path"), store.label_name(row), score, relevant,
                                    store.metadata[row] if store.metadata_columns else None))
    precision = sum(bool(n.relevant) for n in neighbours) / k if labelled else None
    return SearchResult({}, neighbours, precision, selection.text if selection is not None else None, k)


def filtered_search(store: Store, searcher: Searcher, vector: np.ndarray, k: int, selection: Selection,
                    own_row: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A database that filters inside its search (Milvus) is asked first; where it returns fewer than k
    while more match (an approximate index), the answer is exact over the matching rows."""
    filtered = getattr(searcher, "search_filtered", None)
    scores, rows = filtered(vector, k, selection, own_row) if filtered is not None else (None, None)
    matching = len(selection.rows) - int(own_row is not None and bool(np.isin(own_row, selection.rows)))
    if rows is None or int((rows >= 0).sum()) < min(k, matching):
        scores, rows = search_among(store, searcher, vector, k, selection.rows, own_row)
    return scores, rows


def answer(store: Store, searcher: Searcher, query: Query, k: int, encoder: Callable[[], Any],
           selection: Selection | str | None = None) -> SearchResult:
    """The top-k of a parsed query; `encoder()` gives the store's query encoder, built only for an image;
    `selection`: a filter parsed by `simsearch.selection.select` (or its text, parsed here), checked before
    anything is embedded."""
    if not isinstance(selection, Selection):
        selection = select(store, selection)
    if query.kind == "item":
        result = neighbours_of(store, searcher, store.vectors(np.array([query.row])), k, query.row,
                               int(store.labels[query.row]), selection)
        item = store.items[query.row]
        result.query = {"row": query.row, "id": str(item["id"]), "path": item.get("path"),
                        "label": store.label_name(query.row)}
        return result
    vector = query.vector if query.kind == "vector" else encoder().encode([query.image])
    if not (np.isfinite(vector).all() and float(np.linalg.norm(vector)) > 0.5):  # unit norm expected
        raise SimsearchError(f"the query {query.caption!r} gives a zero or non-finite embedding (a blank image: "
                             "all white, all black or fully transparent, for this model): nothing is similar to it")
    result = neighbours_of(store, searcher, vector, k, None, None, selection)
    result.query = {"vector": True} if query.kind == "vector" else {"file": query.caption}
    return result


def query_encoder(store: Store, device: str = "auto") -> Any:
    """The model that embeds new images as the store's were: imported here, the one deferred import of
    this module, so that a search by item or vector never loads torch."""
    from simsearch.model.query import QueryEncoder

    return QueryEncoder(store.manifest, device)


def single_query_index(index_cfg: DictConfig) -> DictConfig:
    """index.device=auto means the CPU for one query: the saved index is memory-mapped there, and a GPU
    would first need the whole store copied to it (and torch imported)."""
    return OmegaConf.merge(index_cfg, {"device": "cpu"}) if index_cfg.device == "auto" else index_cfg


def result_table(result: SearchResult, missing: list[str | None] | None = None) -> str:
    """One line per neighbour; `missing[i]`, when given, says why neighbour i's image cannot be shown."""
    lines = [f"{'rank':>4}  {'score':>7}  {'label':<14}  id"]
    for n, reason in zip(result.neighbours, missing or [None] * len(result.neighbours)):
        mark = "" if n.relevant is None else (" +" if n.relevant else " -")
        note = f"  (image unavailable: {reason})" if reason else ""
        shown = n.id if n.id.isprintable() else repr(n.id)  # a newline in a file name stays on its line
        label = "" if n.label is None else str(n.label)  # an unlabelled store: no "None" in every row
        lines.append(f"{n.rank:>4}  {n.score:>7.4f}  {label:<14}  {shown}{mark}{metadata_text(n.metadata)}{note}")
    if not result.neighbours:
        lines.append("   (no item matches the filter)")
    if any(n.relevant is not None for n in result.neighbours):
        lines.append("   (+: the query's label, -: another label)")
    return "\n".join(lines)


def metadata_text(metadata: dict[str, Any] | None) -> str:
    """`  category=dress price=45.0`: an item's catalogue values on its line (null ones left out)."""
    return "  " + metadata_line(metadata) if metadata else ""
