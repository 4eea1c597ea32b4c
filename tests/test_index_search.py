"""Indexes (exact, approximate, saved and loaded) and `simsearch search` by item and by new image."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from simsearch.config import Config
from simsearch.index import FaissSearcher, build_index, load_index
from simsearch.items import ItemImages
from simsearch.knn import ExactSearcher
from simsearch.store import Store
from tests.helpers import SYNTHETIC_24, clustered, copy_store, make_vector_store, read_json, simsearch, simsearch_subprocess

SCHEMA = OmegaConf.structured(Config)


def index_cfg(**values):
    return OmegaConf.merge(SCHEMA.index, {"device": "cpu", **values})


def test_index_command_saves_an_index_that_loads_to_identical_results(tmp_path):
    embeddings, labels = clustered(500, 5, dim=32)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    assert simsearch("index", f"run.dir={store.dir}", "index.factory=IVF8,Flat", "index.search_params=nprobe=3") == 0
    info = read_json(store.dir / "index.json")
    assert info["factory"] == "IVF8,Flat" and info["ntotal"] == 500 and info["trained_on"] == 500
    loaded, _ = load_index(store, index_cfg(factory="IVF8,Flat", search_params="nprobe=3"))
    fresh, _ = build_index(store, index_cfg(factory="IVF8,Flat", search_params="nprobe=3"))
    queries = store.vectors(slice(0, 50))
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], fresh.search(queries, 10)[1])


def test_stale_index_is_not_used(tmp_path):
    embeddings, labels = clustered(100, 2, dim=8)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    assert simsearch("index", f"run.dir={store.dir}") == 0
    store = make_vector_store(tmp_path / "s", embeddings[::-1].copy(), labels)  # new embeddings, old index file
    assert load_index(store, index_cfg()) is None


@pytest.mark.slow
@pytest.mark.parametrize("factory, params", [("IVF16,Flat", "nprobe=4"), ("HNSW32", "efSearch=64"),
                                             ("IVF16,PQ16", "nprobe=8"), ("IVF16,SQ8", "nprobe=8")])
def test_approximate_indexes_reach_high_recall_on_clustered_data(tmp_path, factory, params):
    embeddings, labels = clustered(3000, 20, dim=32, spread=0.3)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    queries = store.vectors(slice(0, 200))
    _, exact = ExactSearcher(store.vectors(), "cpu").search(queries, 10)
    index, _ = build_index(store, index_cfg(factory=factory, search_params=params))
    _, approximate = FaissSearcher(index, "cpu").search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall >= (0.6 if "PQ" in factory else 0.9), recall


@pytest.mark.parametrize("torch_on_cpu", [False, True])
def test_exact_search_matches_faiss_flat_with_blocks(tmp_path, torch_on_cpu):
    embeddings, labels = clustered(300, 3, dim=16, spread=2.0)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    index, _ = build_index(store, index_cfg())
    queries = store.vectors(slice(0, 40))
    faiss_scores, faiss_rows = FaissSearcher(index, "cpu").search(queries, 25)
    torch_scores, torch_rows = ExactSearcher(store.vectors(), "cpu", block_rows=64,
                                             torch_on_cpu=torch_on_cpu).search(queries, 25)
    np.testing.assert_array_equal(torch_rows, faiss_rows)
    np.testing.assert_allclose(torch_scores, faiss_scores, atol=1e-5)


def test_bad_factory_is_one_sentence(tmp_path, capsys):
    embeddings, labels = clustered(50, 2, dim=8)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    assert simsearch("index", f"run.dir={store.dir}", "index.factory=NotAnIndex") == 2
    assert "index.factory='NotAnIndex'" in capsys.readouterr().err


@pytest.fixture
def synthetic_store(extracted_once, tmp_path):
    """tmp_path/out: a copy of 24 synthetic items through the default network, extracted once per session."""
    copy_store(extracted_once(*SYNTHETIC_24), tmp_path / "out")
    return Store.open(tmp_path / "out")


def test_search_by_item_prints_neighbours_and_saves_a_grid(synthetic_store, capsys):
    assert simsearch("search", "run.dir=out", "query=5", "search.k=4", "logger=none") == 0
    printed = capsys.readouterr().out
    assert "Query Image Index: 5" in printed and "Precision@4: 1.00" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit() and line.split()[0] in "1234"]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and all(r[3] != "5" for r in rows)  # itself excluded
    grid = Image.open(synthetic_store.dir / "recommendations.png")
    grid.verify()
    assert grid.size[0] > 500


def test_search_by_a_new_image_file_embeds_it_like_the_store(synthetic_store, tmp_path, capsys):
    ItemImages(synthetic_store).image(7).save(tmp_path / "query.png")
    assert simsearch("search", "run.dir=out", f"query={tmp_path / 'query.png'}", "search.k=3", "logger=none") == 0
    printed = capsys.readouterr().out
    first = next(line.split() for line in printed.splitlines() if line.strip().startswith("1 "))
    assert first[3] == "7" and float(first[1]) > 0.999  # the same pixels: the same embedding
    Image.open(synthetic_store.dir / "recommendations.png").verify()


def test_search_bad_queries_are_one_sentence(synthetic_store, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    for query, message in (("nope", "no such file"), (str(tmp_path / "broken.jpg"), "cannot read the query image")):
        result = simsearch_subprocess("search", "run.dir=out", f"query={query}", "logger=none", cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    result = simsearch_subprocess("search", "run.dir=out", "query=1", "search.k=24", "logger=none", cwd=tmp_path)
    assert result.returncode == 2 and "out of range" in result.stderr


def test_commands_on_a_missing_store_say_so(tmp_path, capsys):
    assert simsearch("eval", "run.dir=nowhere", "logger=none") == 2
    assert "no store in nowhere" in capsys.readouterr().err


def test_item_images_never_leave_the_data_root(synthetic_store, tmp_path):
    store = synthetic_store
    store.manifest["data"]["root"] = str(tmp_path)
    store.items[0] = {"id": "x", "path": "../../etc/passwd"}
    with pytest.raises(Exception, match="leaves the data root"):
        ItemImages(store).image(0)


def test_search_logs_grid_to_wandb_offline(synthetic_store, tmp_path):
    assert simsearch("search", "run.dir=out", "query=2", "logger=wandb", f"logger.wandb.dir={tmp_path}") == 0
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/search/*.png"))
    assert len(media) == 1
    json.dumps(read_json(synthetic_store.dir / "manifest.json"))
