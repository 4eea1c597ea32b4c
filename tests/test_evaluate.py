"""Evaluation: metric values against hand-computed cases, a slow loop reference and torchmetrics."""

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.retrieval import (
    RetrievalHitRate,
    RetrievalMAP,
    RetrievalPrecision,
    RetrievalRecall,
    RetrievalRPrecision,
)

from simsearch.config import Config
from simsearch.errors import SimsearchError
from simsearch.evaluation import evaluate_store, sample_queries
from simsearch.index import FAISS_GPU_MAX_K, FaissSearcher, build_index
from simsearch.knn import ExactSearcher, StoredRows
from simsearch.metrics import per_query_metrics
from simsearch.store import Store, create_store, manifest_checksum
from tests.helpers import (
    FASHION_MNIST,
    SYNTHETIC_24,
    TINY,
    clustered,
    copy_store,
    make_vector_store,
    mean_of,
    ranking_metrics,
    read_json,
    reference_query_gallery,
    simsearch,
    simsearch_subprocess,
)
from tests.wandb_records import offline_summary

SCHEMA = OmegaConf.structured(Config)


def configs(backend="exact", ks=(1, 5, 10, 20, 100), factory="Flat"):
    eval_cfg = OmegaConf.merge(SCHEMA.eval, {"k": list(ks), "backend": backend, "query_chunk": 7, "device": "cpu"})
    return eval_cfg, OmegaConf.merge(SCHEMA.index, {"factory": factory, "device": "cpu"})


