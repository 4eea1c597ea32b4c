"""A store you can trust while its collection changes: item keys, incremental extraction, safe runs,
verified reads, and one sentence for every bad value, all through `simsearch ...`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.files import read_jsonl
from simsearch.store import Store, finish_store, swap_in
from tests.helpers import SYNTHETIC_8, TINY, copy_store, make_vector_store, simsearch, simsearch_subprocess


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_folder(root: Path, per_class: int = 4) -> None:
    for number, label in enumerate(("cats", "dogs", "owls")):
        for i in range(per_class):
            write_image(root / label / f"{i:03d}.png", seed=100 * number + i)


def extract_folder(root: Path, run_dir: str, *extra: str) -> int:
    return simsearch("extract", "data=folder", f"data.root={root}", "data.batch_size=4", *TINY, f"run.dir={run_dir}",
                     *extra)


@pytest.fixture
def synthetic_store(extracted_once, tmp_path) -> Path:
    """tmp_path/store: a copy of 8 synthetic items through the default network, extracted once per session."""
    return copy_store(extracted_once(*SYNTHETIC_8), tmp_path / "store")


def assert_same_store(store: Store, fresh: Store) -> None:
    """Same items (ids, keys, labels) in the same order and the same vectors."""
    assert [(i["id"], i["key"], i["label"]) for i in store.items] == [(i["id"], i["key"], i["label"]) for i in fresh.items]
    np.testing.assert_array_equal(store.labels, fresh.labels)
    assert store.classes == fresh.classes
    np.testing.assert_allclose(store.embeddings, fresh.embeddings, atol=1e-5)


# ---------------------------------------------------------------- incremental extraction


def change_folder(root: Path) -> int:
    """Every kind of change at once; returns how many items are new or changed."""
    write_image(root / "cats" / "new.png", seed=999)  # added
    (root / "dogs" / "001.png").unlink()  # removed
    write_image(root / "owls" / "002.png", seed=777)  # changed in place (same size, new pixels and mtime)
    shutil.move(root / "cats" / "003.png", root / "dogs" / "003-moved.png")  # moved between classes
    write_image(root / "fish" / "000.png", seed=555)  # a new class
    return 4


@pytest.mark.slow
def test_incremental_extraction_embeds_only_what_changed_and_equals_a_fresh_one(tmp_path, capsys):
    root = tmp_path / "images"
    write_folder(root)
    assert extract_folder(root, "store") == 0
    first = Store.open(tmp_path / "store")
    assert (first.manifest["embedded"], first.manifest["reused"]) == (12, 0)
    assert all(item["key"].startswith(item["path"] + ":") for item in first.items)

    assert extract_folder(root, "store") == 0  # nothing changed: nothing embedded
    assert (Store.open(tmp_path / "store").manifest["embedded"], Store.open(tmp_path / "store").manifest["reused"]) == (0, 12)

    changed = change_folder(root)
    capsys.readouterr()
    assert extract_folder(root, "store") == 0
    assert f"embedded {changed}, reused 9" in capsys.readouterr().out
    assert extract_folder(root, "fresh") == 0
    store, fresh = Store.open(tmp_path / "store"), Store.open(tmp_path / "fresh")
    assert (store.manifest["embedded"], store.manifest["reused"], len(store)) == (changed, 9, 13)
    assert_same_store(store, fresh)
    assert store.label_name(store.row_of("dogs/003-moved.png")) == "dogs" and "fish" in store.classes
    assert not (tmp_path / "store" / ".staging").exists() and not (tmp_path / "store" / ".lock").exists()


@pytest.mark.slow
def test_another_model_or_dataset_source_reuses_nothing(tmp_path):
    root = tmp_path / "images"
    write_folder(root, per_class=2)
    assert extract_folder(root, "store") == 0
    assert extract_folder(root, "store", "run.seed=1") == 0  # other random weights
    assert Store.open(tmp_path / "store").manifest["reused"] == 0
    assert extract_folder(root, "store", "run.seed=1", "store.dtype=float16") == 0
    assert Store.open(tmp_path / "store").manifest["reused"] == 0
    other = tmp_path / "copy"
    shutil.copytree(root, other)  # the same relative paths under another root are another collection
    assert extract_folder(other, "store", "run.seed=1", "store.dtype=float16") == 0
    assert Store.open(tmp_path / "store").manifest["reused"] == 0


@pytest.mark.slow
def test_index_of_the_old_store_is_not_used_after_an_update(tmp_path, capsys):
    root = tmp_path / "images"
    write_folder(root, per_class=3)
    assert extract_folder(root, "store") == 0
    assert simsearch("index", "run.dir=store") == 0
    write_image(root / "cats" / "zz-added.png", seed=4242)
    assert extract_folder(root, "store") == 0
    capsys.readouterr()
    assert simsearch("search", "run.dir=store", "query=cats/zz-added.png", "search.k=3", "logger=none") == 0
    assert json.loads((tmp_path / "store" / "index.json").read_text())["ntotal"] == 10


# ---------------------------------------------------------------- kill -9, then a folder change, then resume


@pytest.mark.slow
def test_killed_run_then_a_moved_file_resumes_to_a_fresh_store(tmp_path):
    root = tmp_path / "images"
    write_folder(root, per_class=32)  # 96 files, 24 batches of 4
    common = ["extract", "data=folder", f"data.root={root}", "data.batch_size=4", *TINY]
    script = Path(sys.executable).parent / "simsearch"
    process = subprocess.Popen([str(script), *common, "run.dir=killed"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("*.safetensors"))) < 4:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 4 <= len(list(shards.glob("*.safetensors"))) < 22, "the run must be killed mid-way"
    assert json.loads((tmp_path / "killed" / ".lock").read_text())["pid"] == process.pid  # left behind, stale
    # the same file count, but the first files (already in shards) shift: the fault of matching by position
    shutil.move(root / "cats" / "000.png", root / "owls" / "999.png")
    write_image(root / "cats" / "001.png", seed=31337)
    result = simsearch_subprocess(*common, "run.dir=killed", "-v", cwd=tmp_path)  # -v: the INFO line "resuming:"
    assert result.returncode == 0, result.stderr
    assert "stale lock" in result.stderr and "resuming:" in result.stderr
    assert simsearch(*common, "run.dir=fresh") == 0
    resumed, fresh = Store.open(tmp_path / "killed"), Store.open(tmp_path / "fresh")
    assert len(resumed) == 96 and resumed.manifest["embedded"] == 96 and resumed.manifest["reused"] == 0
    assert_same_store(resumed, fresh)


# ---------------------------------------------------------------- safe runs


@pytest.fixture(scope="module")
def folder_store_once(tmp_path_factory) -> Path:
    """A store of 6 images in folders, extracted once for the module (its data.root is the module's folder)."""
    folder = tmp_path_factory.mktemp("good")
    write_folder(folder / "images", per_class=2)
    assert extract_folder(folder / "images", str(folder / "store")) == 0
    return folder / "store"


def good_store(tmp_path: Path) -> tuple[Path, bytes]:
    root = tmp_path / "images"
    write_folder(root, per_class=2)
    assert extract_folder(root, "store") == 0
    return tmp_path / "store", (tmp_path / "store" / "manifest.json").read_bytes()


def copied_good_store(tmp_path: Path, folder_store_once: Path) -> tuple[Path, bytes]:
    """tmp_path/store, a copy of that store, and tmp_path/images, the same 6 images, for a run that fails."""
    write_folder(tmp_path / "images", per_class=2)
    copy_store(folder_store_once, tmp_path / "store")
    return tmp_path / "store", (tmp_path / "store" / "manifest.json").read_bytes()


@pytest.mark.parametrize("mistake", [
    ["data.root=does-not-exist"],
    ["model.weights=missing.pth"],
    ["data.batch_size=0"],
])
def test_a_failed_run_keeps_the_previous_store(folder_store_once, tmp_path, mistake, capsys):
    store_dir, manifest = copied_good_store(tmp_path, folder_store_once)
    capsys.readouterr()
    assert simsearch("extract", "data=folder", "data.root=images", *TINY, "run.dir=store", *mistake) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert (store_dir / "manifest.json").read_bytes() == manifest
    assert len(Store.open(store_dir)) == 6 and not (store_dir / ".lock").exists()


@pytest.mark.slow
def test_a_run_killed_mid_swap_is_refused_by_readers_and_completed_by_the_next_run(tmp_path, capsys):
    from simsearch.store import STAGING

    store_dir, _ = good_store(tmp_path)
    write_image(tmp_path / "images" / "cats" / "new.png", seed=8)
    assert extract_folder(tmp_path / "images", "next") == 0
    staging = store_dir / STAGING
    shutil.copytree(tmp_path / "next", staging, ignore=shutil.ignore_patterns(".*"))
    os.replace(staging / "embeddings.npy", store_dir / "embeddings.npy")  # killed after the first file of the swap
    capsys.readouterr()
    assert simsearch("eval", "run.dir=store", "logger=none") == 2
    assert "being swapped in" in capsys.readouterr().err
    assert extract_folder(tmp_path / "images", "store") == 0
    assert not staging.exists()
    store = Store.open(store_dir)
    assert store.manifest["reused"] == 7  # the completed swap's store was the one reused
    assert_same_store(store, Store.open(tmp_path / "next"))


@pytest.mark.slow
def test_a_second_run_on_the_same_run_dir_is_refused(tmp_path):
    store_dir, manifest = good_store(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from simsearch.store import RunLock\n"
                               f"with RunLock(__import__('pathlib').Path({str(store_dir)!r})):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = simsearch_subprocess("extract", "data=folder", "data.root=images", *TINY, "run.dir=store",
                                      cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"another run (pid {holder.pid}" in result.stderr and result.stderr.count("\n") == 1
    assert (store_dir / "manifest.json").read_bytes() == manifest


@pytest.mark.slow
def test_two_concurrent_runs_one_refused_and_the_store_intact(tmp_path):
    root = tmp_path / "images"
    write_folder(root, per_class=20)
    common = ["extract", "data=folder", f"data.root={root}", "data.batch_size=4", *TINY, "run.dir=store"]
    script = Path(sys.executable).parent / "simsearch"
    runs = [subprocess.Popen([str(script), *common], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outcomes = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 2]), outcomes  # the second may start after the first finished
    for code, error in outcomes:
        assert "Traceback" not in error and (code == 0 or "another run" in error)
    assert len(Store.open(tmp_path / "store")) == 60


# ---------------------------------------------------------------- verified reads


@pytest.mark.parametrize("command", [["eval"], ["search", "query=0"], ["index"]])
def test_a_flipped_byte_is_refused_naming_the_file(synthetic_store, tmp_path, command, capsys):
    path = tmp_path / "store" / "embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert simsearch(*command, "run.dir=store", "logger=none") == 2
    error = capsys.readouterr().err
    assert "embeddings.npy does not match its checksum" in error and error.count("\n") == 1


def test_verification_is_cached_by_file_identity(synthetic_store, tmp_path, monkeypatch):
    import simsearch.store.verification as store_module

    monkeypatch.setattr(store_module, "RACY_NS", 0)  # a ctime cannot be set back: as if written a while ago
    Store.open(tmp_path / "store")
    hashed = []
    monkeypatch.setattr(store_module, "sha256_of", lambda path: hashed.append(path.name) or "x")
    Store.open(tmp_path / "store")
    assert hashed == []  # verified before, unchanged since
    labels = tmp_path / "store" / "labels.npy"
    os.utime(labels, ns=(time.time_ns(), time.time_ns()))
    with pytest.raises(Exception, match="labels.npy does not match"):
        Store.open(tmp_path / "store")
    assert hashed == ["labels.npy"]


# ---------------------------------------------------------------- every failure is a sentence


def damage(store_dir: Path, what: str) -> None:
    if what == "labels deleted":
        (store_dir / "labels.npy").unlink()
    elif what == "embeddings deleted":
        (store_dir / "embeddings.npy").unlink()
    elif what == "items truncated":
        items = store_dir / "items.jsonl"
        items.write_bytes(items.read_bytes()[:-30])
    elif what == "manifest not json":
        (store_dir / "manifest.json").write_text("{not json")
    elif what == "manifest a list":
        (store_dir / "manifest.json").write_text("[1, 2]")


@pytest.mark.parametrize("what, words", [
    ("labels deleted", "labels.npy is missing"),
    ("embeddings deleted", "embeddings.npy is missing"),
    ("items truncated", "items.jsonl does not match"),
    ("manifest not json", "not a readable manifest"),
    ("manifest a list", "not a simsearch manifest"),
])
@pytest.mark.parametrize("command", [["eval"], ["search", "query=1"]])
def test_a_damaged_store_is_one_sentence(synthetic_store, tmp_path, what, words, command, capsys):
    damage(tmp_path / "store", what)
    capsys.readouterr()
    assert simsearch(*command, "run.dir=store", "logger=none") == 2
    error = capsys.readouterr().err
    assert words in error and error.count("\n") == 1


@pytest.mark.parametrize("arguments, words", [
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["model.image_size=0"], "model.image_size=0"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["data.num_items=0"], "data.num_items=0"),
    (["data.num_classes=0"], "data.num_classes=0"),
    (["search.grid=out.txt"], "search.grid=out.txt"),
    (["serve.thumbnail_px=0"], "serve.thumbnail_px=0"),
    (["serve.max_upload_mb=-1"], "serve.max_upload_mb"),
    (["run.dir=afile"], "is a file"),
])
def test_bad_values_are_one_sentence(tmp_path, arguments, words, capsys):
    (tmp_path / "afile").write_text("not a folder")
    assert simsearch("extract", "data=synthetic", *TINY, *arguments) == 2
    error = capsys.readouterr().err
    assert words in error and error.count("\n") == 1


def test_read_only_run_dir_is_one_sentence_and_serve_still_starts(synthetic_store, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    store_dir = synthetic_store
    store_dir.chmod(0o555)
    try:
        capsys.readouterr()
        assert simsearch("extract", *SYNTHETIC_8, "run.dir=store") == 2
        assert "not writable" in capsys.readouterr().err
        from fastapi.testclient import TestClient

        from simsearch.config import load_config
        from simsearch.server.app import create_app

        with TestClient(create_app(load_config(["run.dir=store", "logger=none", "serve.device=cpu"])),
                        base_url="http://localhost") as client:
            assert client.get("/search", params={"item": "2", "k": 3}).status_code == 200
        assert not (store_dir / "index.faiss").exists()
    finally:
        store_dir.chmod(0o755)


@pytest.mark.slow
def test_queries_that_are_not_rows_and_odd_file_names(synthetic_store, tmp_path, capsys):
    for query in ("²", "-0", "+1", "[a].jpg", "true"):
        capsys.readouterr()
        assert simsearch("search", "run.dir=store", f"query={query}", "logger=none") == 2, query
        error = capsys.readouterr().err
        assert "no such file" in error and error.count("\n") == 1
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "picture.png")
    (tmp_path / "true").write_bytes((tmp_path / "picture.png").read_bytes())
    shutil.copy(tmp_path / "true", tmp_path / "[a].jpg")
    for query in ("true", "[a].jpg"):
        assert simsearch("search", "run.dir=store", f"query={query}", "search.k=2", "logger=none") == 0
    assert simsearch("eval", "run.dir=store", "eval.k=5", "logger=none") == 0
    assert "precision@5" in json.loads((tmp_path / "store" / "metrics.json").read_text())


def test_truncated_index_is_rebuilt(synthetic_store, tmp_path, caplog):
    assert simsearch("index", "run.dir=store") == 0
    index = tmp_path / "store" / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    assert simsearch("search", "run.dir=store", "query=3", "search.k=2", "logger=none") == 0
    assert "rebuilding" in caplog.text and index.stat().st_size > 100


# ---------------------------------------------------------------- folders: links, hidden files, moved files


def test_links_and_hidden_files_follow_one_rule(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    write_folder(root, per_class=2)
    write_image(outside / "out.png", seed=5)
    (root / "cats" / "to-outside.png").symlink_to(outside / "out.png")
    (root / "cats" / "dangling.png").symlink_to(root / "nowhere.png")
    (root / "cats" / "loop.png").symlink_to(root / "cats" / "loop.png")
    (root / "dogs" / "back-up").symlink_to(root)  # a folder link to an ancestor
    (root / "dogs" / "alias.png").symlink_to(root / "dogs" / "000.png")  # inside the root: followed
    write_image(root / ".thumbnails" / "x.png", seed=6)
    write_image(root / "owls" / ".hidden.png", seed=7)
    (root / ".DS_Store").write_bytes(b"\0\1")
    assert extract_folder(root, "store", "model.name=resnet18") == 0
    store = Store.open(tmp_path / "store")
    paths = {item["path"] for item in store.items}
    assert "dogs/alias.png" in paths and len(paths) == 7
    assert not any("hidden" in p or "thumbnails" in p for p in paths)
    skipped = {s["path"]: s["reason"] for s in read_jsonl(tmp_path / "store" / "skipped.jsonl")}
    assert "leaves data.root" in skipped["cats/to-outside.png"]
    assert "dangling" in skipped["cats/dangling.png"]
    assert "loop" in skipped["cats/loop.png"] and "loop" in skipped["dogs/back-up"]
    assert store.manifest["skipped"] == 4


def test_moved_and_deleted_files_still_print_and_draw(tmp_path, capsys):
    root = tmp_path / "images"
    write_folder(root, per_class=2)
    assert extract_folder(root, "store", "model.name=resnet18") == 0
    for path in (root / "dogs").iterdir():
        path.unlink()
    (root / "cats" / "001.png").rename(tmp_path / "gone.png")
    capsys.readouterr()
    assert simsearch("search", "run.dir=store", "query=cats/001.png", "search.k=5", "logger=none") == 0
    printed = capsys.readouterr().out
    assert printed.count("image unavailable") >= 2 and "was moved or deleted" in printed
    assert Image.open(tmp_path / "store" / "recommendations.png").size[0] > 500


def test_items_are_read_lazily_from_the_store_as_it_was_when_opened(tmp_path):
    """Evaluation never reads items.jsonl; a store replaced after open() is not paired with the old rows."""
    vectors = np.random.default_rng(0).normal(size=(6, 4))
    make_vector_store(tmp_path / "s", vectors, np.array([0, 1, 0, 1, 0, 1]))
    opened = Store.open(tmp_path / "s")
    assert opened._items is None and len(opened) == 6  # nothing parsed yet
    replacement = make_vector_store(tmp_path / "new", vectors[::-1], np.array([1, 0, 1, 0, 1, 0]))
    renamed = [{**item, "id": f"other{item['index']}"} for item in replacement.items]
    finish_store(tmp_path / "new", replacement.labels, renamed, [], {"count": 6, "dim": 4, "data": {}, "model": {}})
    swap_in(tmp_path / "new", tmp_path / "s")  # what an extraction does while a server holds the store open
    assert [item["id"] for item in opened.items] == [f"item{i}" for i in range(6)]
    assert opened.row_of("item3") == 3
    assert Store.open(tmp_path / "s").items[3]["id"] == "other3"


def test_a_store_re_extracted_after_open_still_answers_as_the_store_that_was_opened(tmp_path):
    """Store.items is read on first use, from the items.jsonl held open since open(): another extraction
    swapping in a new store meanwhile is never paired row by row with the old vectors and labels."""
    import simsearch as api

    vectors, labels = np.eye(4), np.array([0, 1, 0, 1])
    make_vector_store(tmp_path / "s", vectors, labels)
    opened = api.open(tmp_path / "s")
    make_vector_store(tmp_path / "s", vectors[::-1], labels, ["shoe", "bag"])  # same count, other items
    old = opened.search("item0", k=3)  # the old store, whole: its ids, its label names, by the same rows
    assert [n.label for n in old] == [["c0", "c1"][labels[n.row]] for n in old] and len(old) == 3
    new = api.open(tmp_path / "s").search("item0", k=3)
    assert [n.label for n in new] == [["shoe", "bag"][labels[n.row]] for n in new]
