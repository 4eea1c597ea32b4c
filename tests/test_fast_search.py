"""`simsearch search` by item or by vector answers without importing torch or Lightning."""

import json
import subprocess
import sys

import numpy as np
import pytest

from simsearch.store import Store
from tests.helpers import FASHION_MNIST, SYNTHETIC_8, SYNTHETIC_24, TINY, copy_store, simsearch

PROBE = """
import sys
from simsearch.cli import main
code = main(sys.argv[1:])
heavy = sorted(name for name in ("torch", "lightning", "torchvision", "wandb") if name in sys.modules)
print("HEAVY:", ",".join(heavy) or "none")
sys.exit(code)
"""


def search_in_a_fresh_process(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, "search", *arguments], capture_output=True, text=True, timeout=300)


def test_search_by_item_and_by_vector_import_no_torch(extracted_once, tmp_path):
    copy_store(extracted_once(*SYNTHETIC_24), tmp_path / "out")
    store = Store.open(tmp_path / "out")
    np.save(tmp_path / "query.npy", store.vectors(np.array([9]))[0] * 3.0)  # any norm: normalised on the way in

    by_item = search_in_a_fresh_process("run.dir=out", "query=5", "search.k=3", "logger=none")
    assert by_item.returncode == 0, by_item.stderr
    assert "HEAVY: none" in by_item.stdout and "Precision@3: 1.00" in by_item.stdout
    assert (tmp_path / "out" / "recommendations.png").is_file() and (tmp_path / "out" / "index.faiss").is_file()

    again = search_in_a_fresh_process("run.dir=out", "query=5", "search.k=3", "logger=none")  # the saved index, mmapped
    assert "HEAVY: none" in again.stdout and again.stdout.split("HEAVY")[0] == by_item.stdout.split("HEAVY")[0]

    by_vector = search_in_a_fresh_process("run.dir=out", f"query={tmp_path / 'query.npy'}", "search.k=2", "logger=none")
    assert by_vector.returncode == 0, by_vector.stderr
    first = next(line.split() for line in by_vector.stdout.splitlines() if line.strip().startswith("1 "))
    assert first[3] == "9" and float(first[1]) > 0.9999 and "HEAVY: none" in by_vector.stdout


def test_a_query_vector_of_the_wrong_width_is_one_sentence(extracted_once, tmp_path):
    copy_store(extracted_once(*SYNTHETIC_8), tmp_path / "out")
    np.save(tmp_path / "bad.npy", np.ones(5, dtype=np.float32))
    result = search_in_a_fresh_process("run.dir=out", f"query={tmp_path / 'bad.npy'}", "logger=none")
    assert result.returncode == 2 and "2048 values" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_grid_pixels_come_without_torch_and_match_the_dataset(tmp_path):
    from simsearch.items import ItemImages
    from simsearch.pixels import FASHION_MNIST_FILES, read_idx

    assert simsearch("extract", "data=fashion_mnist", f"data.root={FASHION_MNIST}", "data.limit=12", *TINY, "run.dir=fm") == 0
    result = search_in_a_fresh_process("run.dir=fm", "query=3", "search.k=4", "logger=none")
    assert result.returncode == 0 and "HEAVY: none" in result.stdout, result.stderr
    expected = read_idx(FASHION_MNIST / FASHION_MNIST_FILES["test"][0])[5]
    assert np.array_equal(np.asarray(ItemImages(Store.open(tmp_path / "fm")).image(5))[..., 0], expected)


def test_exact_evaluation_on_the_cpu_imports_no_torch_and_equals_the_torch_kernels(extracted_once, tmp_path):
    from simsearch.evaluation import evaluate_embeddings
    from simsearch.knn import ExactSearcher

    copy_store(extracted_once(*SYNTHETIC_24), tmp_path / "out")
    result = subprocess.run([sys.executable, "-c", PROBE, "eval", "run.dir=out", "eval.device=auto", "eval.k=[1,5]",
                             "eval.block_rows=7", "logger=none"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "HEAVY: none" in result.stdout, result.stdout + result.stderr
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    store = Store.open(tmp_path / "out")
    torch_kernels = ExactSearcher(store.vectors(), "cpu", block_rows=7, torch_on_cpu=True)
    with_torch = evaluate_embeddings(store.vectors(), store.labels, store.classes, [1, 5], torch_kernels)
    for name in ("hit@1", "precision@5", "recall@5", "map@5", "map@r", "r_precision"):
        assert written[name] == pytest.approx(with_torch[name], abs=1e-12), name
