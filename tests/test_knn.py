"""k-NN classification accuracy (DINO/DINOv2's protocol) from `simsearch eval`, against scikit-learn's
KNeighborsClassifier and against a plain loop of DINOv2's formula, in both protocols, with unlabelled items
and exact ties in the stores."""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from tests.helpers import make_vector_store, read_json, simsearch

CLASSES = 4


def labelled_vectors(count: int, seed: int, dim: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors; the first rows hold classes 0, 1, 2, 3 in order (the order classes are listed)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(CLASSES), rng.integers(0, CLASSES, size=count - CLASSES)])
    centres = np.random.default_rng(100).normal(size=(CLASSES, dim))
    vectors = centres[labels] + 1.2 * rng.normal(size=(count, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


def dinov2_loop(queries, query_labels, gallery, gallery_labels, k, temperature, exclude_self):
    """DINOv2's vote written plainly: top k by cosine (ties by row), each votes exp(s / T) for its class."""
    correct = []
    for q, (vector, label) in enumerate(zip(queries, query_labels)):
        if label < 0:
            continue
        scores = gallery @ vector
        order = sorted((r for r in range(len(gallery)) if not (exclude_self and r == q)), key=lambda r: (-scores[r], r))
        votes = {}
        for r in order[:k]:
            if gallery_labels[r] >= 0:
                votes[gallery_labels[r]] = votes.get(gallery_labels[r], 0.0) + float(np.exp(scores[r] / temperature))
        best = max(votes.values())
        correct.append(min(c for c, v in votes.items() if v == best) == label)
    return float(np.mean(correct))


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_query_gallery_knn_accuracy_equals_scikit_learn(tmp_path, weights):
    gallery_vectors, gallery_labels = labelled_vectors(80, seed=1)
    query_vectors, query_labels = labelled_vectors(40, seed=2)
    names = [f"c{i}" for i in range(CLASSES)]
    gallery = make_vector_store(tmp_path / "gallery", gallery_vectors, gallery_labels, names)
    queries = make_vector_store(tmp_path / "queries", query_vectors, query_labels, names)
    assert simsearch("eval", f"run.dir={queries.dir}", f"eval.gallery={gallery.dir}", "eval.k=[1]", "eval.knn_k=[1,5,10]",
                     f"eval.knn_weights={weights}", "logger=none") == 0
    metrics = read_json(queries.dir / "metrics.json")
    for k in (1, 5, 10):
        classifier = KNeighborsClassifier(n_neighbors=k, weights=weights, metric="cosine", algorithm="brute")
        expected = (classifier.fit(gallery_vectors, gallery_labels).predict(query_vectors) == query_labels).mean()
        assert metrics[f"knn_accuracy@{k}"] == pytest.approx(expected, abs=1e-12), k
    assert metrics["knn"] == {"weights": weights, "temperature": 0.07}


def test_leave_one_out_knn_accuracy_equals_dinov2_formula_with_ties_and_unlabelled_items(tmp_path, capsys):
    vectors, labels = labelled_vectors(60, seed=3)
    vectors[[10, 20, 30]] = vectors[5]  # exact ties across the cut
    labels = labels.copy()
    labels[[7, 8, 40]] = -1  # unlabelled: ranked, never voting, never a query
    store = make_vector_store(tmp_path / "store", vectors, labels, [f"c{i}" for i in range(CLASSES)])
    assert simsearch("eval", f"run.dir={store.dir}", "eval.k=[1,5]", "eval.knn_k=[3,10,20]", "logger=none") == 0
    metrics = read_json(store.dir / "metrics.json")
    unit = store.vectors()
    for k in (3, 10, 20):
        expected = dinov2_loop(unit, labels, unit, labels, k, 0.07, exclude_self=True)
        assert metrics[f"knn_accuracy@{k}"] == pytest.approx(expected, abs=1e-12), k
    printed = capsys.readouterr().out
    assert "kNN acc (exp votes, T=0.07): @3" in printed


def test_knn_values_are_checked_and_none_can_be_asked_for(tmp_path, capsys):
    vectors, labels = labelled_vectors(20, seed=4)
    store = make_vector_store(tmp_path / "store", vectors, labels)
    assert simsearch("eval", f"run.dir={store.dir}", "eval.knn_k=[]", "logger=none") == 0
    assert not any(key.startswith("knn") for key in read_json(store.dir / "metrics.json"))
    for value, words in (("eval.knn_weights=cubic", "eval.knn_weights must be"), ("eval.knn_temperature=0", "positive"),
                         ("eval.knn_k=[0]", "eval.knn_k=[0]")):
        capsys.readouterr()
        assert simsearch("eval", f"run.dir={store.dir}", value, "logger=none") == 2
        assert words in capsys.readouterr().err


def test_the_api_and_compare_see_knn_accuracy(tmp_path):
    import simsearch as api

    vectors, labels = labelled_vectors(30, seed=5)
    store = make_vector_store(tmp_path / "store", vectors, labels)
    metrics = api.open(store.dir, "eval.knn_k=[5]").evaluate(k=[1])
    assert set(metrics["knn_k"]) == {5} and 0 <= metrics["knn_accuracy@5"] <= 1
