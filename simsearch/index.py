"""FAISS indexes over a store (exact or approximate, CPU or GPUs): build, save, load, search.

Inner product = cosine: the vectors are unit norm. An exact index answers with the same tie rule as
the exact kernel (`simsearch.knn`): equal scores rank by row, lowest first.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from simsearch.errors import SimsearchError
from simsearch.files import read_json, replace_atomically, sha256_of, write_text_atomically
from simsearch.knn import ExactSearcher, Searcher, cuda_available
from simsearch.milvus import open_milvus
from simsearch.store import Store, mismatched

log = logging.getLogger(__name__)
FAISS_GPU_MAX_K = 2048  # FAISS GPU indexes cannot return more neighbours per query
ADD_CHUNK = 65_536
SUBSET_EXACT_ROWS = 20_000  # a filter keeping fewer rows is searched exactly over a copy of them (20 MB at d=256)


def import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise SimsearchError(
            f"faiss is not importable ({error}): `pip install faiss-cpu`, or the gpu extra `pip install -e .[gpu]`"
        ) from None
    return faiss


@contextmanager
def faiss_left_as_it_was() -> Iterator[None]:
    """Run a block (importing pytorch-metric-learning) without leaving FAISS patched: PML imports
    faiss.contrib.torch_utils, which replaces Index.search and the rest, process-wide, with versions that take no
    `params`, so FAISS row selectors (filtered search) and Milvus Lite's own searches fail after fine-tuning in
    the same process. FAISS's methods are put back, unless torch_utils was imported before (by the user)."""
    patched_before = "faiss.contrib.torch_utils" in sys.modules
    try:
        yield
    finally:
        if not patched_before and "faiss.contrib.torch_utils" in sys.modules:
            restore_faiss_methods()


def restore_faiss_methods() -> None:
    """Undo faiss.contrib.torch_utils: it keeps each replaced method as `<name>_numpy` on the class it patched."""
    import faiss

    for symbol in dir(faiss):
        cls = getattr(faiss, symbol)
        if not (inspect.isclass(cls) and issubclass(cls, faiss.Index)):
            continue
        for name, original in list(vars(cls).items()):
            patched = getattr(cls, name.removesuffix("_numpy"), None) if name.endswith("_numpy") else None
            if getattr(patched, "__name__", "").startswith("torch_replacement_"):
                setattr(cls, name.removesuffix("_numpy"), original)
    if getattr(getattr(faiss, "knn", None), "__name__", "").startswith("torch_replacement_"):
        faiss.knn = faiss.knn_numpy


