"""A filter over a store's items, parsed once: the store's columns (`label` and the catalogue's), the
parsed tree and the rows it keeps. The store's format knows no filter language; the query, the
evaluation and the Milvus back end all take a `Selection` instead of the text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simsearch.filters import Column, evaluate, parse_filter
from simsearch.store import Store


@dataclass(frozen=True)
class Selection:
    """`text` as typed, its parsed `tree`, the `kinds` of the columns it may name, and the `rows` it keeps
    (ascending)."""

    text: str
    tree: Any
    kinds: dict[str, str]
    rows: np.ndarray


def filter_columns(store: Store) -> dict[str, Column]:
    """What a filter may name: `label` and the metadata columns, as arrays over the rows (built once per store)."""
    if "filter_columns" not in store.derived:
        if store.classes:
            labels = Column("str", np.asarray(store.labels, dtype=np.int64), store.classes)
            labels.values = np.where(labels.values < len(store.classes), labels.values, -1)
        else:  # labels without class names (a store made from Python) compare as numbers
            labels = Column("int", np.where(store.labels >= 0, store.labels, np.nan).astype(np.float64), [])
        columns = {"label": labels}
        metadata = store.metadata
        for name, kind in store.metadata_columns.items():
            columns[name] = Column.of(kind, [values[name] for values in metadata])
        store.derived["filter_columns"] = columns
    return store.derived["filter_columns"]


def select(store: Store, text: str | None) -> Selection | None:
    """The filter `text` parsed over the store's columns (one sentence if it is bad); None without a filter."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    columns = filter_columns(store)
    kinds = {name: column.kind for name, column in columns.items()}
    tree = parse_filter(text, kinds)
    return Selection(text, tree, kinds, np.flatnonzero(evaluate(tree, columns, len(store))))
