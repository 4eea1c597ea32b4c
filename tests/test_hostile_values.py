"""The holes a hostile probe found in the values a user types (issue 19), each tried again through the CLI or
the Python API: one sentence, exit 2, nothing created; hostile queries, outputs inside the collection, the cwd."""

import os

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import simsearch as api
from simsearch.errors import SimsearchError
from simsearch.store import Store
from tests.helpers import PIXELS, finished_within, one_sentence, simsearch

# ---------------------------------------------------------------- 7. hostile values: one sentence, exit 2, nothing created

LONG = "a" * 5000


@pytest.mark.parametrize("arguments, words", [
    (["eval", "eval.k=${oc.env:HOME}"], "eval.k"),
    (["extract", f"run.dir={LONG}"], "run.dir is too long"),
    (["extract", "data=folder", f"data.root={LONG}", "run.dir=new"], "data.root is too long"),
    (["search", f"query={LONG}"], "search.query is too long"),
    (["eval", "run.seed=-1", "eval.queries=3"], "run.seed=-1"),
    (["search", "query=0", "search.k=2", "search.grid=missing/x.png"], "No such file or directory"),
    (["duplicates", "duplicates.output=missing/d.json"], "No such file or directory"),
    (["serve", "serve.port=70000"], "serve.port=70000"),
    (["extract", "trainer.precision=bad", "run.dir=new"], "trainer.precision=bad"),
    (["extract", "trainer.accelerator=tpu", "run.dir=new"], "trainer.accelerator=tpu"),
    (["extract", "run.dir="], "run.dir= is empty"),
    (["extract", "data=folder", "data.root=missing", "run.dir=new"], "missing"),
    (["extract", "data.num_items=100000000000000000000", "run.dir=new"], "data.num_items=100000000000000000000"),
    (["extract", "run.seed=100000000000000000000", "run.dir=new"], "run.seed=100000000000000000000 is out of range"),
    (["extract", "run.seed=4294967296", "run.dir=new"], "at most 4294967295"),
    (["extract", "data.batch_size=100000000000", "run.dir=new"], "data.batch_size=100000000000 is out of range"),
    (["extract", "model.image_size=100000", "run.dir=new"], "model.image_size=100000 is out of range"),
    (["serve", "serve.max_upload_mb=1e309"], "serve.max_upload_mb=inf is not a finite number"),
    (["extract", "model.mean=[nan,0.5,0.5]", "run.dir=new"], "model.mean[0]=nan is not a finite number"),
    (["extract", "model.std=[0.2,inf,0.2]", "run.dir=new"], "model.std[1]=inf is not a finite number"),
    (["extract", "model.std=[0.2,0,0.2]", "run.dir=new"], "model.std=[0.2, 0.0, 0.2] must be positive"),
    (["serve", "serve.upload_timeout_s=1e309"], "serve.upload_timeout_s=inf is not a finite number"),
    (["serve", "serve.upload_timeout_s=1e9"], "serve.upload_timeout_s=1000000000.0 is out of range"),
    (["serve", "serve.header_timeout_s=0"], "serve.header_timeout_s=0.0 must be a positive number"),
    (["serve", "serve.host=no-such-host.invalid"], "serve.host=no-such-host.invalid cannot be resolved"),
    (["serve", "serve.allowed_hosts=[photos.lan:80:x]"], "serve.allowed_hosts holds 'photos.lan:80:x'"),
    (["serve", "serve.allowed_hosts=[a b]"], "serve.allowed_hosts holds 'a b'"),
    (["extract", f"trainer.devices={4 * (os.cpu_count() or 1) + 1}", "run.dir=new"], "(at most 4 per core)"),
])
def test_hostile_values_are_one_sentence_and_create_nothing(store_dir, tmp_path, arguments, words, capsys):
    command, *rest = arguments
    run_dir = [] if any(a.startswith("run.dir=") for a in rest) else [f"run.dir={store_dir}"]
    data = [] if command != "extract" or any(a.startswith("data=") for a in rest) else ["data=synthetic"]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert simsearch(command, *data, *PIXELS, *run_dir, *rest) == 2
    assert words in one_sentence(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run.dir made
    assert not [p.name for p in store_dir.iterdir() if ".tmp" in p.name]  # no temporary file left


@pytest.mark.parametrize("key", ["run.dir", "query", "data.root", "search.grid"])
def test_keys_taken_as_typed_are_never_interpolated(key):
    from simsearch.config import load_config

    cfg = load_config(["data=folder", "data.root=images", f"{key}=x${{oc.env:HOME}}${{run.seed}}.png"])
    value = OmegaConf.select(cfg, "search.query" if key == "query" else key)
    assert value == "x${oc.env:HOME}${run.seed}.png"


# ---------------------------------------------------------------- 10. the second probe: queries, the API, outputs


def test_a_query_that_is_a_pipe_a_device_or_empty_gets_its_own_sentence(store_dir, tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.png")
    for query, words in ((str(tmp_path / "pipe.png"), "is not a regular file"), ("/dev/null", "is not a regular file"),
                         ("", "the query is empty"), (str(tmp_path), "is a folder")):
        capsys.readouterr()
        assert finished_within(20, lambda: simsearch("search", f"run.dir={store_dir}", f"query={query}",
                                                     "logger=none")) == 2
        assert words in one_sentence(capsys)
    with pytest.raises(SimsearchError, match="the query is empty"):
        api.open(store_dir).search("")


def test_an_empty_image_or_a_complex_vector_is_one_sentence(store_dir):
    store = api.open(store_dir)
    with pytest.raises(SimsearchError, match="the query image is empty"):
        store.search(Image.new("RGB", (0, 0)))
    with pytest.raises(SimsearchError, match="real numbers, not complex"):
        store.search(np.ones(store.dim) * 1j)


@pytest.mark.parametrize("k", [True, 2.5, "3", None])
def test_the_api_refuses_a_k_that_is_not_a_whole_number(store_dir, k):
    store = api.open(store_dir)
    with pytest.raises(SimsearchError, match="must be a whole number"):
        store.search(0, k=k)
    with pytest.raises(SimsearchError, match="must be a whole number"):
        store.search(np.ones(store.dim), k=k)


def test_a_query_vector_of_huge_finite_values_is_searched(store_dir):
    store = api.open(store_dir)
    direction = Store.open(store_dir).vectors()[3]
    huge_values = (direction.astype(np.float64) * (1e38 / float(np.abs(direction).max()))).astype(np.float32)
    with np.errstate(over="ignore"):  # float32's norm of it overflows
        assert np.isfinite(huge_values).all() and not np.isfinite(np.linalg.norm(huge_values))
    huge = [r.id for r in store.search(huge_values, k=3)]
    assert huge == [r.id for r in store.search(direction, k=3)] and huge[0] == store.items[3]["id"]
    assert [r.id for r in store.search([1e300] * store.dim, k=2)] == [r.id for r in store.search([1.0] * store.dim, k=2)]


@pytest.mark.parametrize("command, key, name", [
    (["search", "query=0", "search.k=2"], "search.grid", "grid.png"), (["duplicates"], "duplicates.output", "d.json"),
    (["duplicates"], "duplicates.image", "d.png"), (["map"], "map.image", "map.png"),
])
def test_an_output_inside_the_collection_is_refused(store_dir, tmp_path, command, key, name, capsys):
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "images").rglob("*"))
    for value in (f"../images/cats/{name}", str(tmp_path / "images" / name)):
        capsys.readouterr()
        assert simsearch(*command, f"run.dir={store_dir}", f"{key}={value}", "logger=none") == 2
        assert "is inside data.root" in one_sentence(capsys)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "images").rglob("*")) == before
    if key == "search.grid":  # a hidden folder in the collection is never listed: allowed, as for run.dir
        (tmp_path / "images" / ".simsearch").mkdir()
        assert simsearch(*command, f"run.dir={store_dir}", f"{key}=../images/.simsearch/grid.png", "logger=none") == 0
        assert (tmp_path / "images" / ".simsearch" / "grid.png").is_file()


# ---------------------------------------------------------------- 11. the second probe: the cwd


@pytest.mark.slow
def test_a_run_writes_nothing_in_the_current_folder(store_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert simsearch("search", f"run.dir={store_dir}", "query=0", "search.k=2", "logger=wandb",
                     "logger.wandb.mode=offline") == 0
    assert list(cwd.iterdir()) == []
    assert list((store_dir / "wandb").glob("offline-run-*"))
