"""The ecosystem's formats: `simsearch export` (clip-retrieval's layout, one Parquet table), read back with
pyarrow and pandas and compared with the store by item id, never by position; Hugging Face datasets
(`data=hf`) extracted to the same vectors as the same images in a folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import PIXELS, simsearch, simsearch_subprocess

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

# datasets reads these when it is imported: never the hub, never the user's cache
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=tempfile.mkdtemp(prefix="simsearch-hf-"))


def write_images(root: Path, count: int = 6, start: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """Labelled folders of small images; returns {relative path: (label, pixels)}."""
    rng = np.random.default_rng(start)
    written = {}
    for i in range(start, start + count):
        label = ("red", "blue")[i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / label / f"{i:03d}.png")
        written[f"{label}/{i:03d}.png"] = (label, pixels)
    return written


def store_vectors_by_id(run_dir: Path) -> dict[str, np.ndarray]:
    """The store's vectors by item id, read from its files directly (row i of embeddings.npy = line i of items.jsonl)."""
    embeddings = np.load(run_dir / "embeddings.npy")
    items = [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]
    return {item["id"]: embeddings[row].astype(np.float32) for row, item in enumerate(items)}


@pytest.fixture
def folder_store(tmp_path):
    root = tmp_path / "images"
    written = write_images(root)
    assert simsearch("extract", "data=folder", f"data.root={root}", *PIXELS, "store.dtype=float16", "run.dir=store") == 0
    return tmp_path / "store", root, written


def test_export_clip_retrieval_layout_matches_the_store_by_id(folder_store):
    run_dir, root, written = folder_store
    assert simsearch("export", "run.dir=store", "export.format=clip-retrieval", "export.dir=emb") == 0
    vectors = np.load("emb/img_emb/img_emb_0.npy")
    metadata = pd.read_parquet("emb/metadata/metadata_0.parquet")
    assert vectors.dtype == np.float32 and len(vectors) == len(metadata) == len(written)
    expected = store_vectors_by_id(run_dir)
    for row, record in metadata.iterrows():
        np.testing.assert_array_equal(vectors[row], expected[record["id"]])  # float16 store, exactly widened
        label, _ = written[record["id"]]
        assert record["label_name"] == label
        assert Path(record["image_path"]) == root.resolve() / record["id"]
        assert record["key"].startswith(record["id"] + ":")
    assert sorted(set(metadata["label"])) == [0, 1]  # classes sorted: blue 0, red 1
    assert all((metadata["label"] == 0) == (metadata["label_name"] == "blue"))
    assert json.loads(Path("emb/export.json").read_text())["count"] == len(written)


def test_export_parquet_has_a_fixed_size_vector_column(folder_store):
    run_dir, _, written = folder_store
    assert simsearch("export", "run.dir=store", "export.format=parquet", "export.dir=table") == 0
    table = pq.read_table("table/embeddings.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8 * 8 * 3)
    expected = store_vectors_by_id(run_dir)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(written)
    for identifier, vector in zip(ids, table.column("embedding").to_pylist()):
        np.testing.assert_array_equal(np.array(vector, np.float32), expected[identifier])


def test_export_replaces_an_earlier_export_only_when_complete(folder_store, monkeypatch, tmp_path, capsys):
    run_dir, root, written = folder_store
    assert simsearch("export", "run.dir=store", "export.dir=emb") == 0
    before = Path("emb/img_emb/img_emb_0.npy").read_bytes()

    import simsearch.export as export_stage

    def fail(*_):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as failing:  # (not monkeypatch.undo(): that would also undo the test's chdir)
        failing.setattr(export_stage, "write_npy", fail)
        assert simsearch("export", "run.dir=store", "export.dir=emb") == 2
    assert Path("emb/img_emb/img_emb_0.npy").read_bytes() == before  # the earlier export, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".emb")) == []  # no half export left

    write_images(root, count=2, start=100)  # the store grows; the next export replaces the earlier one
    assert simsearch("extract", "data=folder", f"data.root={root}", *PIXELS, "store.dtype=float16", "run.dir=store") == 0
    assert simsearch("export", "run.dir=store", "export.dir=emb") == 0
    assert len(np.load("emb/img_emb/img_emb_0.npy")) == len(written) + 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".emb")) == []
    assert Path.cwd() == tmp_path


