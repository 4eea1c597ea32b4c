"""Near-duplicate detection, the library under `simsearch duplicates`: groups of near-identical items of a
store, or leakage into another store.

Each item's top-k neighbours come from the store's index (never the N x N matrix), pairs scoring at
least `duplicates.threshold` (cosine) are joined, and groups are the connected components (union-find),
so a group larger than k still forms through chains of pairs. Pixel-identical copies score 1.0.
"""

from __future__ import annotations

import logging

import numpy as np

from simsearch.errors import SimsearchError
from simsearch.identity import check_same_model, stored_identity
from simsearch.knn import Searcher, search_without_self
from simsearch.store import Store

log = logging.getLogger(__name__)
QUERY_CHUNK = 4096  # queries per search call: memory is chunk x k
# Measured by scripts/duplicate_threshold.py on Fashion-MNIST copies (README, "Near-duplicates"). Random
# weights map every image to nearly the same direction (distinct images at cosine 0.997-0.9995), trained
# networks spread them out; a checkpoint or a state-dict file counts as trained.
DEFAULT_THRESHOLDS = {"random": 0.9998, "trained": 0.92}


def near_pairs(queries: Store, searcher: Searcher, k: int, threshold: float,
               exclude_self: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query rows, found rows, scores) of every top-k neighbour scoring >= threshold, query by query in chunks."""
    sources, targets, scores = [], [], []
    for start in range(0, len(queries), QUERY_CHUNK):
        rows = np.arange(start, min(start + QUERY_CHUNK, len(queries)))
        vectors = queries.vectors(rows)
        found_scores, found = (search_without_self(searcher, vectors, rows, k) if exclude_self
                               else searcher.search(vectors, k))  # (chunk, k) each
        close = (found_scores >= threshold) & (found >= 0)
        sources.append(np.repeat(rows, close.sum(axis=1)))
        targets.append(found[close])
        scores.append(found_scores[close])
    if not sources:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(sources), np.concatenate(targets).astype(np.int64), np.concatenate(scores)


def connected_groups(count: int, sources: np.ndarray, targets: np.ndarray) -> list[list[int]]:
    """Connected components of size >= 2 of the pairs (union-find with path halving), largest first."""
    parent = np.arange(count)

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    for a, b in zip(sources.tolist(), targets.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for row in np.unique(np.concatenate([sources, targets])).tolist():
        members.setdefault(root(row), []).append(row)
    groups = [sorted(rows) for rows in members.values() if len(rows) > 1]
    return sorted(groups, key=lambda rows: (-len(rows), rows[0]))


def same_model(a: Store, b: Store) -> None:
    """Vectors of two stores are comparable only from the same model and preprocessing."""
    if a.dim != b.dim:
        raise SimsearchError(f"the stores {a.dir} and {b.dir} have vectors of different sizes ({a.dim} and {b.dim})")
    if a.manifest.get("model") and b.manifest.get("model"):
        check_same_model(stored_identity(a.manifest), stored_identity(b.manifest), f"the store {a.dir}", f"the store {b.dir}")


def default_threshold(store: Store) -> float:
    """The measured threshold for the store's weights: random weights need a far higher one."""
    model = store.manifest.get("model", {})
    untrained = model.get("weights") == "random" and not model.get("checkpoint")
    return DEFAULT_THRESHOLDS["random" if untrained else "trained"]


def find_duplicates(store: Store, searcher: Searcher, k: int, threshold: float) -> list[list[int]]:
    """Groups of rows of the store whose items are near-identical, largest first."""
    k = min(k, len(store) - 1)
    if k < 1:
        return []
    sources, targets, _ = near_pairs(store, searcher, k, threshold, exclude_self=True)
    return connected_groups(len(store), sources, targets)


def find_leaks(store: Store, other: Store, other_searcher: Searcher, k: int,
               threshold: float) -> list[tuple[int, list[int], list[float]]]:
    """(row of this store, rows of the other store, their scores) for every item with a near-duplicate there."""
    sources, targets, scores = near_pairs(store, other_searcher, min(k, len(other)), threshold, exclude_self=False)
    leaks: dict[int, tuple[list[int], list[float]]] = {}
    for source, target, score in zip(sources.tolist(), targets.tolist(), scores.tolist()):
        leaks.setdefault(source, ([], []))
        leaks[source][0].append(target)
        leaks[source][1].append(score)
    return [(row, rows, found) for row, (rows, found) in sorted(leaks.items())]


def cosines_to_first(store: Store, rows: list[int]) -> np.ndarray:
    """The cosine of each row's vector to the first row's (stored vectors are unit length)."""
    vectors = np.asarray(store.vectors(np.asarray(rows)), dtype=np.float32)
    return vectors @ vectors[0]
