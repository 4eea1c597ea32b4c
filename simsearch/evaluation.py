"""The evaluation core: retrieval metrics of a labelled store: leave-one-out (every labelled item a query against all
the others) or query/gallery (the items of one store ranked against a second store).

Definitions, for a query q with R_q relevant items (leave-one-out: the other members of its class,
q itself excluded by its row, not by assuming it ranks first, so an exact duplicate ties with it;
query/gallery: the gallery items of its class, matched by class name, nothing excluded):

    hit@K        = 1 if at least one relevant item is in the top K, else 0
                   (the "Recall@K" of metric-learning papers; hit@1 = Precision@1)
    Precision@K  = hits in the top K / K
    Recall@K     = hits in the top K / R_q                (all relevant items; torchmetrics' RetrievalRecall)
    mAP@K        = mean over the hits i <= K of hits(1..i) / i, 0 when no hit
                   (torchmetrics' RetrievalMAP(top_k=K): divides by the hits retrieved, not by R_q)
    MAP@R        = (1 / R_q) * sum over i <= R_q of hit_i * hits(1..i) / i   (Musgrave et al., 2020)
    R-precision  = hits in the top R_q / R_q

Equal scores rank by gallery row, lowest first (exact search). Queries without a label or without
any relevant item are left out of every average (as in pytorch-metric-learning) and counted in
`queries_without_relevant`. Labels are read only here. `simsearch eval` (`stages/evaluate.py`) is its command;
fine-tuning's validation and `compare` call it too.
"""

from __future__ import annotations

import logging
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from simsearch.data.registry import DATASETS
from simsearch.errors import SimsearchError
from simsearch.identity import check_same_model, stored_identity
from simsearch.index import FaissSearcher, check_backend, open_index
from simsearch.knn import ExactSearcher, StoredRows, search_without_self, take_rows
from simsearch.metrics import KNN_WEIGHTS, Ranking, per_query_metrics, summarise
from simsearch.milvus import open_milvus
from simsearch.runtime import cuda_available, phase_bar
from simsearch.selection import select
from simsearch.store import Store, create_store

log = logging.getLogger(__name__)


def _check_sizes(eval_cfg: DictConfig) -> None:
    for key in ("query_chunk", "block_rows"):
        if int(eval_cfg[key]) < 1:
            raise SimsearchError(f"eval.{key} must be at least 1, not {eval_cfg[key]}")
    if eval_cfg.queries is not None and int(eval_cfg.queries) < 1:
        raise SimsearchError(f"eval.queries must be a positive number of queries (or null for all), not {eval_cfg.queries}")


def _searcher_for(gallery: Store, eval_cfg: DictConfig, index_cfg: DictConfig, seed: int,
                  ranks: tuple[int, int, int] | None = None) -> Any:
    """The exact blocked search (under a launcher: this rank's share of the blocks, on its own GPU for
    eval.device=auto), or the store's FAISS index (eval.backend=index)."""
    if eval_cfg.backend == "exact":
        device = eval_cfg.device
        if ranks and device == "auto":
            device = f"cuda:{ranks[2]}" if cuda_available() else "cpu"
        return ExactSearcher(stored_rows(gallery), device, int(eval_cfg.block_rows), ranks=ranks[:2] if ranks else None)
    if eval_cfg.backend == "index" and check_backend(index_cfg) == "milvus":
        return open_milvus(gallery, index_cfg)
    if eval_cfg.backend == "index":
        index, _ = open_index(gallery, index_cfg, seed)
        return FaissSearcher(index, index_cfg.device, index_cfg.gpu_sharded, index_cfg.batch_size)
    raise SimsearchError(f"eval.backend must be exact or index, not '{eval_cfg.backend}'")


def stored_rows(store: Store) -> StoredRows:
    """The store's embeddings.npy read block by block: the very file the store verified when opened."""
    return StoredRows(store.dir / "embeddings.npy", store.embeddings_identity)


def describe_search(eval_cfg: DictConfig, index_cfg: DictConfig) -> dict[str, Any]:
    """How neighbours were found, for metrics.json: an approximate index gives other (lower) numbers."""
    if eval_cfg.backend == "index":
        described = {"backend": "index", "factory": index_cfg.factory, "search_params": index_cfg.search_params,
                     "exact": index_cfg.factory.replace(" ", "").lower() in ("flat", "idmap,flat")}
        return {**described, "index_backend": "milvus"} if index_cfg.get("backend") == "milvus" else described
    return {"backend": "exact", "exact": True}