@pytest.mark.parametrize("target, message", [("store", "holds the store"), (".", "holds the store"),
                                             ("notes", "not an earlier export"), ("notes/a.txt", "is a file")])
def test_export_refuses_a_folder_it_would_destroy(folder_store, capsys, target, message):
    Path("notes").mkdir()
    Path("notes/a.txt").write_text("mine")
    assert simsearch("export", "run.dir=store", f"export.dir={target}") == 2
    assert message in capsys.readouterr().err
    assert Path("notes/a.txt").read_text() == "mine" and (Path("store") / "manifest.json").is_file()


def test_export_of_an_unknown_format_is_one_sentence(folder_store, capsys):
    assert simsearch("export", "run.dir=store", "export.format=csv") == 2
    assert "export.format must be clip-retrieval or parquet, not 'csv'" in capsys.readouterr().err


# ---------------------------------------------------------------- data=hf


def hf_dataset(written: dict[str, tuple[str, np.ndarray]], root: Path):
    """The folder's images (their PNG files' bytes) as a Hugging Face dataset saved with save_to_disk: a `name`
    column (the folder's relative path), `label` a ClassLabel."""
    datasets = pytest.importorskip("datasets")
    names = sorted(written)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["blue", "red"]),
                                  "name": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": (root / name).read_bytes(), "path": None} for name in names],
         "label": [written[name][0] for name in names], "name": names}, features=features)
    return dataset


def test_hf_dataset_on_disk_gives_the_folder_vectors_and_reextracts_only_added_rows(tmp_path, capsys):
    root = tmp_path / "images"
    written = write_images(root)
    assert simsearch("extract", "data=folder", f"data.root={root}", *PIXELS, "run.dir=folder") == 0
    hf_dataset(written, root).save_to_disk(tmp_path / "saved")
    hf = ["data=hf", f"data.root={tmp_path / 'saved'}", "data.key_column=name", *PIXELS, "run.dir=hf"]
    assert simsearch("extract", *hf) == 0
    folder, from_hf = store_vectors_by_id(tmp_path / "folder"), store_vectors_by_id(tmp_path / "hf")
    assert sorted(from_hf) == sorted(folder)
    for identifier, vector in folder.items():
        np.testing.assert_array_equal(from_hf[identifier], vector)
    items = [json.loads(line) for line in (tmp_path / "hf" / "items.jsonl").read_text().splitlines()]
    assert all(item["label"] == written[item["id"]][0] for item in items)

    assert simsearch("eval", "run.dir=hf", "eval.k=[1]", "eval.knn_k=[]", "logger=none") == 0
    assert (tmp_path / "hf" / "metrics.json").is_file()
    assert simsearch("search", "run.dir=hf", "query=blue/001.png", "search.k=3", "logger=none") == 0
    from simsearch.items import ItemImages
    from simsearch.store import Store

    images = ItemImages(Store.open(tmp_path / "hf"))
    for row, item in enumerate(images.store.items):  # thumbnails read back from the dataset, pixel for pixel
        image, reason = images.image_or_placeholder(row)
        assert reason is None
        np.testing.assert_array_equal(np.asarray(image), written[item["id"]][1])

    added = write_images(root, count=2, start=50)  # rows added: they sort among the others, shifting rows
    shutil.rmtree(tmp_path / "saved")
    hf_dataset({**written, **added}, root).save_to_disk(tmp_path / "saved")
    images = ItemImages(Store.open(tmp_path / "hf"))
    for row, item in enumerate(images.store.items):  # the stored items still found, by key column
        np.testing.assert_array_equal(np.asarray(images.image_or_placeholder(row)[0]), written[item["id"]][1])
    changed = tmp_path / "changed"
    shutil.copytree(root, changed)
    (changed / "red" / "000.png").write_bytes((root / "blue" / "001.png").read_bytes())
    shutil.rmtree(tmp_path / "saved")
    hf_dataset({**written, **added}, changed).save_to_disk(tmp_path / "saved")  # one row's image replaced
    images = ItemImages(Store.open(tmp_path / "hf"))
    reason = images.image_or_placeholder(images.store.row_of("red/000.png"))[1]
    assert reason is not None and "changed or left the dataset since extraction" in reason
    shutil.rmtree(tmp_path / "saved")
    hf_dataset({**written, **added}, root).save_to_disk(tmp_path / "saved")
    capsys.readouterr()
    assert simsearch("extract", *hf) == 0
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert (manifest["count"], manifest["embedded"], manifest["reused"]) == (8, 2, 6)
    assert sorted(store_vectors_by_id(tmp_path / "hf")) == sorted({**written, **added})


