"""The retrieval metrics: one table (`METRICS`). What is computed, printed, saved in metrics.json, compared,
monitored while fine-tuning and logged to W&B all read it; a new metric is one `@register_metric` entry.

Each metric is a function of one ranking per query: `hits` (Q, depth) bool, True where the neighbour at
that position shares the query's class, and `relevant` (Q,), R_q, the number of relevant items. A name
with `{k}` is computed for every K of `eval.k`. Definitions (docs/evaluation.md):

    hit@K        = 1 if at least one relevant item is in the top K, else 0 (papers' "Recall@K")
    Precision@K  = hits in the top K / K
    Recall@K     = hits in the top K / R_q                (torchmetrics' RetrievalRecall)
    mAP@K        = mean over the hits i <= K of hits(1..i) / i, 0 when no hit (torchmetrics' RetrievalMAP(top_k=K))
    MAP@R        = (1 / R_q) * sum over i <= R_q of hit_i * hits(1..i) / i   (Musgrave et al., 2020)
    R-precision  = hits in the top R_q / R_q
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str  # "precision@{k}" (one value per K) or "map@r"
    compute: Callable[..., np.ndarray]  # (hits, relevant[, k]) -> (Q,) values
    heading: str  # the printed table's column

    @property
    def per_k(self) -> bool:
        return "{k}" in self.name

    def names(self, ks: list[int]) -> list[str]:
        return [self.name.format(k=k) for k in ks] if self.per_k else [self.name]


METRICS: dict[str, Metric] = {}


def register_metric(name: str, heading: str | None = None) -> Callable:
    """`@register_metric("ndcg@{k}")` on `fn(hits, relevant, k) -> (Q,)` (or `fn(hits, relevant)` without `{k}`)."""

    def register(compute: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        METRICS[name] = Metric(name, compute, heading or name.replace("{k}", "K"))
        return compute

    return register


def _hits_at(hits: np.ndarray, k: int) -> np.ndarray:
    return hits[:, :k].sum(axis=1)


@register_metric("hit@{k}", "hit@K")
def hit_at_k(hits: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    return (_hits_at(hits, k) > 0).astype(float)


@register_metric("precision@{k}", "Precision@K")
def precision_at_k(hits: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    return _hits_at(hits, k) / k


@register_metric("recall@{k}", "Recall@K")
def recall_at_k(hits: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    return _hits_at(hits, k) / relevant


def _precision_at_each(hits: np.ndarray) -> np.ndarray:
    return np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)  # (Q, depth)


@register_metric("map@{k}", "mAP@K")
def map_at_k(hits: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    found = _hits_at(hits, k)
    ap_sum = (_precision_at_each(hits)[:, :k] * hits[:, :k]).sum(axis=1)
    return np.divide(ap_sum, found, out=np.zeros_like(ap_sum, dtype=float), where=found > 0)


def _within_r(hits: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    return np.arange(1, hits.shape[1] + 1)[None, :] <= relevant[:, None]  # (Q, depth): position i <= R_q


@register_metric("map@r", "MAP@R")
def map_at_r(hits: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    return (_precision_at_each(hits) * hits * _within_r(hits, relevant)).sum(axis=1) / relevant


@register_metric("r_precision", "R-precision")
def r_precision(hits: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    return (hits * _within_r(hits, relevant)).sum(axis=1) / relevant


def metric_names(ks: list[int]) -> list[str]:
    """Every scalar metric of an evaluation at `ks`, in the table's order (per-K metrics by K, then the rest)."""
    per_k = [m for m in METRICS.values() if m.per_k]
    return [m.name.format(k=k) for k in ks for m in per_k] + [m.name for m in METRICS.values() if not m.per_k]


def per_query_metrics(hits: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """Every metric's value per query from a (Q, depth) hit matrix (True: same class) and R_q per query."""
    values: dict[str, np.ndarray] = {}
    for metric in METRICS.values():
        if metric.per_k:
            values.update({metric.name.format(k=k): metric.compute(hits, relevant, k) for k in ks})
        else:
            values[metric.name] = metric.compute(hits, relevant)
    return values


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
    """A short plain-text table of the overall metrics (one column per metric of the table, one row per K),
    then the other metrics on one line, then the original report's line."""
    per_k = [m for m in METRICS.values() if m.per_k and m.name.format(k=metrics["k"][0]) in metrics]
    widths = [max(7, len(m.heading)) for m in per_k]
    lines = [f"{'K':>5}  " + "  ".join(f"{m.heading:>{w}}" for m, w in zip(per_k, widths))]
    for K in metrics["k"]:
        lines.append(f"{K:>5}  " + "  ".join(f"{metrics[m.name.format(k=K)]:>{w}.4f}" for m, w in zip(per_k, widths)))
    others = [f"{m.heading}: {metrics[m.name]:.4f}" for m in METRICS.values() if not m.per_k and m.name in metrics]
    lines.append("   ".join(others) + f"   queries: {metrics['queries']} "
                 f"(left out, no relevant item: {metrics['queries_without_relevant']})")
    if "query_sample" in metrics:
        sample = metrics["query_sample"]
        lines.append(f"queries: a seeded sample of {sample['sampled']} of {sample['of']} (seed {sample['seed']})")
    if "gallery" in metrics:
        lines.append(f"gallery: {metrics['gallery']['dir']} ({metrics['gallery']['count']} items)")
    search = metrics.get("search", {})
    if not search.get("exact", True):
        lines.append(f"search: the FAISS index {search['factory']} {search['search_params']}".rstrip()
                     + " (approximate: a relevant item it misses lowers every metric)")
    if 10 in metrics["k"]:
        lines.append(f"Precision@10: {metrics['precision@10']:.2f}")
    return "\n".join(lines)
