"""index.backend=milvus against a real Milvus Lite database in tmp_path (no mock): publishing, keeping the
collection in step after incremental extractions, refusing another store's collection, and search, filters
and evaluation giving what the FAISS back end and a numpy brute force give."""

from __future__ import annotations

import numpy as np
import pytest

import simsearch as api
from simsearch.errors import SimsearchError
from simsearch.milvus import collection_name
from tests.helpers import FILTERS, brute_force, extract_shop, matches, simsearch, write_csv

pymilvus = pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")


def collection_entities(uri, name):
    client = pymilvus.MilvusClient(str(uri))
    try:
        return {e["id"]: e for e in client.query(name, filter="", limit=16_384, output_fields=["*"])}
    finally:
        client.close()


@pytest.mark.slow
def test_publish_holds_the_store_and_filters_equal_brute_force(products, tmp_path, capsys):
    path, vectors, labels, metadata = products
    uri = tmp_path / "m.db"
    assert simsearch("index", f"run.dir={path}", "logger=none", "index.backend=milvus", f"index.uri={uri}",
                     "index.collection=products") == 0
    assert "300 upserted, 0 deleted, 0 unchanged" in capsys.readouterr().out
    entities = collection_entities(uri, "products")
    assert set(entities) == {f"p{i}" for i in range(300)}
    for i in (0, 1, 150, 299):
        entity = entities[f"p{i}"]
        assert np.allclose(entity["vector"], vectors[i], atol=1e-6)
        assert entity["label"] == ("dress", "shirt", "shoe")[labels[i]]
        expected = metadata[i] or {"price": None, "in_stock": None, "brand": None}
        assert {name: entity[name] for name in ("price", "in_stock", "brand")} == expected
    assert simsearch("index", f"run.dir={path}", "logger=none", "index.backend=milvus", f"index.uri={uri}",
                     "index.collection=products") == 0
    assert "0 upserted, 0 deleted, 300 unchanged" in capsys.readouterr().out

    store = api.open(path, "index.backend=milvus", f"index.uri={uri}", "index.collection=products")
    faiss_store = api.open(path)
    for text, condition in [(None, {}), *FILTERS]:
        keep = matches(metadata, labels, **condition)
        for own in (7, 150):
            found = [n.row for n in store.search(own, k=10, filter=text)]
            assert found == brute_force(vectors, keep, vectors[own], 10, own)
            assert found == [n.row for n in faiss_store.search(own, k=10, filter=text)]
    with pytest.raises(SimsearchError, match="unexpected character"):
        store.search(3, filter="price < 5 || 1 == 1")
    exact = faiss_store.evaluate(k=[1, 5])
    by_milvus = api.open(path, "index.backend=milvus", f"index.uri={uri}", "index.collection=products",
                         "eval.backend=index").evaluate(k=[1, 5])
    assert by_milvus["precision@5"] == pytest.approx(exact["precision@5"])


def test_a_collection_of_another_store_is_refused(products, tmp_path, capsys):
    path, vectors, labels, _ = products
    uri = tmp_path / "m.db"
    assert simsearch("index", f"run.dir={path}", "logger=none", "index.backend=milvus", f"index.uri={uri}",
                     "index.collection=shared") == 0
    from tests.helpers import make_vector_store

    client = pymilvus.MilvusClient(str(uri))  # released, as a Milvus (Lite) started again finds it
    client.release_collection("shared")
    client.close()
    found = api.open(path, "index.backend=milvus", f"index.uri={uri}", "index.collection=shared").search(4, k=3)
    assert [n.row for n in found] == [n.row for n in api.open(path).search(4, k=3)]
    for hostile in ('brand == \'" or brand != "\'', "brand in ['\\\\\" or 1 == 1 or \"']"):  # pasted, these would match all
        assert len(api.open(path, "index.backend=milvus", f"index.uri={uri}", "index.collection=shared").search(
            4, k=3, filter=hostile)) == 0
    quoted = "brand == 'q\"uo\\\\te'"  # a value with a double quote and a backslash, matched exactly
    found = api.open(path, "index.backend=milvus", f"index.uri={uri}", "index.collection=shared").search(4, k=5, filter=quoted)
    assert [n.row for n in found] == [n.row for n in api.open(path).search(4, k=5, filter=quoted)]
    assert len(found) == 5 and {n.metadata["brand"] for n in found} == {'q"uo\\te'}
    pymilvus.MilvusClient(str(uri)).release_collection("shared")
    assert simsearch("index", f"run.dir={path}", "logger=none", "index.backend=milvus", f"index.uri={uri}",
                     "index.collection=shared") == 0
    make_vector_store(tmp_path / "other", vectors[:50], labels[:50])
    capsys.readouterr()
    assert simsearch("index", f"run.dir={tmp_path / 'other'}", "logger=none", "index.backend=milvus", f"index.uri={uri}",
                     "index.collection=shared") == 2
    assert "belongs to another store" in capsys.readouterr().err
    assert simsearch("search", f"run.dir={path}", "query=1", "logger=none", "index.backend=milvus", f"index.uri={uri}",
                     "index.collection=no-such name") == 2
    assert "collection name" in capsys.readouterr().err