def test_hf_parquet_and_imagefolder_give_the_folder_vectors(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "images"
    written = write_images(root)
    assert simsearch("extract", "data=folder", f"data.root={root}", *PIXELS, "run.dir=folder") == 0
    folder = store_vectors_by_id(tmp_path / "folder")
    hf_dataset(written, root).to_parquet(str(tmp_path / "parquet" / "test.parquet"))
    assert simsearch("extract", "data=hf", f"data.root={tmp_path / 'parquet' / 'test.parquet'}", "data.key_column=name",
                     *PIXELS, "run.dir=parquet") == 0
    from_parquet = store_vectors_by_id(tmp_path / "parquet")
    assert sorted(from_parquet) == sorted(folder)
    for identifier, vector in folder.items():
        np.testing.assert_array_equal(from_parquet[identifier], vector)

    # an imagefolder: no key column, so items are rows; the library itself says which file each row is
    assert simsearch("extract", "data=hf", f"data.root={root}", "data.split=train", *PIXELS, "run.dir=imagefolder") == 0
    rows = datasets.load_dataset("imagefolder", data_dir=str(root), split="train").cast_column("image", datasets.Image(decode=False))
    from_imagefolder = store_vectors_by_id(tmp_path / "imagefolder")
    assert len(from_imagefolder) == len(folder)
    for row, record in enumerate(rows):
        relative = Path(record["image"]["path"]).relative_to(root).as_posix()
        np.testing.assert_array_equal(from_imagefolder[str(row)], folder[relative])
    items = [json.loads(line) for line in (tmp_path / "imagefolder" / "items.jsonl").read_text().splitlines()]
    assert [item["label"] for item in items] == [relative.split("/")[0] for relative in
                                                 (Path(r["image"]["path"]).relative_to(root).as_posix() for r in rows)]


def test_hf_mistakes_are_one_sentence(tmp_path, capsys):
    root = tmp_path / "images"
    hf_dataset(write_images(root), root).save_to_disk(tmp_path / "saved")
    for arguments, message in (
            (["data.hub=fashion_mnist"], "needs the Hugging Face hub and this run is offline"),
            ([f"data.root={tmp_path / 'saved'}", "data.image_column=picture"], "data.image_column=picture is not a column"),
            ([f"data.root={tmp_path / 'saved'}", "data.key_column=label"], "data.key_column=label holds"),
            ([f"data.root={root}", "data.split=test"], "has no split 'test': give data.split=train")):
        assert simsearch("extract", "data=hf", *arguments, *PIXELS, "run.dir=x") == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------- data=webdataset


def write_shards(root: Path, written: dict[str, tuple[str, np.ndarray]], folder: Path, per_shard: int = 4) -> list[str]:
    """The folder's PNG files as WebDataset shards written by webdataset's TarWriter: `__key__` = the file's
    path without its suffix (webdataset keys hold no dot), `png` its bytes, `cls` its class number."""
    webdataset = pytest.importorskip("webdataset")
    root.mkdir(parents=True, exist_ok=True)
    names, shards = sorted(written), []
    for number, start in enumerate(range(0, len(names), per_shard)):
        shards.append(str(root / f"train-{number:06d}.tar"))
        with webdataset.TarWriter(shards[-1]) as sink:
            for name in names[start:start + per_shard]:
                sink.write({"__key__": name.removesuffix(".png"), "png": (folder / name).read_bytes(),
                            "cls": ["blue", "red"].index(written[name][0])})
    return shards


def test_webdataset_shards_give_the_folder_vectors_and_record_corrupt_samples(tmp_path, capsys):
    webdataset = pytest.importorskip("webdataset")
    folder = tmp_path / "images"
    written = write_images(folder)
    assert simsearch("extract", "data=folder", f"data.root={folder}", *PIXELS, "run.dir=folder") == 0
    expected = store_vectors_by_id(tmp_path / "folder")
    shards = write_shards(tmp_path / "shards", written, folder)
    with webdataset.TarWriter(str(tmp_path / "shards" / "train-000002.tar")) as sink:  # a corrupt and an imageless sample
        sink.write({"__key__": "broken", "png": b"\x89PNG\r\n\x1a\n not really", "cls": 0})
        sink.write({"__key__": "caption-only", "txt": "no image here"})
    assert len(shards) == 2
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    assert simsearch("extract", "data=webdataset", f"data.urls={pattern}", *PIXELS, "run.dir=wds") == 0
    items = [json.loads(line) for line in (tmp_path / "wds" / "items.jsonl").read_text().splitlines()]
    vectors = np.load(tmp_path / "wds" / "embeddings.npy")
    assert len(items) == len(written)
    for row, item in enumerate(items):  # by the sample's key, never by position
        name = item["sample"] + ".png"
        np.testing.assert_array_equal(vectors[row], expected[name])
        assert item["label"] == str(["blue", "red"].index(written[name][0]))  # cls numbers name the classes
        assert item["id"].endswith(f".tar/{item['sample']}")
    skipped = {json.loads(line)["sample"]: json.loads(line)["reason"]
               for line in (tmp_path / "wds" / "skipped.jsonl").read_text().splitlines()}
    assert set(skipped) == {"broken", "caption-only"}
    assert "no image member" in skipped["caption-only"]

    from simsearch.items import ItemImages
    from simsearch.store import Store

    images = ItemImages(Store.open(tmp_path / "wds"))
    for row, item in enumerate(images.store.items):  # thumbnails read back by (shard, key)
        image, reason = images.image_or_placeholder(row)
        assert reason is None
        np.testing.assert_array_equal(np.asarray(image), written[item["sample"] + ".png"][1])

    added = write_images(folder, count=3, start=40)  # a new shard, and a damaged copy of it: only its items are embedded
    write_shards(tmp_path / "new", added, folder)
    (tmp_path / "shards" / "train-000003.tar").write_bytes((tmp_path / "new" / "train-000000.tar").read_bytes())
    (tmp_path / "shards" / "train-000004.tar").write_bytes((tmp_path / "new" / "train-000000.tar").read_bytes()[:3000])
    urls = f"data.urls=['{pattern}','{tmp_path / 'shards' / 'train-{000003..000004}.tar'}']"  # a list: quoted
    assert simsearch("extract", "data=webdataset", urls, *PIXELS, "run.dir=wds") == 0
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert (manifest["embedded"], manifest["reused"]) == (3, len(written))
    skipped = [json.loads(line) for line in (tmp_path / "wds" / "skipped.jsonl").read_text().splitlines()]
    damaged = [s for s in skipped if s["shard"].endswith("train-000004.tar")]
    assert any(s["reason"].startswith("damaged shard") for s in damaged)


def test_webdataset_mistakes_are_one_sentence(tmp_path, capsys):
    import gzip

    Path("shard.tar.gz").write_bytes(gzip.compress(b"x" * 1000))
    for arguments, message in ((["data.urls=missing-{0..1}.tar"], "shard missing-0.tar (from data.urls) does not exist"),
                               (["data.urls=shard.tar.gz"], "is compressed: simsearch reads plain .tar shards")):
        assert simsearch("extract", "data=webdataset", *arguments, *PIXELS, "run.dir=x") == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("source", ["webdataset", "hf"])
def test_two_process_ddp_store_of_shards_and_datasets_equals_single_process(tmp_path, source):
    # 11 items over 2 ranks in batches of 2: uneven, and the sampler pads with a duplicate; merged by key
    folder = tmp_path / "images"
    written = write_images(folder, count=11)
    if source == "webdataset":
        write_shards(tmp_path / "shards", written, folder, per_shard=3)
        data = ["data=webdataset", f"data.urls={tmp_path / 'shards'}/train-{{000000..000003}}.tar"]
    else:
        hf_dataset(written, folder).save_to_disk(tmp_path / "saved")
        data = ["data=hf", f"data.root={tmp_path / 'saved'}"]
    common = (*data, "data.batch_size=2", *PIXELS)
    single = simsearch_subprocess("extract", *common, "run.dir=one", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = simsearch_subprocess("extract", *common, "run.dir=two", "trainer.devices=2", "trainer.strategy=ddp", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    one, two = store_vectors_by_id(tmp_path / "one"), store_vectors_by_id(tmp_path / "two")
    assert len(two) == 11 and sorted(two) == sorted(one)  # no duplicate, no gap
    for identifier, vector in one.items():
        np.testing.assert_array_equal(two[identifier], vector)