def faiss_gpu_count() -> int:
    faiss = import_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class FaissSearcher:
    """A FAISS index, on every visible GPU when faiss has GPU support; batched search."""

    def __init__(self, cpu_index: Any, device: str = "auto", sharded: bool = False, batch_size: int = 4096):
        faiss = import_faiss()
        self.cpu_index = cpu_index
        self.batch_size = batch_size
        self.gpu_index = None
        gpus = faiss_gpu_count()
        if device in ("gpu", "cuda") and gpus == 0:
            log.warning("index.device=%s but this faiss has no GPU support: searching on the CPU", device)
        if device in ("auto", "gpu", "cuda") and gpus > 0:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = sharded
            self.gpu_index = faiss.index_cpu_to_all_gpus(cpu_index, co=options)
            self.description = f"FAISS on {gpus} GPU(s), {'sharded' if sharded else 'replicated'}"
        else:
            self.description = f"FAISS on CPU ({faiss.omp_get_max_threads()} threads)"

    def _search(self, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        index = self.gpu_index
        if index is None or k > FAISS_GPU_MAX_K or params is not None:  # GPU indexes take no row selector
            if index is not None and params is None:
                log.info("k=%d exceeds FAISS GPU's limit of %d: searching on the CPU copy", k, FAISS_GPU_MAX_K)
            index = self.cpu_index
        extra = {} if params is None else {"params": params}
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces Index.search with a version that
        # takes no `params`; it keeps FAISS's own as search_numpy
        search = getattr(index, "search_numpy", index.search)
        results = [search(queries[s : s + self.batch_size], k, **extra) for s in range(0, len(queries), self.batch_size)]
        if not results:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]).astype(np.int64)

    def search(self, queries: np.ndarray, k: int, params: Any = None, total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k with simsearch's one tie rule (equal scores rank by row, lowest first), which FAISS does not
        keep: one extra neighbour shows a tie across the cut, and only those queries are searched deeper.
        `params`: FAISS search parameters (a row selector, of `total` rows)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        total = int(self.cpu_index.ntotal) if total is None else total
        k = min(k, total)
        depth = min(k + 1, total)
        scores, rows = self._search(queries, depth, params)
        best_scores, best_rows = lowest_row_first(scores, rows, k)
        if depth == k:
            return best_scores, best_rows
        crowded = np.flatnonzero((scores[:, k] == scores[:, k - 1]) & (rows[:, k] >= 0))
        while len(crowded) and depth < total:  # deepen until each tie group ends inside the list
            depth = min(total, depth * 2)
            deep_scores, deep_rows = self._search(queries[crowded], depth, params)
            best_scores[crowded], best_rows[crowded] = lowest_row_first(deep_scores, deep_rows, k)
            crowded = crowded[(deep_scores[:, -1] == deep_scores[:, k - 1]) & (deep_rows[:, -1] >= 0)]
        return best_scores, best_rows

    def search_rows(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among `rows` only, through a FAISS row selector (a bitmap over the index's rows) given
        in the index type's own search parameters; None where this index type takes no selector."""
        faiss = import_faiss()
        mask = np.zeros(int(self.cpu_index.ntotal), dtype=bool)
        mask[rows] = True
        bitmap = np.packbits(mask, bitorder="little")  # alive until the search returns: FAISS holds a pointer
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        index = faiss.downcast_index(self.cpu_index)
        if isinstance(index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(index.hnsw.efSearch, k))
        elif faiss.try_extract_index_ivf(index) is not None:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=faiss.try_extract_index_ivf(index).nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        try:
            return self.search(queries, k, params, total=len(rows))
        except RuntimeError as error:  # an index type without selectors: the caller searches the rows exactly
            log.info("this FAISS index takes no row selector (%s): searching the matching rows exactly",
                     str(error).splitlines()[0])
            return None


def search_among(store: Store, searcher: Searcher, queries: np.ndarray, k: int, rows: np.ndarray,
                 own_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact filtered search: the top-k among `rows` (ascending) only, `own_row` left out; fewer than k only
    when fewer rows are given. Few rows are searched exactly (copied); more go through the index's row
    selector, and again exactly where an approximate index found fewer than it should."""
    if own_row is not None:
        rows = rows[rows != own_row]
    k = min(k, len(rows))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    by_selector = getattr(searcher, "search_rows", None)
    if by_selector is not None and len(rows) > SUBSET_EXACT_ROWS:
        found = by_selector(queries, k, rows)
        if found is not None and (found[1] >= 0).all():
            return found
    scores, positions = ExactSearcher(store.vectors(rows), "cpu").search(queries, k)
    return scores, rows[positions]


def lowest_row_first(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each list, by score, then by row (lowest first); -1 rows (none found) last."""
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _apply_search_params(index: Any, search_params: str) -> None:
    if search_params:
        faiss = import_faiss()
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as error:
            raise SimsearchError(f"index.search_params='{search_params}' does not fit this index: {error}") from None


def build_index(store: Store, index_cfg: DictConfig, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Build a CPU FAISS index over the store (training on a seeded sample where needed)."""
    faiss = import_faiss()
    started = time.perf_counter()
    try:
        index = faiss.index_factory(store.dim, index_cfg.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise SimsearchError(f"index.factory='{index_cfg.factory}' is not a FAISS factory string: {error}") from None
    trained_on = 0
    if not index.is_trained:
        rows = np.random.default_rng(seed).permutation(len(store))[: index_cfg.train_size]
        sample = store.vectors(np.sort(rows))
        try:
            index.train(sample)
        except RuntimeError as error:
            raise SimsearchError(
                f"cannot train index '{index_cfg.factory}' on {len(sample)} vectors: {error} "
                "(use fewer lists/centroids or a larger index.train_size)"
            ) from None
        trained_on = len(sample)
    for start in range(0, len(store), ADD_CHUNK):
        index.add(store.vectors(slice(start, start + ADD_CHUNK)))
    _apply_search_params(index, index_cfg.search_params)
    info = {
        "factory": index_cfg.factory,
        "search_params": index_cfg.search_params,
        "metric": "inner_product",
        "ntotal": int(index.ntotal),
        "dim": store.dim,
        "trained_on": trained_on,
        "build_seconds": round(time.perf_counter() - started, 3),
        "store_embeddings_sha256": store.manifest.get("sha256", {}).get("embeddings.npy"),
        "store_manifest_sha256": store.manifest.get("manifest_sha256"),  # the store it was built from
        "faiss_version": getattr(faiss, "__version__", "unknown"),
    }
    return index, info


def save_index(index: Any, info: dict[str, Any], store_dir: Path) -> None:
    """index.faiss then index.json (with the checksum of index.faiss), each written beside and renamed: a
    killed save leaves no torn file, and an index.faiss changed since is never used."""
    faiss = import_faiss()

    def write(temporary: Path) -> None:
        faiss.write_index(index, str(temporary))
        info["index_sha256"] = sha256_of(temporary)

    replace_atomically(store_dir / "index.faiss", write)
    write_text_atomically(store_dir / "index.json", json.dumps(info, indent=2) + "\n")


def load_index(store: Store, index_cfg: DictConfig) -> tuple[Any, dict[str, Any]] | None:
    """The saved index of the store, if it exists, is current and was built with the same factory."""
    path, info_path = store.dir / "index.faiss", store.dir / "index.json"
    if not (path.is_file() and info_path.is_file()):
        return None
    try:
        info = read_json(info_path)  # a pipe, a key given twice, nesting too deep: rebuilt
    except (OSError, SimsearchError):
        log.warning("index.json in %s is unreadable: rebuilding the index", store.dir)
        return None
    if not isinstance(info, dict) or info.get("store_embeddings_sha256") != store.manifest.get("sha256", {}).get("embeddings.npy") \
            or info.get("store_manifest_sha256") != store.manifest.get("manifest_sha256"):
        log.warning("index.faiss in %s was built from another store: rebuilding it", store.dir)
        return None
    if info.get("factory") != index_cfg.factory:
        return None
    if not isinstance(info.get("index_sha256"), str) or mismatched(store.dir, {"index.faiss": info["index_sha256"]}):
        log.warning("index.faiss in %s does not match its checksum in index.json (changed since it was saved): "
                    "rebuilding it", store.dir)
        return None
    faiss = import_faiss()
    try:  # memory-mapped where the index type allows (flat codes since FAISS 1.9): pages are read as searched
        index = faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP))
    except RuntimeError as error:  # truncated or damaged
        log.warning("index.faiss in %s cannot be read (%s): rebuilding it", store.dir, str(error).splitlines()[0])
        return None
    if index.ntotal != len(store) or index.d != store.dim:
        log.warning("index.faiss in %s holds other rows than the store: rebuilding it", store.dir)
        return None
    _apply_search_params(index, index_cfg.search_params)
    info["search_params"] = index_cfg.search_params
    return index, info


def open_index(store: Store, index_cfg: DictConfig, seed: int = 0, save: bool = True) -> tuple[Any, dict[str, Any]]:
    """Load the store's index, or build (and save) it."""
    loaded = load_index(store, index_cfg)
    if loaded is not None:
        return loaded
    index, info = build_index(store, index_cfg, seed)
    if save:
        try:
            save_index(index, info, store.dir)
        except (OSError, RuntimeError) as error:  # a read-only store: search with the index in memory
            log.warning("cannot save the index in %s (%s): it is rebuilt at every start", store.dir,
                        str(error).splitlines()[0])
    return index, info


def check_backend(index_cfg: DictConfig) -> str:
    backend = index_cfg.get("backend", "faiss")
    if backend not in ("faiss", "milvus"):
        raise SimsearchError(f"index.backend must be faiss or milvus, not '{backend}'")
    return backend


def open_searcher(store: Store, index_cfg: DictConfig, seed: int = 0) -> Searcher:
    """What `search` and `serve` query: the FAISS index, or exact torch search on a GPU without faiss-gpu, or
    the store's Milvus collection (index.backend=milvus), brought in step with the store first."""
    if check_backend(index_cfg) == "milvus":
        searcher_of_milvus = open_milvus(store, index_cfg)
        log.info("searching with %s", searcher_of_milvus.description)
        return searcher_of_milvus
    exact = index_cfg.factory.strip().lower() in ("flat", "idmap,flat")
    wants_gpu = index_cfg.device in ("auto", "gpu", "cuda") and cuda_available()
    if exact and wants_gpu and faiss_gpu_count() == 0:
        searcher: Searcher = ExactSearcher(store.vectors(), "cuda")
    else:
        index, _ = open_index(store, index_cfg, seed)
        searcher = FaissSearcher(index, index_cfg.device, index_cfg.gpu_sharded, index_cfg.batch_size)
    log.info("searching with %s", searcher.description)
    return searcher