def reference_per_query(embeddings: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[int, dict[str, float]]:
    """Leave-one-out, one query at a time; equal scores rank by row (Python's sort is stable)."""
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = embeddings @ embeddings.T
    result = {}
    for q in range(len(labels)):
        ranked = sorted((j for j in range(len(labels)) if j != q), key=lambda j: -similarity[q, j])
        values = ranking_metrics([labels[j] == labels[q] for j in ranked], ks) if labels[q] >= 0 else None
        if values is not None:
            result[q] = values
    return result


def reference_metrics(embeddings: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[str, float]:
    """The definitions in evaluate.py, averaged over the queries that have a relevant item."""
    return mean_of(list(reference_per_query(embeddings, labels, ks).values()))


def torchmetrics_values(embeddings: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[str, float]:
    """torchmetrics' retrieval metrics over the full similarity matrix (the plain way)."""
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    n = len(labels)
    similarity = torch.from_numpy(embeddings @ embeddings.T)
    query = torch.arange(n)[:, None].expand(n, n)
    keep = ~torch.eye(n, dtype=torch.bool) & torch.from_numpy(labels >= 0)[:, None]
    # torchmetrics counts a score <= 0 as not retrieved: shift cosines into (0, 2] so that all rank
    preds, target = (similarity + 2.0)[keep], torch.from_numpy(labels[:, None] == labels[None, :])[keep]
    indexes = query[keep]
    result = {}
    for K in ks:
        for name, metric in (("precision", RetrievalPrecision), ("recall", RetrievalRecall), ("map", RetrievalMAP),
                             ("hit", RetrievalHitRate)):
            result[f"{name}@{K}"] = float(metric(top_k=K, empty_target_action="skip")(preds, target, indexes))
    result["r_precision"] = float(RetrievalRPrecision(empty_target_action="skip")(preds, target, indexes))
    return result


def test_hand_computed_case_with_a_negative_score(tmp_path):
    # q0 = (1, 0): neighbours 1 (0.8, other class), 2 (0.6, same), 3 (-1.0, same). R = 2.
    vectors = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    hits = np.array([[False, True, True]])
    values = {k: float(v[0]) for k, v in per_query_metrics(hits, np.array([2]), [1, 2, 3]).items()}
    assert values["precision@1"] == 0 and values["precision@2"] == 0.5 and values["precision@3"] == pytest.approx(2 / 3)
    assert values["recall@3"] == 1.0 and values["map@3"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert values["map@r"] == pytest.approx(0.25) and values["r_precision"] == 0.5
    # Through a store: the negative-score neighbour still ranks (torchmetrics on raw cosines would drop it).
    labels = np.array([0, 1, 0, 0])
    store = make_vector_store(tmp_path / "s", vectors, labels)
    metrics = evaluate_store(store, *configs(ks=[1, 3]))
    # every c0 query has its two class-mates among its 3 others: 2/3 each, the loop reference agrees
    assert reference_metrics(vectors, labels, [3])["precision@3"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["c0"]["precision@3"] == pytest.approx(2 / 3)
    assert metrics["precision@3"] == pytest.approx(2 / 3) and metrics["hit@1"] == metrics["precision@1"] == pytest.approx(1 / 3)
    assert metrics["queries"] == 3 and metrics["queries_without_relevant"] == 1  # class 1 has one member


@pytest.mark.parametrize("backend", ["exact", "index"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_stores_equal_loop_reference_and_torchmetrics(tmp_path, backend, seed):
    embeddings, labels = clustered(150, 6, dim=16, spread=2.0, seed=seed)
    labels[:3] = [5, 5, -1]  # an unlabelled item; class sizes vary, some K exceed class sizes
    labels[labels == 4] = 3
    labels[10] = 4  # a class with a single member: left out
    ks = [1, 3, 10, 40, 100]
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    ours = evaluate_store(store, *configs(backend, ks))
    reference = reference_metrics(embeddings, labels, ks)
    plain = torchmetrics_values(embeddings, labels, ks)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    for name, value in plain.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert ours["queries_without_relevant"] == 2
    assert sum(c["queries"] for c in ours["per_class"].values()) == ours["queries"]


def test_recall_denominator_counts_relevant_items_not_retrieved(tmp_path):
    # Class 0 has 30 members: at K=5 a perfect ranking still recalls only 5 of 29.
    embeddings, labels = clustered(60, 2, dim=8, spread=0.01)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    metrics = evaluate_store(store, *configs(ks=[5]))
    sizes = np.bincount(labels)
    expected = np.mean([5 / (sizes[y] - 1) for y in labels])
    assert metrics["precision@5"] == 1.0 and metrics["recall@5"] == pytest.approx(expected)


@pytest.mark.parametrize("backend", ["exact", "index"])
def test_leave_one_out_by_id_when_exact_duplicates_tie(tmp_path, backend):
    rng = np.random.default_rng(0)
    duplicate = rng.normal(size=8)
    embeddings = np.vstack([np.tile(duplicate, (5, 1)), rng.normal(size=(20, 8))])
    labels = np.array([0] * 5 + [1] * 20)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    metrics = evaluate_store(store, *configs(backend, ks=[1, 4]))
    # each copy's 4 other copies tie with it at cosine 1: all are found, the query itself never is
    assert metrics["per_class"]["c0"]["precision@4"] == 1.0
    assert metrics["per_class"]["c0"]["recall@4"] == 1.0


def test_unlabelled_store_is_refused(tmp_path):
    store = make_vector_store(tmp_path / "s", np.eye(3), np.array([-1, -1, -1]), classes=["x"])
    with pytest.raises(SimsearchError, match="no labels"):
        evaluate_store(store, *configs())


def test_faiss_gpu_k_limit_falls_back_instead_of_truncating(tmp_path):
    embeddings, labels = clustered(2100, 1, dim=8)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    index, _ = build_index(store, configs()[1])

    class GpuIndexDouble:  # stands in for a FAISS GPU index: refuses k over its limit, as the real one does
        def search(self, queries, k):
            assert k <= FAISS_GPU_MAX_K, "k over the GPU limit reached the GPU index"
            return index.search(queries, k)

    searcher = FaissSearcher(index, device="cpu")
    searcher.gpu_index = GpuIndexDouble()
    scores, rows = searcher.search(store.vectors(slice(0, 3)), 2099)
    assert rows.shape == (3, 2099) and (rows >= 0).all()
    assert searcher.search(store.vectors(slice(0, 3)), 10)[1].shape == (3, 10)


def test_eval_command_writes_metrics_json_and_prints_the_report_line(extracted_once, tmp_path, capsys):
    copy_store(extracted_once(*SYNTHETIC_24), tmp_path / "out")
    assert simsearch("eval", "run.dir=out", "logger=none", "eval.k=[1,5,10]") == 0
    printed = capsys.readouterr().out
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert {"precision@10", "recall@10", "map@10", "map@r", "r_precision", "per_class"} <= set(metrics)
    assert f"Precision@10: {metrics['precision@10']:.2f}" in printed
    assert set(metrics["per_class"]) == {"class_0", "class_1", "class_2", "class_3"}


def test_eval_logs_to_wandb_offline(extracted_once, tmp_path, capsys):
    copy_store(extracted_once(*SYNTHETIC_24), tmp_path / "out")
    capsys.readouterr()
    code = simsearch("eval", "run.dir=out", "eval.k=[1,5]", "logger=wandb", f"logger.wandb.dir={tmp_path}")
    assert code == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    said = capsys.readouterr().out  # the run is a folder nobody would look for: the command says where it is
    assert f"W&B: offline run saved in {runs[0].parent}" in said and f"wandb sync {runs[0].parent}" in said, said
    summary = offline_summary(runs[0])
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert summary["test/precision@5"] == pytest.approx(metrics["precision@5"])
    assert summary["test/map@r"] == pytest.approx(metrics["map@r"])


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_real_images_metrics_agree_with_an_independent_implementation(tmp_path):
    assert simsearch("extract", "data=fashion_mnist", "data.limit=200", "data.batch_size=100", *TINY, "run.dir=out") == 0
    assert simsearch("eval", "run.dir=out", "logger=none", "eval.k=[1,10,50]") == 0
    metrics = read_json(tmp_path / "out" / "metrics.json")
    embeddings = np.load(tmp_path / "out" / "embeddings.npy")
    labels = np.load(tmp_path / "out" / "labels.npy")
    # float64 reference against float32 search: near-ties (cosines equal to ~1e-7) may swap places
    for name, value in reference_metrics(embeddings.astype(np.float64), labels, [1, 10, 50]).items():
        assert metrics[name] == pytest.approx(value, abs=2e-3), name
    assert metrics["precision@10"] > 0.3  # real classes cluster even under a random network (chance: 0.1)


# ---------------------------------------------------------------- ties, blocks, devices, query/gallery


def sign_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors of +-1, dim a power of 4: after normalising, every entry is +-1/sqrt(dim) (a power of 2) and every
    cosine a multiple of 1/dim, exact in float32 whatever the order of summation, so ties are exact on any
    blocking or device."""
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, dim))


def eval_configs(**eval_values):
    eval_cfg, index_cfg = configs(ks=eval_values.pop("ks", (1, 2, 5, 10, 30)))
    return OmegaConf.merge(eval_cfg, eval_values), index_cfg


def brute_force_top(gallery: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    rows = []
    for i, query in enumerate(queries):
        scores = gallery @ query
        rows.append(sorted((j for j in range(len(gallery)) if exclude is None or j != exclude[i]),
                           key=lambda j: -scores[j])[:k])
    return np.array(rows)


@pytest.mark.parametrize("kernels", ["numpy", "numpy-small-tiles", "torch"])
@pytest.mark.parametrize("block_rows, device", [(1, "cpu"), (7, "cpu"), (16, "cpu,cpu,cpu"), (1000, "cpu,cpu")])
def test_exact_searcher_ranks_ties_by_row_across_blocks_and_devices(tmp_path, monkeypatch, block_rows, device, kernels):
    if kernels == "numpy-small-tiles":  # several query tiles per block, several partition steps per tile
        monkeypatch.setattr("simsearch.knn.CPU_TILE_ELEMENTS", 5 * block_rows)
        monkeypatch.setattr("simsearch.knn.PARTITION_ELEMENTS", 2 * block_rows)
    torch_on_cpu = kernels == "torch"
    vectors = sign_vectors(90, 16, seed=3)
    vectors[40:50] = vectors[3]  # exact duplicates, and cosines in 17 values only: ties everywhere
    vectors = (vectors / 4).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    for source in (vectors, StoredRows(tmp_path / "v.npy")):
        searcher = ExactSearcher(source, device, block_rows=block_rows, torch_on_cpu=torch_on_cpu)
        queries, own = vectors[::4], np.arange(0, 90, 4)
        assert (searcher.search(queries, 25)[1] == brute_force_top(vectors, queries, 25)).all()
        scores, rows = searcher.search(queries, 89, exclude_rows=own)
        assert (rows == brute_force_top(vectors, queries, 89, exclude=own)).all()
        assert not (rows == own[:, None]).any() and (rows >= 0).all()
        assert np.allclose(scores, np.take_along_axis(queries @ vectors.T, rows, axis=1))


def test_stored_rows_reads_any_rows_without_mapping_the_file(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float16)
    np.save(tmp_path / "v.npy", vectors)
    stored = StoredRows(tmp_path / "v.npy")
    assert len(stored) == 50 and stored.block(45, 60).shape == (5, 3)
    rows = np.array([7, 3, 4, 5, 49, 3, 0])
    assert stored.take(rows).dtype == np.float32 and (stored.take(rows) == vectors[rows].astype(np.float32)).all()
    (tmp_path / "v.npy").write_bytes((tmp_path / "v.npy").read_bytes()[:-10])
    with pytest.raises(SimsearchError, match="truncated"):
        StoredRows(tmp_path / "v.npy").block(40, 50)


@pytest.mark.parametrize("block_rows, device", [(16, "cpu"), (5, "cpu,cpu")])
def test_leave_one_out_across_blocks_with_ties_equals_the_loop(tmp_path, block_rows, device):
    vectors = sign_vectors(120, 16, seed=1)
    labels = np.random.default_rng(1).integers(0, 5, size=120)
    labels[:2] = -1
    vectors[60:64] = vectors[10]  # exact duplicates of row 10, in other blocks and other classes
    store = make_vector_store(tmp_path / "s", vectors, labels)
    ks = [1, 2, 5, 10, 30]
    ours = evaluate_store(store, *eval_configs(block_rows=block_rows, device=device, query_chunk=9, ks=ks))
    reference = reference_metrics(vectors, labels, ks)
    assert set(reference) <= set(ours) and ours["protocol"] == "leave-one-out"
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert ours["queries"] == 118 and ours["queries_without_relevant"] == 2
    assert ExactSearcher(store.vectors(), device, block_rows).search(store.vectors(slice(10, 11)), 5)[1][0, 0] == 10


def query_gallery_stores(tmp_path, seed: int = 0, dim: int = 16):
    """A query store and a gallery store built apart: different class lists and orders, classes present in
    only one of them, unlabelled items, and vectors of the query store duplicated in the gallery."""
    rng = np.random.default_rng(seed)
    gallery_classes, query_classes = ["boot", "bag", "coat", "dress", "only_gallery"], ["only_query", "dress", "coat", "bag", "boot"]
    gallery_vectors, gallery_labels = sign_vectors(70, dim, seed), rng.integers(0, 5, size=70)
    query_vectors, query_labels = sign_vectors(40, dim, seed + 100), rng.integers(0, 5, size=40)
    query_labels[:2] = -1
    gallery_vectors[:5] = query_vectors[5:10]
    gallery = make_vector_store(tmp_path / "gallery", gallery_vectors, gallery_labels, gallery_classes)
    queries = make_vector_store(tmp_path / "queries", query_vectors, query_labels, query_classes)
    names = lambda labels, classes: [classes[y] if y >= 0 else None for y in labels]  # noqa: E731
    reference_inputs = (query_vectors / np.sqrt(dim), names(query_labels, query_classes),
                        gallery_vectors / np.sqrt(dim), names(gallery_labels, gallery_classes))
    return queries, gallery, reference_inputs


@pytest.mark.parametrize("block_rows, device", [(65_536, "cpu"), (8, "cpu"), (9, "cpu,cpu")])
def test_query_gallery_equals_brute_force_with_ties_and_names_matched(tmp_path, block_rows, device):
    queries, gallery, reference_inputs = query_gallery_stores(tmp_path)
    ks = [1, 2, 5, 10, 30]
    ours = evaluate_store(queries, *eval_configs(block_rows=block_rows, device=device, ks=ks), gallery=gallery)
    reference = reference_query_gallery(*reference_inputs, ks)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    for K in ks:
        assert ours[f"hit@{K}"] >= ours[f"precision@{K}"] and ours["hit@1"] == ours["precision@1"]
    only_query = int((queries.labels == 0).sum())  # class "only_query" has nothing in the gallery
    assert ours["queries_without_relevant"] == only_query + 2 and "only_query" not in ours["per_class"]
    assert ours["protocol"] == "query-gallery" and ours["items"] == 70
    assert ours["gallery"]["count"] == 70 and ours["gallery"]["dir"] == str((tmp_path / "gallery").resolve())


def test_query_gallery_with_the_faiss_index_equals_brute_force(tmp_path):
    rng = np.random.default_rng(5)
    gallery = make_vector_store(tmp_path / "g", rng.normal(size=(80, 12)), rng.integers(0, 4, 80), ["a", "b", "c", "d"])
    query_vectors, query_labels = rng.normal(size=(30, 12)), rng.integers(0, 4, 30)
    queries = make_vector_store(tmp_path / "q", query_vectors, query_labels, ["d", "c", "b", "a"])
    ours = evaluate_store(queries, *configs("index", ks=[1, 5, 20]), gallery=gallery)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    reference = reference_query_gallery(unit(query_vectors), [["d", "c", "b", "a"][y] for y in query_labels],
                                        gallery.vectors(), [["a", "b", "c", "d"][y] for y in gallery.labels], [1, 5, 20])
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name


def test_sampled_queries_are_seeded_recorded_and_ranked_against_every_item(tmp_path):
    embeddings, labels = clustered(90, 4, dim=8, spread=1.5, seed=2)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    ours = evaluate_store(store, *eval_configs(queries=25, ks=[1, 5]), seed=7)
    assert ours["queries"] == 25 and ours["items"] == 90
    assert ours["query_sample"] == {"sampled": 25, "of": 90, "seed": 7,
                                    "note": "a seeded sample of the queries; every item stays in the gallery"}
    rows, _ = sample_queries(np.arange(90), 25, seed=7)
    reference = reference_per_query(embeddings, labels, [1, 5])
    for name, value in mean_of([reference[int(r)] for r in rows]).items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert evaluate_store(store, *eval_configs(queries=25, ks=[1, 5]), seed=7) == ours
    assert "query_sample" not in evaluate_store(store, *eval_configs(queries=500, ks=[1, 5]))


def test_eval_command_query_gallery_writes_metrics_naming_the_gallery(tmp_path, capsys):
    queries, gallery, reference_inputs = query_gallery_stores(tmp_path, seed=4)
    code = simsearch("eval", f"run.dir={queries.dir}", f"eval.gallery={gallery.dir}", "logger=none", "eval.k=[1,5,10]",
                     "eval.block_rows=16", "eval.device=cpu")
    assert code == 0
    metrics = read_json(queries.dir / "metrics.json")
    assert metrics["gallery"]["dir"] == str(gallery.dir.resolve()) and metrics["protocol"] == "query-gallery"
    assert metrics["gallery"]["embeddings_sha256"] == gallery.manifest["sha256"]["embeddings.npy"]
    for name, value in reference_query_gallery(*reference_inputs, [1, 5, 10]).items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert f"gallery: {gallery.dir.resolve()}" in capsys.readouterr().out
    assert not (gallery.dir / "metrics.json").exists() and not list(queries.dir.glob(".*partial"))


def test_metrics_name_the_search_and_the_exact_embeddings_of_both_stores(tmp_path, capsys):
    """metrics.json says whether an approximate index found the neighbours, and which embeddings (by
    checksum) were queries and gallery: a store re-extracted since no longer matches its metrics."""
    queries, gallery, _ = query_gallery_stores(tmp_path, seed=2)
    arguments = ["eval", f"run.dir={queries.dir}", f"eval.gallery={gallery.dir}", "logger=none", "eval.k=[1,5]"]
    assert simsearch(*arguments) == 0
    exact = read_json(queries.dir / "metrics.json")
    assert exact["search"] == {"backend": "exact", "exact": True} and "approximate" not in capsys.readouterr().out
    assert exact["store"]["embeddings_sha256"] == queries.manifest["sha256"]["embeddings.npy"]
    assert exact["store"]["dir"] == str(queries.dir.resolve()) and exact["store"]["count"] == 40
    assert simsearch(*arguments, "eval.backend=index", "index.factory=IVF4,Flat", "index.device=cpu") == 0
    approximate = read_json(queries.dir / "metrics.json")
    assert approximate["search"] == {"backend": "index", "factory": "IVF4,Flat", "search_params": "", "exact": False}
    assert "search: the FAISS index IVF4,Flat (approximate" in capsys.readouterr().out


def test_a_block_larger_than_the_store_is_the_store(tmp_path, caplog):
    """eval.block_rows=10^14 must not make the CPU score one query at a time (its tile is 2^24 / block)."""
    caplog.set_level("INFO", logger="simsearch.evaluation")
    queries, gallery, reference_inputs = query_gallery_stores(tmp_path, seed=6)
    assert simsearch("eval", f"run.dir={queries.dir}", f"eval.gallery={gallery.dir}", "logger=none", "eval.k=[1,5]",
                     "eval.block_rows=100000000000000", "eval.device=cpu") == 0
    assert "(1 block(s) of 70 rows)" in caplog.text
    assert read_json(queries.dir / "metrics.json")["hit@5"] == pytest.approx(reference_query_gallery(*reference_inputs, [5])["hit@5"])


def test_class_names_match_across_unicode_normalisations_and_absent_classes_are_named(tmp_path, caplog):
    """A gallery folder copied from macOS names 'Pull óver' in NFD: it is still the query's class."""
    vectors, labels = sign_vectors(24, 16, seed=7), np.arange(24) % 3
    nfc, nfd = "Pull \u00f3ver", "Pull o\u0301ver"
    queries = make_vector_store(tmp_path / "q", vectors[:12], labels[:12], [nfc, "Coat", "only here"])
    gallery = make_vector_store(tmp_path / "g", vectors[12:], labels[12:], ["Coat", nfd, "Bag"])
    assert simsearch("eval", "run.dir=q", "eval.gallery=g", "logger=none", "eval.k=[1,4]") == 0
    metrics = read_json(tmp_path / "q" / "metrics.json")
    names = lambda store: [unicodedata.normalize("NFC", store.label_name(r)) for r in range(len(store))]  # noqa: E731
    expected = reference_query_gallery(queries.vectors(), names(queries), gallery.vectors(), names(gallery), [1, 4])
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name
    assert metrics["queries"] == 8 and metrics["queries_without_relevant"] == 4 and nfc in metrics["per_class"]
    assert "1 class(es) of the queries have no item in the gallery ('only here'): their 4 queries" in caplog.text


def test_metrics_that_cannot_be_saved_are_printed_then_one_sentence(tmp_path):
    """A run.dir where metrics.json cannot be written (read-only, or here a folder in the way, which root
    cannot override either): the table is printed, then one sentence, exit 2, and no stray file."""
    queries, gallery, _ = query_gallery_stores(tmp_path, seed=8)
    (queries.dir / "metrics.json").mkdir()
    result = simsearch_subprocess("eval", "run.dir=queries", "eval.gallery=gallery", "logger=none", "eval.k=[1,5]",
                                  cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: the metrics above could not be saved in queries (Is a directory)" in result.stderr
    assert "hit@K" in result.stdout and "MAP@R" in result.stdout
    assert not list(queries.dir.glob(".metrics.json.*"))


def test_a_gallery_holding_the_query_vectors_warns_that_every_query_finds_itself(tmp_path, caplog):
    queries, _, _ = query_gallery_stores(tmp_path)
    copy = make_vector_store(tmp_path / "copy", queries.vectors(), queries.labels, queries.classes)
    assert simsearch("eval", f"run.dir={queries.dir}", f"eval.gallery={copy.dir}", "logger=none", "eval.k=1") == 0
    assert "holds the very vectors of the query store" in caplog.text
    assert read_json(queries.dir / "metrics.json")["hit@1"] == 1.0  # what the warning explains


def test_a_gallery_re_extracted_after_eval_opened_it_is_refused_never_mixed(tmp_path, monkeypatch, capsys):
    """Another run swaps a new store into the gallery between eval's verified open and its reads: the
    new vectors must not be ranked under the old labels and checksum."""
    from simsearch.stages import evaluate

    queries, gallery, _ = query_gallery_stores(tmp_path, seed=3)

    def re_extract_the_gallery():  # eval opened both stores just before it looks for a launcher's ranks
        make_vector_store(gallery.dir, sign_vectors(70, 16, seed=99), gallery.labels, gallery.classes)

    monkeypatch.setattr(evaluate, "join_launched_ranks", re_extract_the_gallery)
    code = simsearch("eval", f"run.dir={queries.dir}", f"eval.gallery={gallery.dir}", "logger=none")
    assert code == 2 and "was replaced after its store was opened" in capsys.readouterr().err
    assert not (queries.dir / "metrics.json").exists()


def test_stored_rows_read_the_file_they_opened_while_a_new_one_is_swapped_in(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    stored = StoredRows(tmp_path / "v.npy")
    np.save(tmp_path / "new.npy", -vectors)
    (tmp_path / "new.npy").replace(tmp_path / "v.npy")  # what an extraction's swap does
    assert (stored.block(0, 20) == vectors).all() and (stored.take(np.array([19, 0])) == vectors[[19, 0]]).all()


def test_api_evaluates_against_a_gallery_given_or_from_eval_gallery(tmp_path):
    import simsearch as api

    queries, gallery, reference_inputs = query_gallery_stores(tmp_path, seed=5)
    reference = reference_query_gallery(*reference_inputs, [1, 5])
    for metrics in (api.open(queries.dir).evaluate(k=[1, 5], gallery=gallery.dir),
                    api.open(queries.dir, f"eval.gallery={gallery.dir}").evaluate(k=[1, 5]),
                    api.open(queries.dir).evaluate(k=[1, 5], gallery=api.open(gallery.dir))):
        assert metrics["protocol"] == "query-gallery" and metrics["gallery"]["count"] == 70
        for name, value in reference.items():
            assert metrics[name] == pytest.approx(value, abs=1e-9), name


@pytest.mark.parametrize("arguments, message", [
    (["eval.gallery=nowhere"], "no store in nowhere"),
    (["eval.gallery=queries"], "is the query store itself"),
    (["eval.gallery=other_dim"], "dim 16 and the gallery"),
    (["eval.queries=0"], "eval.queries must be a positive"),
    (["eval.block_rows=0"], "eval.block_rows must be at least 1"),
    (["eval.device=tpu"], "device must be auto, cpu, cuda"),
])
def test_eval_bad_input_is_one_line(tmp_path, arguments, message):
    query_gallery_stores(tmp_path)
    make_vector_store(tmp_path / "other_dim", np.eye(4), np.array([0, 1, 0, 1]))
    result = simsearch_subprocess("eval", "run.dir=queries", "logger=none", *arguments, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_folders_of_real_images_as_query_and_gallery_equal_an_independent_brute_force(tmp_path):
    """As a user would: Fashion-MNIST images written as PNG files into class folders, a query folder and a
    gallery folder with different class sets (so their label numbers differ), each extracted on its own."""
    from PIL import Image

    from simsearch.pixels import FASHION_MNIST_FILES, read_idx

    names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    images = read_idx(FASHION_MNIST / FASHION_MNIST_FILES["test"][0])[:400]
    labels = read_idx(FASHION_MNIST / FASHION_MNIST_FILES["test"][1])[:400]
    for i, (image, label) in enumerate(zip(images, labels)):
        in_query = i % 4 == 0 and label != 9  # boots only in the gallery; the query folder has a class of its own
        folder = tmp_path / ("query" if in_query else "gallery") / (names[label] if label != 3 or not in_query else "gown")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    for part in ("query", "gallery"):
        assert simsearch("extract", "data=folder", f"data.root={part}", *TINY, f"run.dir=store-{part}") == 0
    assert simsearch("eval", "run.dir=store-query", "eval.gallery=store-gallery", "eval.k=[1,10]", "logger=none") == 0
    metrics = read_json(tmp_path / "store-query" / "metrics.json")

    def vectors_and_names(run_dir: Path) -> tuple[np.ndarray, list[str]]:  # class names from the paths alone
        items = [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]
        return np.load(run_dir / "embeddings.npy").astype(np.float64), [Path(item["path"]).parent.name for item in items]

    reference = reference_query_gallery(*vectors_and_names(tmp_path / "store-query"),
                                        *vectors_and_names(tmp_path / "store-gallery"), [1, 10])
    for name, value in reference.items():  # float64 against float32: near-ties may swap
        assert metrics[name] == pytest.approx(value, abs=5e-3), name
    gowns = sum(1 for i, label in enumerate(labels) if i % 4 == 0 and label == 3)
    assert metrics["queries"] == 100 - sum(1 for i in range(0, 400, 4) if labels[i] == 9) - gowns
    assert metrics["queries_without_relevant"] == gowns and metrics["protocol"] == "query-gallery"


def test_query_gallery_refuses_stores_of_different_models(tmp_path):
    queries, gallery, _ = query_gallery_stores(tmp_path)
    for store, weights in ((queries, "imagenet"), (gallery, "random")):
        manifest = read_json(store.dir / "manifest.json")
        manifest["model"] = {"name": "resnet50", "weights": weights, "image_size": 224}
        manifest["manifest_sha256"] = manifest_checksum(manifest)  # as if extracted so
        (store.dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SimsearchError, match=r"embedded differently \(model.weights"):
        evaluate_store(Store.open(queries.dir), *configs(), gallery=Store.open(gallery.dir))


MEMORY_PROBE = """
import json, sys
import numpy as np
from omegaconf import OmegaConf
from simsearch.config import Config
from simsearch.evaluation import evaluate_embeddings, evaluate_store
from simsearch.store import Store

# warm-up on a separate small array: the first matrix product maps BLAS's kernels and thread buffers
warm = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
evaluate_embeddings(warm / np.linalg.norm(warm, axis=1, keepdims=True), np.arange(500) % 5, [], [1])
store = Store.open(sys.argv[1])
schema = OmegaConf.structured(Config)
eval_cfg = OmegaConf.merge(schema.eval, {"k": [1, 10], "device": "cpu", "queries": 64, "query_chunk": 16,
                                         "block_rows": 2048, "backend": "exact"})
def high_water_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
before = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
metrics = evaluate_store(store, eval_cfg, schema.index)
print(json.dumps({"before_kb": before, "peak_kb": high_water_kb(), "queries": metrics["queries"],
                  "hit@10": metrics["hit@10"]}))
"""


PEAK_RSS_OF_CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                     "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_evaluation_memory_is_bounded_by_chunk_and_block_not_by_the_store(tmp_path):
    rows, dim = 60_000, 512  # a 123 MB store; chunk x block = 16 x 2,048 scores (128 kB)
    store_dir = tmp_path / "big"
    embeddings = np.lib.format.open_memmap(tmp_path / "vectors.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 10_000):
        block = rng.normal(size=(10_000, dim)).astype(np.float32)
        embeddings[start : start + 10_000] = block / np.linalg.norm(block, axis=1, keepdims=True)
    embeddings.flush()
    labels = rng.integers(0, 1_000, size=rows)
    items = [{"id": str(i), "index": i, "label": str(y)} for i, y in enumerate(labels)]
    create_store(store_dir, embeddings, labels, items, {"data": {"classes": [str(c) for c in range(1_000)]}, "model": {}})
    del embeddings
    (tmp_path / "vectors.npy").unlink()
    store_mb = (store_dir / "embeddings.npy").stat().st_size / 2**20
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(store_dir)], capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    growth_mb = (result["peak_kb"] - result["before_kb"]) / 1024
    assert result["queries"] == 64 and 0 <= result["hit@10"] <= 1
    assert growth_mb < store_mb / 4, f"evaluation grew RSS by {growth_mb:.0f} MB for a {store_mb:.0f} MB store"
    # the whole `simsearch eval` process, interpreter included (no torch on the CPU), from a fresh parent
    whole = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_CHILD, str(Path(sys.executable).parent / "simsearch"), "eval",
                            f"run.dir={store_dir}", "eval.queries=64", "eval.query_chunk=16", "eval.block_rows=2048",
                            "eval.device=cpu", "eval.k=[1,10]", "logger=none"], capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    peak_mb = int(whole.stdout.split()[-1]) / 1024
    assert peak_mb < 0.75 * store_mb, f"`simsearch eval` peaked at {peak_mb:.0f} MB for a {store_mb:.0f} MB store"


def test_query_gallery_eval_logs_metrics_and_the_gallery_to_wandb_offline(tmp_path):
    queries, gallery, _ = query_gallery_stores(tmp_path, seed=2)
    code = simsearch("eval", f"run.dir={queries.dir}", f"eval.gallery={gallery.dir}", "eval.k=[1,5]", "logger=wandb",
                     f"logger.wandb.dir={tmp_path}")
    assert code == 0
    summary = offline_summary(next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")))
    metrics = read_json(queries.dir / "metrics.json")
    assert summary.get("test/hit@5") == pytest.approx(metrics["hit@5"]), sorted(summary)
    assert summary["test/protocol"] == "query-gallery" and summary["test/gallery"] == str(gallery.dir.resolve())


@pytest.mark.slow
def test_eval_under_torchrun_shares_the_blocks_among_ranks_and_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node=2 -m simsearch eval ...`: each rank searches its half of the blocks (gloo on
    the CPU), the top-k lists are gathered and merged by row, and only rank 0 writes metrics.json."""
    vectors = sign_vectors(70, 16, seed=5)
    vectors[50:54] = vectors[3]  # exact duplicates of a row of rank 0's half in rank 1's half: ties across ranks
    labels = np.random.default_rng(5).integers(0, 4, size=70)
    make_vector_store(tmp_path / "s", vectors, labels)
    common = ["eval", "run.dir=s", "logger=none", "eval.block_rows=8", "eval.k=[1,5,30]", "eval.device=cpu"]
    assert simsearch_subprocess(*common, cwd=tmp_path).returncode == 0
    alone = read_json(tmp_path / "s" / "metrics.json")
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "simsearch", "-v", *common],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Saved metrics") == 1 and "rank 1 of 2" in result.stderr
    ranked = read_json(tmp_path / "s" / "metrics.json")
    assert ranked.pop("ranks") == 2
    assert ranked == alone