def class_names(store: Store) -> np.ndarray:
    """The class name of every row ('' where unlabelled): what two separately built stores share. Names are
    compared in Unicode NFC: a folder copied from macOS spells 'ó' as 'o' + an accent (NFD)."""
    listed = [*store.classes, *(str(i) for i in range(len(store.classes), int(store.labels.max()) + 1))]
    names = np.array([unicodedata.normalize("NFC", name) for name in listed] or [""], dtype=object)
    return np.where(store.labels >= 0, names[np.maximum(store.labels, 0)], "")


def shared_labels(queries: Store, gallery: Store) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Both stores' labels renumbered into one list of class names (gallery's first), -1 where unlabelled."""
    query_names, gallery_names = class_names(queries), class_names(gallery)
    classes = list(dict.fromkeys(n for n in [*gallery_names, *query_names] if n != ""))
    absent = sorted(set(query_names) - set(gallery_names) - {""})
    if absent:  # often a spelling that differs between the two stores ('Coat' / 'coat')
        log.warning("%d class(es) of the queries have no item in the gallery (%s): their %d queries are left out",
                    len(absent), ", ".join(repr(name) for name in absent[:5]) + (", ..." if len(absent) > 5 else ""),
                    int(np.isin(query_names, absent).sum()))
    number = {name: i for i, name in enumerate(classes)}
    number[""] = -1

    def renumber(names: np.ndarray) -> np.ndarray:
        return np.array([number[n] for n in names], dtype=np.int64)

    return renumber(query_names), renumber(gallery_names), classes


def check_comparable(queries: Store, gallery: Store) -> None:
    """Query and gallery vectors must come from the same model to be compared at all."""
    if queries.dim != gallery.dim:
        raise SimsearchError(f"the query store {queries.dir} has dim {queries.dim} and the gallery {gallery.dir} "
                             f"dim {gallery.dim}: embed both with the same model")
    if queries.manifest.get("model") and gallery.manifest.get("model"):
        check_same_model(stored_identity(queries.manifest), stored_identity(gallery.manifest),
                         f"the query store {queries.dir}", f"the gallery {gallery.dir}")


def sample_queries(rows: np.ndarray, wanted: int | None, seed: int) -> tuple[np.ndarray, dict[str, Any] | None]:
    """A seeded sample of `wanted` query rows (sorted), and what metrics.json says of it; all rows when None."""
    if wanted is None or wanted >= len(rows):
        return rows, None
    chosen = np.sort(np.random.default_rng(seed).choice(rows, size=int(wanted), replace=False))
    note = {"sampled": int(wanted), "of": int(len(rows)), "seed": int(seed),
            "note": "a seeded sample of the queries; every item stays in the gallery"}
    return chosen, note


def evaluate_store(store: Store, eval_cfg: DictConfig, index_cfg: DictConfig, seed: int = 0,
                   gallery: Store | None = None, ranks: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Retrieval metrics of a labelled store, overall and per class: leave-one-out, or its items as
    queries against `gallery` (eval.gallery) when given. `eval.queries`: a seeded sample of queries.
    `ranks` (global rank, world size, local rank; `runtime.join_launched_ranks`): the exact search's
    blocks are shared among the ranks, and every rank returns the same metrics."""
    if eval_cfg.get("filter"):
        return evaluate_filtered(store, eval_cfg, index_cfg, seed, gallery, ranks)
    _check_sizes(eval_cfg)
    knn = KnnVote.from_config(eval_cfg)
    if not store.has_labels:
        raise SimsearchError(f"the store {store.dir} has no labels: evaluation needs a labelled collection")
    if gallery is None:
        kind = DATASETS.get(store.manifest.get("dataset"))
        if kind is not None and kind.query_gallery and store.manifest.get("split") in kind.query_gallery:
            log.warning("%s is the %s split of data=%s, evaluated leave-one-out: the benchmark's protocol (and the papers' "
                        "numbers) rank the %s split against the %s split: eval.gallery=GALLERY_RUN_DIR",
                        store.dir, store.manifest["split"], store.manifest["dataset"], *kind.query_gallery)
        searcher = _searcher_for(store, eval_cfg, index_cfg, seed, ranks)
        log.info("evaluating %d items of %s, leave-one-out, with %s", len(store), store.dir, searcher.description)
        metrics = rank_and_score(stored_rows(store), store.labels, store.labels, store.classes,
                                 list(eval_cfg.k), searcher, int(eval_cfg.query_chunk), leave_one_out=True,
                                 sample=eval_cfg.queries, seed=seed, knn=knn, progress=True)
        return {**metrics, "search": describe_search(eval_cfg, index_cfg)}
    if not gallery.has_labels:
        raise SimsearchError(f"the gallery {gallery.dir} has no labels: query/gallery evaluation needs both labelled")
    if Path(gallery.dir).resolve() == Path(store.dir).resolve():
        raise SimsearchError("eval.gallery is the query store itself: leave eval.gallery out for leave-one-out evaluation")
    check_comparable(store, gallery)
    checksum = store_identity(store)["embeddings_sha256"]
    if checksum is not None and checksum == store_identity(gallery)["embeddings_sha256"]:
        log.warning("the gallery %s holds the very vectors of the query store %s (a copy?): every query finds itself "
                    "first; leave eval.gallery out for leave-one-out evaluation", gallery.dir, store.dir)
    query_labels, gallery_labels, classes = shared_labels(store, gallery)
    searcher = _searcher_for(gallery, eval_cfg, index_cfg, seed, ranks)
    log.info("evaluating %d queries of %s against the %d items of %s with %s", len(store), store.dir, len(gallery),
             gallery.dir, searcher.description)
    metrics = rank_and_score(stored_rows(store), query_labels, gallery_labels, classes,
                             list(eval_cfg.k), searcher, int(eval_cfg.query_chunk), leave_one_out=False,
                             sample=eval_cfg.queries, seed=seed, knn=knn, progress=True)
    return {**metrics, "search": describe_search(eval_cfg, index_cfg), "gallery": store_identity(gallery)}


