"""The same image gives the same vector however it arrives: a dataset item, the same pixels as a file in a
folder, a query file, a PIL image through the Python API. Searching a store by any item's own file finds
that item first at cosine >= 0.9999, for every preset, on real images. Precision is part of the
fingerprint, and one tie rule holds everywhere."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simsearch
from simsearch.pixels import FASHION_MNIST_FILES, read_idx
from simsearch.store import Store
from tests.helpers import FASHION_MNIST, TINY, make_vector_store
from tests.helpers import simsearch as cli

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "data.num_workers=0"]
PRESETS = {  # every preset; ResNet-50's ImageNet weights cannot be had offline, so its network runs with random ones
    "pixels": ["model=pixels"],
    "efficientnet_lite0": ["model=efficientnet_lite0", "model.image_size=64"],
    "resnet50": ["model=resnet50", "model.weights=random", "model.image_size=64"],
}


def fashion_mnist_folder(root: Path, count: int) -> list[Path]:
    """The first `count` test images of Fashion-MNIST as PNG files in class folders (ids are paths)."""
    images = read_idx(FASHION_MNIST / FASHION_MNIST_FILES["test"][0])[:count]
    labels = read_idx(FASHION_MNIST / FASHION_MNIST_FILES["test"][1])[:count]
    paths = []
    for index, (image, label) in enumerate(zip(images, labels)):
        path = root / f"class{label}" / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def photo_folder(root: Path) -> list[Path]:
    """scikit-image's photos (real camera images of different sizes), as JPEG and PNG files."""
    import skimage.data

    paths = []
    for name, suffix in (("astronaut", ".jpg"), ("chelsea", ".png"), ("coffee", ".jpg"), ("rocket", ".png"),
                         ("camera", ".png"), ("hubble_deep_field", ".jpg")):
        path = root / "photos" / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, name)()).save(path, quality=92)
        paths.append(path)
    return paths


def assert_each_file_finds_itself(store_dir: Path, files: dict[str, Path]) -> list[float]:
    """Search the store by each item's own file (a path, and the same file opened as a PIL image)."""
    store = simsearch.open(store_dir)
    scores = []
    for item_id, path in files.items():
        for query in (Path(path), Image.open(path)):
            first = store.search(query, k=1)[0]
            assert first.id == item_id, f"{path} found {first.id} first"
            scores.append(first.score)
    assert min(scores) >= 0.9999, min(scores)
    return scores


@needs_fashion_mnist
@pytest.mark.parametrize("preset", ["pixels", "efficientnet_lite0"])
def test_a_dataset_store_finds_each_item_by_its_own_file(tmp_path, preset):
    files = fashion_mnist_folder(tmp_path / "files", 10)
    assert cli("extract", "data=fashion_mnist", "data.limit=10", *QUIET, *PRESETS[preset], "run.dir=dataset") == 0
    assert_each_file_finds_itself(tmp_path / "dataset", {str(i): path for i, path in enumerate(files)})


@needs_fashion_mnist
def test_the_same_images_as_files_and_as_a_dataset_give_the_same_vectors(tmp_path):
    fashion_mnist_folder(tmp_path / "files", 16)
    common = [*QUIET, "model=efficientnet_lite0", "model.image_size=64"]
    assert cli("extract", "data=fashion_mnist", "data.limit=16", *common, "run.dir=dataset") == 0
    assert cli("extract", "data=folder", f"data.root={tmp_path / 'files'}", *common, "run.dir=folder") == 0
    dataset, folder = Store.open(tmp_path / "dataset"), Store.open(tmp_path / "folder")
    row_of_index = {int(Path(item["path"]).stem): row for row, item in enumerate(folder.items)}
    folder_vectors = folder.vectors(np.array([row_of_index[i] for i in range(16)]))
    cosine = (dataset.vectors() * folder_vectors).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine.min()


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_finds_each_item_by_its_own_file_in_folders_and_datasets(tmp_path, preset):
    fashion = fashion_mnist_folder(tmp_path / "fashion", 12)
    photos = photo_folder(tmp_path / "mixed")
    assert cli("extract", "data=fashion_mnist", "data.limit=12", *QUIET, *PRESETS[preset], "run.dir=dataset") == 0
    assert_each_file_finds_itself(tmp_path / "dataset", {str(i): path for i, path in enumerate(fashion)})
    assert cli("extract", "data=folder", f"data.root={tmp_path / 'mixed'}", *QUIET, *PRESETS[preset], "run.dir=photos") == 0
    assert_each_file_finds_itself(tmp_path / "photos", {p.relative_to(tmp_path / "mixed").as_posix(): p for p in photos})


def test_precision_is_part_of_the_fingerprint(tmp_path, capsys):
    common = ["extract", "data=synthetic", "data.num_items=8", *TINY, "model.name=resnet18", "run.dir=out"]  # a network
    assert cli(*common, "trainer.precision=bf16-mixed") == 0
    bf16 = Store.open(tmp_path / "out")
    assert bf16.manifest["embedder"]["precision"] == "bf16-mixed"
    assert cli(*common, "trainer.precision=32-true") == 0
    fp32 = Store.open(tmp_path / "out")
    assert fp32.manifest["embedder"]["precision"] == "32-true"
    assert (fp32.manifest["embedded"], fp32.manifest["reused"]) == (8, 0)  # never a store of two precisions
    assert cli(*common, "trainer.precision=32-true") == 0
    assert Store.open(tmp_path / "out").manifest["reused"] == 8


def test_ties_rank_by_row_lowest_first_in_search_and_in_eval(tmp_path):
    # rows 2, 5, 7 and 9 are the same vector: a query of row 5 ties with 2, 7 and 9
    vectors = np.random.default_rng(0).normal(size=(12, 6))
    vectors[[2, 7, 9]] = vectors[5]
    labels = np.array([0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 1])
    store = make_vector_store(tmp_path / "ties", vectors, labels)
    found = simsearch.open(store.dir).search(5, k=2)
    assert [n.row for n in found] == [2, 7] and found[0].score == pytest.approx(1.0)
    unit = store.vectors()
    found = simsearch.open(store.dir).search(unit[5], k=3)  # the vector itself: all four tie
    assert [n.row for n in found] == [2, 5, 7]  # the rule eval's exact search keeps (tests/test_evaluate.py)


def test_duplicates_against_and_eval_gallery_share_one_model_identity(tmp_path, capsys):
    """Two pixel stores differing only in run.seed hold the same vectors: both checks accept them; a store of
    another interpolation is refused by both, in a sentence naming model.interpolation."""
    common = ["data=synthetic", "data.num_items=12", "model=pixels", "model.image_size=8", *TINY[2:]]
    assert cli("extract", *common, "run.dir=a") == 0
    assert cli("extract", *common, "run.seed=7", "data.num_items=12", "run.dir=b") == 0
    assert cli("extract", *common, "model.interpolation=bicubic", "run.dir=c") == 0
    capsys.readouterr()
    assert cli("duplicates", "run.dir=a", f"duplicates.against={tmp_path / 'b'}", "logger=none") == 0
    assert cli("eval", "run.dir=a", f"eval.gallery={tmp_path / 'b'}", "logger=none") == 0
    capsys.readouterr()
    assert cli("duplicates", "run.dir=a", f"duplicates.against={tmp_path / 'c'}", "logger=none") == 2
    assert "model.interpolation: 'bilinear' vs 'bicubic'" in capsys.readouterr().err
    assert cli("eval", "run.dir=a", f"eval.gallery={tmp_path / 'c'}", "logger=none") == 2
    assert "model.interpolation: 'bilinear' vs 'bicubic'" in capsys.readouterr().err
