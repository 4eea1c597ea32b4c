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
    kNN acc@K    = 1 if the vote of the top K neighbours' labels names the query's class (DINO/DINOv2's
                   k-NN classification; K from `eval.knn_k`): each neighbour votes for its class with weight
                   exp(cosine / T) (`eval.knn_weights=exp`, T = `eval.knn_temperature`), 1 (`uniform`), or
                   1 / (1 - cosine) (`distance`, scikit-learn's; neighbours at distance 0 alone vote when
                   present). Unlabelled neighbours do not vote; a tie goes to the class listed first.

A metric that needs more than hits (kNN accuracy: the neighbours' labels and scores) is registered with
`ranking=True` and receives a `Ranking`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from simsearch.registry import Registry


@dataclass(frozen=True)
class Ranking:
    """A chunk of queries' neighbour lists, best first: what a `ranking=True` metric is computed from."""

    hits: np.ndarray  # (Q, depth) bool: the neighbour shares the query's class
    relevant: np.ndarray  # (Q,) R_q
    neighbour_labels: np.ndarray  # (Q, depth) class numbers; < 0 where unlabelled or no neighbour
    scores: np.ndarray  # (Q, depth) cosine
    query_labels: np.ndarray  # (Q,)
    knn_weights: str = "exp"  # exp | uniform | distance
    knn_temperature: float = 0.07


@dataclass(frozen=True)
class Metric:
    name: str  # "precision@{k}" (one value per K) or "map@r"
    compute: Callable[..., np.ndarray]  # (hits, relevant[, k]) -> (Q,) values; (ranking[, k]) when `ranking`
    heading: str  # the printed table's column
    ranking: bool = False  # computed from a `Ranking`, not from (hits, relevant)
    ks: str = "k"  # which list of K it is computed for: eval.k ("k") or eval.knn_k ("knn_k")

    @property
    def per_k(self) -> bool:
        return "{k}" in self.name

    def names(self, ks: list[int]) -> list[str]:
        return [self.name.format(k=k) for k in ks] if self.per_k else [self.name]


METRICS: Registry[Metric] = Registry("metric", "metric")


def register_metric(name: str, heading: str | None = None, ranking: bool = False, ks: str = "k") -> Callable:
    """`@register_metric("ndcg@{k}")` on `fn(hits, relevant, k) -> (Q,)` (or `fn(hits, relevant)` without `{k}`);
    with `ranking=True`, on `fn(ranking, k)`; `ks="knn_k"` computes it for each K of `eval.knn_k`."""

    def register(compute: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        METRICS.add(name, Metric(name, compute, heading or name.replace("{k}", "K"), ranking, ks))
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


KNN_WEIGHTS = ("exp", "uniform", "distance")


def knn_votes(ranking: Ranking, k: int) -> np.ndarray:
    """(Q, classes) summed vote weights of the top k neighbours' labels."""
    labels, scores = ranking.neighbour_labels[:, :k], ranking.scores[:, :k].astype(np.float64)
    if ranking.knn_weights == "exp":  # DINOv2: exp(similarity / T)
        weights = np.exp(scores / ranking.knn_temperature)
    elif ranking.knn_weights == "uniform":
        weights = np.ones_like(scores)
    else:  # scikit-learn's weights="distance": 1 / distance; at distance 0, those neighbours alone vote
        distance = np.maximum(1.0 - scores, 0.0)
        exact = distance == 0
        with np.errstate(divide="ignore"):
            weights = np.where(exact.any(axis=1, keepdims=True), exact.astype(float), 1.0 / distance)
    weights = np.where(labels >= 0, weights, 0.0)  # unlabelled neighbours (and none found) do not vote
    classes = max(int(ranking.neighbour_labels.max(initial=-1)), int(ranking.query_labels.max(initial=-1)), 0) + 1
    votes = np.zeros((len(labels), classes))
    np.add.at(votes, (np.repeat(np.arange(len(labels)), labels.shape[1]), np.maximum(labels, 0).ravel()), weights.ravel())
    return votes


@register_metric("knn_accuracy@{k}", "kNN acc@K", ranking=True, ks="knn_k")
def knn_accuracy(ranking: Ranking, k: int) -> np.ndarray:
    votes = knn_votes(ranking, k)
    predicted = np.where(votes.max(axis=1) > 0, votes.argmax(axis=1), -1)  # argmax: a tie goes to the first class
    return (predicted == ranking.query_labels).astype(float)


def metric_names(ks: list[int], knn_ks: list[int] | tuple[int, ...] = ()) -> list[str]:
    """Every scalar metric of an evaluation at `ks` (and `knn_ks`), in the table's order: per-K metrics by K,
    then the others, then the kNN ones."""
    per_k = [m for m in METRICS.values() if m.per_k and m.ks == "k"]
    by_knn_k = [m for m in METRICS.values() if m.per_k and m.ks == "knn_k"]
    return ([m.name.format(k=k) for k in ks for m in per_k] + [m.name for m in METRICS.values() if not m.per_k]
            + [m.name.format(k=k) for m in by_knn_k for k in knn_ks])


def per_query_metrics(hits: np.ndarray, relevant: np.ndarray, ks: list[int], ranking: Ranking | None = None,
                      knn_ks: list[int] | tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Every metric's value per query from a (Q, depth) hit matrix (True: same class) and R_q per query;
    the `ranking=True` metrics too when the whole `ranking` is given."""
    values: dict[str, np.ndarray] = {}
    for metric in METRICS.values():
        if metric.ranking and ranking is None:
            continue
        source = (ranking,) if metric.ranking else (hits, relevant)
        if metric.per_k:
            for k in (knn_ks if metric.ks == "knn_k" else ks):
                values[metric.name.format(k=k)] = metric.compute(*source, k)
        else:
            values[metric.name] = metric.compute(*source)
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
    per_k = [m for m in METRICS.values() if m.per_k and m.ks == "k" and m.name.format(k=metrics["k"][0]) in metrics]
    widths = [max(7, len(m.heading)) for m in per_k]
    lines = [f"{'K':>5}  " + "  ".join(f"{m.heading:>{w}}" for m, w in zip(per_k, widths))]
    for K in metrics["k"]:
        lines.append(f"{K:>5}  " + "  ".join(f"{metrics[m.name.format(k=K)]:>{w}.4f}" for m, w in zip(per_k, widths)))
    others = [f"{m.heading}: {metrics[m.name]:.4f}" for m in METRICS.values() if not m.per_k and m.name in metrics]
    lines.append("   ".join(others) + f"   queries: {metrics['queries']} "
                 f"(left out, no relevant item: {metrics['queries_without_relevant']})")
    for metric in (m for m in METRICS.values() if m.per_k and m.ks == "knn_k"):
        shown = [f"@{k} {metrics[metric.name.format(k=k)]:.4f}" for k in metrics.get("knn_k", [])
                 if metric.name.format(k=k) in metrics]
        if shown:
            vote = metrics.get("knn", {})
            lines.append(f"{metric.heading.replace('@K', '')} ({vote.get('weights')} votes, T={vote.get('temperature')}): "
                         + "  ".join(shown))
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
