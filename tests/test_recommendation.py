"""Item metadata (data.metadata), filtered search (search.filter, eval.filter, the server's `filter`):
a folder of product pictures with a CSV catalogue, and stores of known vectors whose filtered results are
checked against a brute force over the matching rows, computed here with numpy."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import ImageDraw

import simsearch as api
from simsearch.errors import SimsearchError
from tests.helpers import (
    CATEGORIES,
    FILTERS,
    TINY,
    brute_force,
    extract_shop,
    make_vector_store,
    matches,
    simsearch,
    write_csv,
)


def test_catalogue_is_kept_in_the_store_and_returned_with_results(shop, tmp_path, caplog, capsys):
    root, catalogue, rows = shop
    with caplog.at_level(logging.WARNING):
        assert extract_shop(root, catalogue) == 0
    warnings = [r.getMessage() for r in caplog.records if "data.metadata" in r.getMessage()]
    assert len(warnings) == 1 and "1 catalogue row(s) match no item and 1 item(s) have no catalogue row" in warnings[0]
    store_dir = tmp_path / "store"
    unmatched = [json.loads(line) for line in (store_dir / "metadata_unmatched.jsonl").read_text().splitlines()]
    assert {u.get("catalogue_key") or u.get("id") for u in unmatched} == {"gone/9.png", "shoe/5.png"}
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["metadata"]["columns"] == {"category": "str", "price": "float", "in_stock": "bool", "brand": "str"}
    assert {"metadata.jsonl", "metadata_unmatched.jsonl"} <= set(manifest["sha256"])
    # readable without simsearch: pandas, one row per store row, the item's id first
    table = pd.read_json(store_dir / "metadata.jsonl", lines=True, dtype={"id": str}).set_index("id")
    items = [json.loads(line)["id"] for line in (store_dir / "items.jsonl").read_text().splitlines()]
    assert list(table.index) == items
    for row in rows[:-1]:
        assert table.loc[row["path"], "price"] == pytest.approx(float(row["price"]))
        assert bool(table.loc[row["path"], "in_stock"]) == (row["in_stock"] == "true")
    assert table.loc["shoe/5.png"].isna().all()

    store = api.open(store_dir)
    results = store.search("dress/0.png", k=4, filter="price < 30 and in_stock == true")
    assert len(results) > 0
    for n in results:
        assert n.metadata["price"] < 30 and n.metadata["in_stock"] is True
    capsys.readouterr()
    assert simsearch("search", f"run.dir={store_dir}", "query=dress/0.png", "search.k=3", "logger=none",
                     "search.filter=category == 'shirt'") == 0
    printed = capsys.readouterr().out
    assert "category=shirt" in printed and "category=dress" not in printed.split("Filter:")[0].split("\n", 2)[2]


def test_the_grid_names_the_filter_and_shows_each_results_catalogue_values(shop, tmp_path, monkeypatch):
    root, catalogue, rows = shop
    assert extract_shop(root, catalogue) == 0
    drawn = []
    multiline = ImageDraw.ImageDraw.multiline_text
    text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: drawn.append(t) or text(self, xy, t, *a, **k))
    monkeypatch.setattr(ImageDraw.ImageDraw, "multiline_text",
                        lambda self, xy, t, *a, **k: drawn.append(t) or multiline(self, xy, t, *a, **k))
    grid = tmp_path / "grid.png"
    assert simsearch("search", f"run.dir={tmp_path / 'store'}", "query=dress/0.png", "search.k=3", "logger=none",
                     "search.filter=price < 30", f"search.grid={grid}") == 0
    assert grid.is_file() and any("filter: price < 30" in t for t in drawn)
    captions = {t for t in drawn if t.startswith("#")}  # multiline_text draws through text: each caption twice
    prices = {row["path"]: float(row["price"]) for row in rows}
    assert len(captions) == 3
    for caption in captions:
        item, *values = caption.split("\n")[2:]
        assert f"price={prices[item]}" in " ".join(values).split() and prices[item] < 30


def test_a_changed_catalogue_row_updates_metadata_without_embedding_again(shop, tmp_path):
    root, catalogue, rows = shop
    assert extract_shop(root, catalogue) == 0
    store_dir = tmp_path / "store"
    vectors = (store_dir / "embeddings.npy").read_bytes()
    rows[0]["price"] = "99.50"
    write_csv(catalogue, rows)
    assert extract_shop(root, catalogue) == 0
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert (manifest["embedded"], manifest["reused"]) == (0, 18)  # no image embedded again
    assert (store_dir / "embeddings.npy").read_bytes() == vectors
    store = api.open(store_dir)
    assert store.metadata[store.files.row_of(rows[0]["path"])]["price"] == 99.5
    # the catalogue dropped: the store no longer has metadata, and its old files are gone
    assert simsearch("extract", "data=folder", f"data.root={root}", "model=pixels", "model.image_size=8", *TINY[2:],
                     "run.dir=store") == 0
    assert not (store_dir / "metadata.jsonl").exists() and api.open(store_dir).metadata == []


@pytest.mark.parametrize("text, problem", [
    ("path,price\nred/0.png,1\nred/0.png,2\n", "more than one row"),
    ("name,price\nred/0.png,1\n", "no key column"),
    ("path,unit price\nred/0.png,1\n", "cannot be filtered on"),
    ("path,label\nred/0.png,1\n", "cannot be filtered on"),
])
def test_bad_catalogues_are_refused_with_a_sentence(shop, tmp_path, capsys, text, problem):
    root, _, _ = shop
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    assert extract_shop(root, bad) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert problem in error


def test_jsonl_and_parquet_catalogues_keyed_by_dataset_index(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [{"index": i, "price": i * 1.5, "size": ["S", "M"][i % 2], "count": i} for i in range(0, 12, 2)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(v) + "\n" for v in values))
    pq.write_table(pa.Table.from_pylist(values), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        assert simsearch("extract", "data=synthetic", "data.num_items=12", "model=pixels", "model.image_size=8",
                         *TINY[2:], f"data.metadata={tmp_path / name}", f"run.dir={name}-store") == 0
        store = api.open(tmp_path / f"{name}-store")
        assert store.files.metadata_columns == {"price": "float", "size": "str", "count": "int"}
        assert store.metadata[4] == {"price": 6.0, "size": "S", "count": 4} and store.metadata[5]["price"] is None


# ------------------------------------------------------------------ filtered search: exact, on known vectors

@pytest.mark.parametrize("factory, selector", [("Flat", False), ("Flat", True), ("HNSW16", True)])
@pytest.mark.parametrize("text, condition", FILTERS)
def test_filtered_search_equals_brute_force_over_matching_rows(products, text, condition, factory, selector, monkeypatch):
    path, vectors, labels, metadata = products
    if selector:  # through FAISS's row selector (as for many matching rows), not the exact copy of few rows
        monkeypatch.setattr("simsearch.index.SUBSET_EXACT_ROWS", 0)
    store = api.open(path, f"index.factory={factory}", *(["index.search_params=efSearch=300"] if factory != "Flat" else []))
    keep = matches(metadata, labels, **condition)
    k = 10
    for own in (7, 150):
        expected = brute_force(vectors, keep, vectors[own], k, own)
        found = [n.row for n in store.search(own, k=k, filter=text)]
        assert found == expected
        assert len(found) == min(k, int(keep.sum()) - int(keep[own]))
    query = np.ones(16, np.float32)
    expected = brute_force(vectors, keep, query / np.linalg.norm(query), k)
    assert [n.row for n in store.search(query, k=k, filter=text)] == expected


@pytest.mark.parametrize("text, words", [
    ("price < 'cheap'", "number column"),
    ("brand == 5", "string column"),
    ("brand == 'acme", "no closing"),
    ("__import__('os').system('ls')", "unexpected character '.'"),
    ("__import__('os')", "unknown column '__import__'"),
    ("price < 5; drop table items", "unexpected character ';'"),
    ("colour == 'red'", "unknown column 'colour'"),
    ("price < 5 price", "expected 'and', 'or'"),
    ("(price < 5", "expected ')'"),
    ("price in [1, 'a']", "number column"),
    ("brand < 'b'", "numbers only"),
    ("not " * 60 + "price < 5", "nested"),
    ("{{7*7}}", "unexpected character"),
])
def test_hostile_filters_are_one_sentence(products, text, words, capsys):
    path = products[0]
    with pytest.raises(SimsearchError) as caught:
        api.open(path).search(3, k=5, filter=text)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert simsearch("search", f"run.dir={path}", "query=3", "logger=none", f"search.filter={text}") == 2
    assert words in capsys.readouterr().err


def test_eval_filter_evaluates_within_the_matching_items(products, tmp_path):
    path, vectors, labels, metadata = products
    keep = matches(metadata, labels, below=60)
    make_vector_store(tmp_path / "subset", vectors[keep], labels[keep], list(CATEGORIES))
    subset = tmp_path / "subset"
    expected = api.open(subset).evaluate(k=[1, 5])
    filtered = api.open(path, "eval.filter=price < 60").evaluate(k=[1, 5])
    assert filtered["filter"] == {"expression": "price < 60", "queries": int(keep.sum())}
    for key in ("precision@1", "precision@5", "map@r"):
        assert filtered[key] == pytest.approx(expected[key])
    assert filtered["precision@5"] != pytest.approx(api.open(path).evaluate(k=[1, 5])["precision@5"])


def test_server_filters_both_searches_and_returns_metadata(shop, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from simsearch.config import load_config
    from simsearch.server.app import create_app

    root, catalogue, _ = shop
    assert extract_shop(root, catalogue) == 0
    cfg = load_config(["run.dir=store", "logger=none", "serve.device=cpu"])
    with TestClient(create_app(cfg), base_url="http://localhost") as client:
        assert client.get("/health").json()["filter_columns"]["price"] == "float"
        body = client.get("/search", params={"item": "dress/0.png", "k": 5, "filter": "in_stock == true and price >= 20"}).json()
        assert body["results"] and all(r["metadata"]["in_stock"] and r["metadata"]["price"] >= 20 for r in body["results"])
        assert client.get("/search", params={"item": "dress/0.png", "filter": "price < 0"}).json()["results"] == []
        upload = (root / "shirt" / "1.png").read_bytes()
        body = client.post("/search", files={"file": ("q.png", upload, "image/png")},
                           data={"k": "3", "filter": "category in ['shoe']"}).json()
        assert len(body["results"]) == 3 and {r["metadata"]["category"] for r in body["results"]} == {"shoe"}
        for hostile in ("price < '1' or '1'='1'", "category == 'a' ; DROP", "__class__ == 1", "price <"):
            for response in (client.get("/search", params={"item": "dress/0.png", "filter": hostile}),
                             client.post("/search", files={"file": ("q.png", upload, "image/png")}, data={"filter": hostile})):
                assert response.status_code == 400 and response.json()["error"].startswith("filter ")
        assert client.get("/items/dress%2F1.png").json()["metadata"]["brand"] == "zeta"
        page = client.get("/").text
        assert 'id="filter"' in page


def test_the_demo_catalogue_is_seeded_and_joins_fashion_mnist_by_index(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import FASHION_MNIST

    if not FASHION_MNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    script = Path(__file__).resolve().parent.parent / "scripts" / "shop_catalogue.py"
    for name in ("a.csv", "b.csv"):
        subprocess.run([sys.executable, str(script), str(tmp_path / name), "--items", "40"], check=True, capture_output=True)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()  # seeded
    assert simsearch("extract", "data=fashion_mnist", f"data.root={FASHION_MNIST}", "data.limit=40", "model=pixels",
                     "model.image_size=8", *TINY[2:], f"data.metadata={tmp_path / 'a.csv'}", "run.dir=shop") == 0
    store = api.open(tmp_path / "shop")
    departments = {"Ankle boot": "shoes", "Sneaker": "shoes", "Sandal": "shoes", "Bag": "bags", "Dress": "dresses"}
    for row in range(len(store)):
        label = store.files.label_name(row)
        if label in departments:
            assert store.metadata[row]["department"] == departments[label]
    found = store.search(0, k=5, filter="price < 70 and in_stock == true")
    assert len(found) == 5 and all(n.metadata["price"] < 70 and n.metadata["in_stock"] for n in found)


@pytest.mark.slow
def test_the_page_filters_and_shows_each_result_s_metadata(shop, tmp_path):
    """As a person: an item searched with a filter typed in the Filter box; every caption shows the item's
    catalogue values and keeps the filter; the permalink holds it; a bad filter is said, no results left."""
    pytest.importorskip("selenium")
    from urllib.parse import parse_qs, urlparse

    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.helpers import LiveServer, chromium_paths

    if chromium_paths() is None:
        pytest.skip("no chromium and chromedriver (apt-get install chromium chromium-driver)")
    root, catalogue, _ = shop
    assert extract_shop(root, catalogue) == 0
    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    with LiveServer(tmp_path / "store") as url:
        page = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
        try:
            wait = WebDriverWait(page, 60)
            tiles = lambda: page.find_elements(By.CSS_SELECTOR, "#results .result")  # noqa: E731
            page.get(url)
            wait.until(lambda p: "items" in p.find_element(By.ID, "info").text)
            page.find_element(By.ID, "filter").send_keys("in_stock == true and price < 40")
            page.find_element(By.ID, "k").clear()
            page.find_element(By.ID, "k").send_keys("4")
            page.find_element(By.ID, "item").send_keys("dress/0.png", Keys.ENTER)
            wait.until(lambda p: len(tiles()) == 4)
            for tile in tiles():
                values = tile.find_element(By.CSS_SELECTOR, ".metadata").text
                assert "in_stock: true" in values
                price = float(values.split("price: ")[1].split(" ")[0])
                assert price < 40
                assert parse_qs(urlparse(tile.get_attribute("href")).query)["filter"] == ["in_stock == true and price < 40"]
            assert parse_qs(urlparse(page.current_url).query)["filter"] == ["in_stock == true and price < 40"]
            shown = [t.get_attribute("data-id") for t in tiles()]
            page.get(page.current_url)  # the permalink: the same filtered results
            wait.until(lambda p: len(tiles()) == 4)
            assert [t.get_attribute("data-id") for t in tiles()] == shown
            assert page.find_element(By.ID, "filter").get_attribute("value") == "in_stock == true and price < 40"
            box = page.find_element(By.ID, "filter")
            box.clear()
            box.send_keys("price < 'cheap'")
            page.find_element(By.ID, "item-search").click()
            wait.until(lambda p: "error" in p.find_element(By.ID, "status").get_attribute("class"))
            assert "price is a number column" in page.find_element(By.ID, "status").text and tiles() == []
            assert parse_qs(urlparse(page.current_url).query)["filter"] == ["price < 'cheap'"]  # what was asked
        finally:
            page.quit()


def test_a_filtered_faiss_search_survives_faiss_torch_utils(products, monkeypatch):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which swaps Index.search for one without
    `params`: a filtered FAISS search after fine-tuning in the same process must still work."""
    import faiss.contrib.torch_utils  # noqa: F401 - what a fine-tuning run imports

    path, vectors, labels, metadata = products
    monkeypatch.setattr("simsearch.index.SUBSET_EXACT_ROWS", 0)  # through FAISS's row selector
    keep = matches(metadata, labels, label="dress", below=50)
    found = [n.row for n in api.open(path, "index.factory=Flat").search(7, k=10, filter="label == 'dress' and price < 50")]
    assert found == brute_force(vectors, keep, vectors[7], 10, 7)


