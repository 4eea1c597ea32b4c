"""Evaluation: metric values against hand-computed cases, a slow loop reference and torchmetrics."""

from collections import defaultdict

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.retrieval import RetrievalMAP, RetrievalPrecision, RetrievalRecall, RetrievalRPrecision

from simsearch.config import Config
from simsearch.errors import SimsearchError
from simsearch.evaluate import evaluate_store, per_query_metrics
from simsearch.index import FAISS_GPU_MAX_K, FaissSearcher, build_index
from tests.conftest import FASHION_MNIST, TINY, clustered, make_vector_store, read_json, simsearch
from tests.wandb_records import offline_summary

SCHEMA = OmegaConf.structured(Config)


def configs(backend="exact", ks=(1, 5, 10, 20, 100), factory="Flat"):
    eval_cfg = OmegaConf.merge(SCHEMA.eval, {"k": list(ks), "backend": backend, "query_chunk": 7, "device": "cpu"})
    return eval_cfg, OmegaConf.merge(SCHEMA.index, {"factory": factory, "device": "cpu"})


def reference_metrics(embeddings: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[str, float]:
    """The definitions in evaluate.py, written as plainly as possible: one query at a time."""
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = embeddings @ embeddings.T
    values = defaultdict(list)
    for q in range(len(labels)):
        others = [j for j in range(len(labels)) if j != q]
        ranked = sorted(others, key=lambda j: -similarity[q, j])
        relevant = [labels[j] == labels[q] for j in ranked]
        R = sum(relevant)
        if labels[q] < 0 or R == 0:
            continue
        for K in ks:
            hits = sum(relevant[:K])
            values[f"precision@{K}"].append(hits / K)
            values[f"recall@{K}"].append(hits / R)
            precisions = [sum(relevant[: i + 1]) / (i + 1) for i in range(K) if relevant[i]]
            values[f"map@{K}"].append(sum(precisions) / len(precisions) if precisions else 0.0)
        values["map@r"].append(sum(sum(relevant[: i + 1]) / (i + 1) for i in range(R) if relevant[i]) / R)
        values["r_precision"].append(sum(relevant[:R]) / R)
    return {name: float(np.mean(v)) for name, v in values.items()}


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
        for name, metric in (("precision", RetrievalPrecision), ("recall", RetrievalRecall), ("map", RetrievalMAP)):
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
    metrics = evaluate_store(store, *configs(ks=[3]))
    assert metrics["per_class"]["c0"]["precision@3"] == pytest.approx(reference_metrics(vectors, labels, [3]) and
                                                                      np.mean([2 / 3, 2 / 3, 2 / 3]))
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


def test_eval_command_writes_metrics_json_and_prints_the_report_line(tmp_path, capsys):
    assert simsearch("extract", "data=synthetic", "data.num_items=24", *TINY, "run.dir=out") == 0
    assert simsearch("eval", "run.dir=out", "logger=none", "eval.k=[1,5,10]") == 0
    printed = capsys.readouterr().out
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert {"precision@10", "recall@10", "map@10", "map@r", "r_precision", "per_class"} <= set(metrics)
    assert f"Precision@10: {metrics['precision@10']:.2f}" in printed
    assert set(metrics["per_class"]) == {"class_0", "class_1", "class_2", "class_3"}


def test_eval_logs_to_wandb_offline(tmp_path):
    assert simsearch("extract", "data=synthetic", "data.num_items=12", *TINY, "run.dir=out") == 0
    code = simsearch("eval", "run.dir=out", "eval.k=[1,5]", "logger=wandb", f"logger.wandb.dir={tmp_path}")
    assert code == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
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