def evaluate_filtered(store: Store, eval_cfg: DictConfig, index_cfg: DictConfig, seed: int, gallery: Store | None,
                      ranks: tuple[int, int, int] | None) -> dict[str, Any]:
    """`eval.filter`: the evaluation of the items the filter keeps, queries and gallery both: each store's
    matching rows copied into a scratch store (vectors, labels, items; the same model), evaluated as any."""
    text = str(eval_cfg.filter)
    with tempfile.TemporaryDirectory(prefix="simsearch-filter-") as scratch:
        kept = filtered_copy(store, text, Path(scratch) / "queries")
        kept_gallery = None if gallery is None else filtered_copy(gallery, text, Path(scratch) / "gallery")
        metrics = evaluate_store(kept, OmegaConf.merge(eval_cfg, {"filter": None}), index_cfg, seed, kept_gallery, ranks)
    counts = {"queries": len(kept), **({} if kept_gallery is None else {"gallery": len(kept_gallery)})}
    return {**metrics, "filter": {"expression": text, **counts}}


def filtered_copy(store: Store, text: str, scratch: Path) -> Store:
    """A store of the rows of `store` that the filter keeps (refused with a sentence when it keeps none)."""
    rows = select(store, text).rows
    if len(rows) == 0:
        raise SimsearchError(f"eval.filter={text!r} keeps no item of the store {store.dir}: nothing to evaluate")
    left_out = ("count", "dim", "dtype", "sha256", "manifest_sha256", "format_version", "versions", "created", "metadata")
    description = {key: value for key, value in store.manifest.items() if key not in left_out}
    items = [store.items[row] for row in rows.tolist()]
    metadata = [store.metadata[row] for row in rows.tolist()] if store.metadata_columns else None
    return create_store(scratch, np.ascontiguousarray(store.embeddings[rows]), store.labels[rows], items, description,
                        metadata)


def store_identity(store: Store) -> dict[str, Any]:
    """Which store, exactly: its resolved directory, size, data set and split, and the checksum of the
    embeddings evaluated (a store re-extracted since has another)."""
    return {"dir": str(Path(store.dir).resolve()), "count": len(store),
            **{k: store.manifest.get(k) for k in ("dataset", "split")},
            "embeddings_sha256": store.manifest.get("sha256", {}).get("embeddings.npy")}


