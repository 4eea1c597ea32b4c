"""Retrieval evaluation of a labelled store: every labelled item is a query against all the others.

Definitions, for a query q whose class has R_q other members in the store (q itself is excluded by
its row, not by assuming it ranks first: an exact duplicate ties with it):

    Precision@K  = hits in the top K / K
    Recall@K     = hits in the top K / R_q                (all relevant items in the store)
    mAP@K        = mean over the hits i <= K of hits(1..i) / i, 0 when no hit
                   (torchmetrics' RetrievalMAP(top_k=K): divides by the hits retrieved, not by R_q)
    MAP@R        = (1 / R_q) * sum over i <= R_q of hit_i * hits(1..i) / i   (Musgrave et al., 2020)
    R-precision  = hits in the top R_q / R_q

Queries without a label or without any other item of their class are left out of every average
(as in pytorch-metric-learning) and counted in `queries_without_relevant`. Labels are read only here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from omegaconf import DictConfig

from simsearch.errors import SimsearchError
from simsearch.index import ExactTorchSearcher, FaissSearcher, open_index
from simsearch.store import Store

log = logging.getLogger(__name__)


def search_without_self(searcher: Any, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, rows) of queries that are items of the store, each one's own row excluded by id."""
    if isinstance(searcher, ExactTorchSearcher):
        return searcher.search(queries, k, exclude_rows=rows)
    scores, found = searcher.search(queries, k + 1)
    own = found == rows[:, None]
    own[~own.any(axis=1), -1] = True  # self not among k + 1 (ties, approximate index): drop the last
    first_own = own & (np.cumsum(own, axis=1) == 1)
    return scores[~first_own].reshape(len(rows), k), found[~first_own].reshape(len(rows), k)


def per_query_metrics(hits: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """Metric values per query from a (Q, k) hit matrix (True: same class) and R_q per query."""
    positions = np.arange(1, hits.shape[1] + 1)
    cumulative = np.cumsum(hits, axis=1)
    precision_at_each = cumulative / positions  # (Q, k)
    metrics: dict[str, np.ndarray] = {}
    for K in ks:
        hits_k = cumulative[:, K - 1]
        metrics[f"precision@{K}"] = hits_k / K
        metrics[f"recall@{K}"] = hits_k / relevant
        ap_sum = (precision_at_each[:, :K] * hits[:, :K]).sum(axis=1)
        metrics[f"map@{K}"] = np.divide(ap_sum, hits_k, out=np.zeros_like(ap_sum, dtype=float), where=hits_k > 0)
    within_r = positions[None, :] <= relevant[:, None]  # (Q, k): position i <= R_q
    metrics["map@r"] = (precision_at_each * hits * within_r).sum(axis=1) / relevant
    metrics["r_precision"] = (hits * within_r).sum(axis=1) / relevant
    return metrics


def _searcher_for(store: Store, eval_cfg: DictConfig, index_cfg: DictConfig, seed: int) -> Any:
    if eval_cfg.backend == "exact":
        return ExactTorchSearcher(store.vectors(), eval_cfg.device)
    if eval_cfg.backend == "index":
        index, _ = open_index(store, index_cfg, seed)
        return FaissSearcher(index, index_cfg.device, index_cfg.gpu_sharded, index_cfg.batch_size)
    raise SimsearchError(f"eval.backend must be exact or index, not '{eval_cfg.backend}'")


def evaluate_store(store: Store, eval_cfg: DictConfig, index_cfg: DictConfig, seed: int = 0) -> dict[str, Any]:
    """Leave-one-out retrieval metrics of a labelled store, overall and per class."""
    if not store.has_labels:
        raise SimsearchError(f"the store {store.dir} has no labels: evaluation needs a labelled collection")
    searcher = _searcher_for(store, eval_cfg, index_cfg, seed)
    log.info("evaluating %d items of %s with %s", len(store), store.dir, searcher.description)
    metrics = evaluate_embeddings(store.embeddings, store.labels, store.classes, list(eval_cfg.k), searcher,
                                  eval_cfg.query_chunk)
    return metrics


def evaluate_embeddings(vectors: np.ndarray, labels: np.ndarray, classes: list[str], ks: list[int],
                        searcher: Any | None = None, query_chunk: int = 1024) -> dict[str, Any]:
    """Leave-one-out metrics of unit-norm (N, D) vectors with (N,) labels; exact search unless given one."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise SimsearchError(f"eval.k must be positive integers, not {ks}")
    class_sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(1, dtype=np.int64)
    relevant = np.where(labels >= 0, class_sizes[np.maximum(labels, 0)] - 1, 0)  # R_q, self excluded
    query_rows = np.flatnonzero(relevant > 0)
    if len(query_rows) == 0:
        raise SimsearchError("no labelled item has another item of its class: nothing to evaluate")
    others = len(labels) - 1
    if ks[-1] > others:
        log.warning("eval.k=%d is more than the %d other items: K is capped at %d", ks[-1], others, others)
        ks = sorted({min(k, others) for k in ks})
    depth = min(max(ks[-1], int(relevant.max())), others)  # MAP@R needs every query's R_q neighbours
    searcher = searcher or ExactTorchSearcher(vectors, "auto")
    log.debug("evaluating %d queries against %d items, top %d, with %s", len(query_rows), len(labels), depth,
              searcher.description)
    labels_or_none = np.append(labels, -2)  # row -1 (no neighbour found) matches no label
    chunk = max(1, min(query_chunk, (1 << 26) // max(depth, 1)))  # bound the (chunk, depth) arrays
    values: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(query_rows), chunk):
        rows = query_rows[start : start + chunk]
        queries = np.asarray(vectors[rows], dtype=np.float32)
        _, found = search_without_self(searcher, queries, rows, depth)
        hits = labels_or_none[found] == labels[rows][:, None]
        for name, value in per_query_metrics(hits, relevant[rows], ks).items():
            values.setdefault(name, []).append(value)
    per_query = {name: np.concatenate(parts) for name, parts in values.items()}
    return summarise(per_query, labels[query_rows], classes, ks, len(labels), len(labels) - len(query_rows))


def summarise(per_query: dict[str, np.ndarray], query_labels: np.ndarray, classes: list[str], ks: list[int],
              items: int, left_out: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {name: float(value.mean()) for name, value in per_query.items()}
    per_class = {}
    for label in np.unique(query_labels):
        mask = query_labels == label
        name = classes[label] if label < len(classes) else str(int(label))
        per_class[name] = {"queries": int(mask.sum()), **{n: float(v[mask].mean()) for n, v in per_query.items()}}
    metrics.update(k=ks, queries=int(len(query_labels)), queries_without_relevant=int(left_out), items=items,
                   per_class=per_class)
    return metrics


def metrics_table(metrics: dict[str, Any]) -> str:
    """A short plain-text table of the overall metrics, then the original report's line."""
    lines = [f"{'K':>5}  {'Precision@K':>11}  {'Recall@K':>9}  {'mAP@K':>7}"]
    for K in metrics["k"]:
        lines.append(f"{K:>5}  {metrics[f'precision@{K}']:>11.4f}  {metrics[f'recall@{K}']:>9.4f}  "
                     f"{metrics[f'map@{K}']:>7.4f}")
    lines.append(f"MAP@R: {metrics['map@r']:.4f}   R-precision: {metrics['r_precision']:.4f}   "
                 f"queries: {metrics['queries']} (left out, no relevant item: {metrics['queries_without_relevant']})")
    if 10 in metrics["k"]:
        lines.append(f"Precision@10: {metrics['precision@10']:.2f}")
    return "\n".join(lines)
