"""The Python API as a notebook uses it: extract, open, search by every query form, show, evaluate."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import simsearch
from simsearch.errors import SimsearchError
from tests.helpers import TINY, read_json, write_photo_folder
from tests.helpers import simsearch as cli


@pytest.fixture(scope="module")
def photo_store(tmp_path_factory):
    """One store of 8 real photos for the module's tests (which only read it)."""
    folder = tmp_path_factory.mktemp("api")
    write_photo_folder(folder / "photos")
    return simsearch.extract(*TINY, data="folder", run_dir=folder / "store", **{"data.root": folder / "photos"})


def test_extract_from_python_is_quiet_and_opens_the_store(tmp_path, capfd):
    write_photo_folder(tmp_path / "photos")
    store = simsearch.extract("data=folder", f"data.root={tmp_path / 'photos'}", run_dir=tmp_path / "store",
                              model={"weights": "random", "image_size": 32}, data={"num_workers": 0},
                              trainer={"accelerator": "cpu", "enable_progress_bar": False})
    printed = capfd.readouterr()
    assert "GPU available" not in printed.err + printed.out and "TPU available" not in printed.err + printed.out
    assert len(store) == 8 and store.dim == 2048 and (tmp_path / "store" / "manifest.json").is_file()
    assert not (tmp_path / "wandb").exists()  # no W&B run unless asked for
    assert sorted(i["id"] for i in simsearch.open(tmp_path / "store").items) == sorted(i["id"] for i in store.items)


def test_search_by_row_id_path_image_and_vector(photo_store, tmp_path):
    store = photo_store
    row = store.files.row_of("animals/chelsea.png")
    by_row = store.search(row, k=3)
    assert len(by_row) == 3 and [n.rank for n in by_row] == [1, 2, 3]
    assert row not in [n.row for n in by_row]  # an item is never its own neighbour
    assert by_row.to_records() == store.search("animals/chelsea.png", k=3).to_records()  # by id
    assert by_row.to_records() == store.search(str(row), k=3).to_records()  # a row number as text

    copy = tmp_path / "query.png"
    store.image(row).save(copy)
    for query in (copy, str(copy), Image.open(copy), np.asarray(store.embeddings[row]), list(store.embeddings[row])):
        first = store.search(query, k=2)[0]
        assert (first.row, first.id, first.label) == (row, "animals/chelsea.png", "animals") and first.score > 0.999, query
        assert first.path == "animals/chelsea.png"
    records = by_row.to_records()
    json.dumps(records)
    assert [r["id"] for r in records] == [n.id for n in by_row] and set(records[0]) >= {"rank", "id", "path", "label",
                                                                                          "score", "row"}


def test_show_returns_a_figure_of_the_query_and_its_neighbours(photo_store, tmp_path):
    from matplotlib.figure import Figure

    figure = photo_store.search(0, k=4).show()
    assert isinstance(figure, Figure)
    shown = np.asarray(figure.axes[0].images[0].get_array())
    # the very grid `simsearch search` draws for the same query
    assert cli("search", f"run.dir={photo_store.dir}", "query=0", "search.k=4", "logger=none") == 0
    np.testing.assert_array_equal(shown, np.asarray(Image.open(photo_store.dir / "recommendations.png")))
    figure.savefig(tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] > 300


def test_evaluate_returns_the_metrics_of_simsearch_eval(photo_store):
    metrics = photo_store.evaluate(k=[1, 3])
    assert metrics["k"] == [1, 3] and metrics["queries"] == 8
    assert cli("eval", f"run.dir={photo_store.dir}", "eval.k=[1,3]", "logger=none") == 0
    written = read_json(photo_store.dir / "metrics.json")
    for name in ("precision@1", "precision@3", "recall@3", "map@3", "map@r"):
        assert metrics[name] == pytest.approx(written[name], abs=1e-9)
    assert photo_store.evaluate(k=1)["k"] == [1]


@pytest.mark.parametrize("query, message", [(8, "row 8 is not in the store"), (-1, "row -1"),
                                            ("nope.png", "no such file"), (np.ones(7), "2048 values"),
                                            (np.zeros(2048), "not all zeros"), (True, "True or False"),
                                            ({"a": 1}, "cannot search for a dict")])
def test_bad_queries_are_one_sentence(photo_store, query, message):
    with pytest.raises(SimsearchError, match=message):
        photo_store.search(query, k=2)


def test_bad_k_and_bad_keywords_are_one_sentence(photo_store, tmp_path):
    with pytest.raises(SimsearchError, match="out of range"):
        photo_store.search(0, k=8)  # 7 other items
    with pytest.raises(SimsearchError, match="positive integer"):
        photo_store.evaluate(k=[0])
    with pytest.raises(SimsearchError, match="unknown keyword"):
        simsearch.extract(root=tmp_path)
    with pytest.raises(SimsearchError, match="no store in"):
        simsearch.open(tmp_path / "nowhere")


def test_import_simsearch_does_not_import_torch():
    code = "import sys, simsearch; simsearch.open; print('torch' in sys.modules, 'lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_a_store_of_vectors_only_searches_and_says_why_it_cannot_show(tmp_path):
    from tests.helpers import clustered, make_vector_store

    embeddings, labels = clustered(40, 2, dim=16)
    make_vector_store(tmp_path / "vectors", embeddings, labels)
    store = simsearch.open(tmp_path / "vectors")
    results = store.search(3, k=5)
    assert len(results) == 5 and results.precision is not None
    with pytest.raises(SimsearchError, match="records no images"):
        results.show()
    assert cli("search", f"run.dir={tmp_path / 'vectors'}", "query=3", "logger=none") == 0  # printed, no grid
    assert not (tmp_path / "vectors" / "recommendations.png").exists()


def test_paths_with_spaces_and_odd_characters_are_taken_as_they_are(photo_store, tmp_path):
    odd = tmp_path / "my store: ${x} = 1"
    import shutil

    shutil.copytree(photo_store.dir, odd)
    assert len(simsearch.open(odd).search(0, k=2)) == 2