@pytest.mark.slow
def test_fine_tuning_leaves_faiss_as_it_found_it(tmp_path):
    """Fine-tuning imports pytorch-metric-learning, whose samplers import faiss.contrib.torch_utils: FAISS's own
    methods (which take a row selector, as filtered searches and Milvus Lite's searches pass one) must be back
    afterwards, in the same process."""
    import subprocess
    import sys

    from tests.helpers import TINY

    finetune = ["finetune", *TINY, "data=synthetic", "data.num_items=80", "data.num_classes=4", "finetune.batch_size=16",
                "finetune.m_per_class=4", "finetune.dim=16", "finetune.hidden_dim=32", "finetune.epochs=1",
                "finetune.val_fraction=0.25", f"finetune.checkpoint_dir={tmp_path / 'ck'}", f"run.dir={tmp_path / 'ft'}"]
    script = (
        "import numpy as np, faiss, sys\n"
        "from simsearch.cli import main\n"
        f"assert main({finetune!r}) == 0\n"
        "assert 'faiss.contrib.torch_utils' in sys.modules\n"
        "index = faiss.IndexHNSWFlat(4, 8, faiss.METRIC_INNER_PRODUCT)\n"
        "index.add(np.eye(4, dtype=np.float32))\n"
        "params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorBatch(np.array([2, 3], dtype=np.int64)))\n"
        "print(index.search(np.eye(4, dtype=np.float32)[:1], 2, params=params)[1].tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(eval(done.stdout.strip().splitlines()[-1])[0]) == [2, 3]