def evaluate_embeddings(vectors: np.ndarray, labels: np.ndarray, classes: list[str], ks: list[int],
                        searcher: Any | None = None, query_chunk: int = 1024) -> dict[str, Any]:
    """Leave-one-out metrics of unit-norm (N, D) vectors with (N,) labels; exact search unless given one,
    on this process's own GPU (one per rank under DDP) or the CPU."""
    import torch

    searcher = searcher or ExactSearcher(vectors, f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return rank_and_score(vectors, labels, labels, classes, ks, searcher, query_chunk, leave_one_out=True)


@dataclass(frozen=True)
class KnnVote:
    """How kNN accuracy votes (`eval.knn_k`, `eval.knn_weights`, `eval.knn_temperature`)."""

    ks: tuple[int, ...] = ()
    weights: str = "exp"
    temperature: float = 0.07

    @classmethod
    def from_config(cls, eval_cfg: DictConfig) -> KnnVote:
        ks = tuple(sorted({int(k) for k in eval_cfg.knn_k}))
        if any(k < 1 for k in ks):
            raise SimsearchError(f"eval.knn_k={list(eval_cfg.knn_k)} must be positive integers (or [] for none)")
        if eval_cfg.knn_weights not in KNN_WEIGHTS:
            raise SimsearchError(f"eval.knn_weights must be {', '.join(KNN_WEIGHTS)}, not '{eval_cfg.knn_weights}'")
        if not float(eval_cfg.knn_temperature) > 0:
            raise SimsearchError(f"eval.knn_temperature={eval_cfg.knn_temperature} must be a positive number")
        return cls(ks, str(eval_cfg.knn_weights), float(eval_cfg.knn_temperature))


def rank_and_score(queries: np.ndarray | StoredRows, query_labels: np.ndarray, gallery_labels: np.ndarray,
                   classes: list[str], ks: list[int], searcher: Any, query_chunk: int = 1024, leave_one_out: bool = True,
                   sample: int | None = None, seed: int = 0, knn: KnnVote = KnnVote(),
                   progress: bool = False) -> dict[str, Any]:
    """Rank the gallery for every evaluable query, chunk by chunk, and average the metrics: one search to the
    depth the deepest metric needs, every metric computed from the same lists. `progress`: a bar over the
    chunks on a terminal (`simsearch eval`, `compare`; not inside fine-tuning's validation).

    Leave-one-out: queries and gallery are the same rows and a query's own row is never ranked.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise SimsearchError(f"eval.k must be positive integers, not {ks}")
    label_count = max(int(query_labels.max(initial=-1)), int(gallery_labels.max(initial=-1)), 0) + 1
    class_sizes = np.bincount(gallery_labels[gallery_labels >= 0], minlength=label_count)
    relevant = np.where(query_labels >= 0, class_sizes[np.maximum(query_labels, 0)] - int(leave_one_out), 0)  # R_q
    evaluable = np.flatnonzero(relevant > 0)
    if len(evaluable) == 0:
        raise SimsearchError("no labelled query has a relevant item (another item of its class"
                             + (")" if leave_one_out else " in the gallery)") + ": nothing to evaluate")
    query_rows, sampling = sample_queries(evaluable, sample, seed)
    others = len(gallery_labels) - int(leave_one_out)
    if ks[-1] > others:
        log.warning("eval.k=%d is more than the %d items a query is ranked against: K is capped at %d", ks[-1], others, others)
        ks = sorted({min(k, others) for k in ks})
    knn_ks = sorted({min(k, others) for k in knn.ks})  # a K past the gallery is every item: the same vote
    # MAP@R needs every query's R_q neighbours, kNN accuracy its largest K
    depth = min(max(ks[-1], int(relevant[query_rows].max()), *knn_ks), others)
    log.debug("evaluating %d queries against %d items, top %d, with %s", len(query_rows), len(gallery_labels), depth,
              searcher.description)
    labels_or_none = np.append(gallery_labels, -2)  # row -1 (no neighbour found) matches no label
    chunk = max(1, min(query_chunk, (1 << 26) // max(depth, 1)))  # bound the (chunk, depth) arrays
    values: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(query_rows), chunk)
    for start in phase_bar(starts, "evaluating", unit="chunk", shown=progress and getattr(searcher, "rank", 0) == 0):
        rows = query_rows[start : start + chunk]
        vectors = take_rows(queries, rows)
        if leave_one_out:
            scores, found = search_without_self(searcher, vectors, rows, depth)
        else:
            scores, found = searcher.search(vectors, depth)
        neighbour_labels = labels_or_none[found]
        hits = neighbour_labels == query_labels[rows][:, None]
        ranking = Ranking(hits, relevant[rows], neighbour_labels, scores, query_labels[rows], knn.weights, knn.temperature)
        for name, value in per_query_metrics(hits, relevant[rows], ks, ranking, knn_ks).items():
            values.setdefault(name, []).append(value)
    per_query = {name: np.concatenate(parts) for name, parts in values.items()}
    metrics = summarise(per_query, query_labels[query_rows], classes, ks, len(gallery_labels),
                        len(query_labels) - len(evaluable))
    metrics["protocol"] = "leave-one-out" if leave_one_out else "query-gallery"
    if knn_ks:
        metrics["knn_k"] = knn_ks
        metrics["knn"] = {"weights": knn.weights, "temperature": knn.temperature}
    if sampling:
        metrics["query_sample"] = sampling
    return metrics