@pytest.mark.slow
def test_incremental_extraction_sends_only_changed_items(shop, tmp_path, capsys):
    """Files added, changed and removed, and a catalogue row changed: each sends its rows, no others."""
    root, catalogue, rows = shop
    assert extract_shop(root, catalogue) == 0
    index = ("index", "run.dir=store", "logger=none", "index.backend=milvus")
    assert simsearch(*index) == 0
    assert "18 upserted, 0 deleted, 0 unchanged" in capsys.readouterr().out
    rows[3]["price"] = "77.00"  # one catalogue row changed
    write_csv(catalogue, rows)
    assert extract_shop(root, catalogue) == 0
    assert simsearch(*index) == 0
    assert "1 upserted, 0 deleted, 17 unchanged" in capsys.readouterr().out
    (root / "dress" / "0.png").unlink()  # removed
    (root / "shirt" / "9.png").write_bytes((root / "shirt" / "1.png").read_bytes())  # added
    pixels = (root / "shoe" / "2.png").read_bytes()
    (root / "shoe" / "2.png").write_bytes(pixels)  # rewritten: a new key (ctime), embedded and sent again
    assert extract_shop(root, catalogue) == 0
    assert simsearch(*index) == 0
    assert "2 upserted, 1 deleted, 16 unchanged" in capsys.readouterr().out
    store = api.open(tmp_path / "store")
    entities = collection_entities(tmp_path / "store" / "milvus.db", collection_name(store.files, store.cfg.index))
    assert set(entities) == {item["id"] for item in store.items}
    assert entities[rows[3]["path"]]["price"] == 77.0
    for item_row in range(len(store)):
        assert np.allclose(entities[store.items[item_row]["id"]]["vector"], store.embeddings[item_row], atol=1e-6)
    # the same answers as FAISS, filter included, through the CLI
    for backend in ("faiss", "milvus"):
        assert simsearch("search", "run.dir=store", "query=dress/1.png", "logger=none", "search.k=4",
                         f"index.backend={backend}", "search.filter=price < 40 and in_stock == true") == 0
    first, second = [block.split("Filter:")[0] for block in capsys.readouterr().out.split("Query Image")[1:]]
    assert first == second


def test_server_answers_the_same_on_milvus_as_on_faiss(shop, tmp_path):
    from fastapi.testclient import TestClient

    from simsearch.config import load_config
    from simsearch.server.app import create_app

    root, catalogue, _ = shop
    assert extract_shop(root, catalogue) == 0
    answers = []
    for backend in ("faiss", "milvus"):
        cfg = load_config(["run.dir=store", "logger=none", "serve.device=cpu", f"index.backend={backend}"])
        with TestClient(create_app(cfg), base_url="http://localhost") as client:
            assert backend.upper() in client.get("/health").json()["index"].upper()
            searches = [client.get("/search", params={"item": "shirt/2.png", "k": 6, "filter": text}).json()["results"]
                        for text in ("price > 15 and brand != 'zeta'", "in_stock == false", "price < 0")]
            bad = client.get("/search", params={"item": "shirt/2.png", "filter": 'brand == "x" or 1'})
            assert bad.status_code == 400
            answers.append([[(r["id"], round(r["score"], 5), r["metadata"]) for r in found] for found in searches])
    assert answers[0] == answers[1] and answers[0][0] and answers[0][2] == []


def test_a_server_address_is_shown_without_its_credentials(products, tmp_path, monkeypatch):
    from simsearch.milvus import shown_uri

    assert shown_uri("http://alice:s3cret@milvus.example:19530") == "http://milvus.example:19530"
    monkeypatch.setenv("MILVUS_TOKEN", "tok-s3cret")
    with pytest.raises(SimsearchError) as caught:
        api.open(products[0], "index.backend=milvus", "index.uri=/no/such/folder/x.txt").search(1)
    assert "ending in .db" in str(caught.value) and "s3cret" not in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["HNSW16", "IVF4,Flat"])
def test_approximate_milvus_indexes_never_return_an_item_the_filter_drops(products, tmp_path, factory):  # noqa: F811
    path, vectors, labels, metadata = products
    store = api.open(path, "index.backend=milvus", f"index.uri={tmp_path / 'm.db'}", f"index.factory={factory}")
    for text, condition in FILTERS:
        keep = matches(metadata, labels, **condition)
        found = [n.row for n in store.search(7, k=10, filter=text)]
        assert all(keep[row] for row in found) and 7 not in found
        exact = brute_force(vectors, keep, vectors[7], 10, 7)
        assert len(found) == len(exact) and len(set(found) & set(exact)) >= 0.8 * len(exact)


@pytest.mark.slow
def test_index_search_params_reach_milvus_as_they_reach_faiss(products, tmp_path):
    """nprobe = every list makes IVF exact on both back ends; a setting the index cannot take is one sentence."""
    path, vectors, labels, metadata = products
    uri = tmp_path / "m.db"
    store = api.open(path, "index.backend=milvus", f"index.uri={uri}", "index.factory=IVF32,Flat",
                     "index.search_params=nprobe=32")
    for query in (7, 123, 250):
        found = [n.row for n in store.search(query, k=10)]
        assert found == brute_force(vectors, np.ones(len(vectors), bool), vectors[query], 10, query)
    with pytest.raises(SimsearchError, match=r"efSearch=8.*nprobe=N"):
        api.open(path, "index.backend=milvus", f"index.uri={uri}", "index.factory=IVF32,Flat",
                 "index.search_params=efSearch=8").search(7, k=10)
