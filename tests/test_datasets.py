"""The metric-learning benchmark readers, each on a tiny fake written in the benchmark's real layout."""

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from simsearch.store import Store
from tests.helpers import TINY, read_json, reference_query_gallery, simsearch, simsearch_subprocess

SMALL = ["model=pixels", "model.image_size=8", *TINY[2:], "data.batch_size=8", "data.download=false"]  # the layout is the subject


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def extract(name: str, root: Path, split: str, out: str) -> Store:
    assert simsearch("extract", f"data={name}", f"data.root={root}", f"data.split={split}", *SMALL, f"run.dir={out}") == 0
    return Store.open(out)


def extract_error(capsys, *arguments: str) -> str:
    """The one line `simsearch extract` prints for bad input (exit status 2)."""
    assert simsearch("extract", *arguments, *SMALL, "run.dir=o") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


def names_of(store: Store) -> list[str]:
    return [store.label_name(row) for row in range(len(store))]


def fake_cub(root: Path) -> dict[int, int]:
    """CUB_200_2011/ with its three tables and images/, two images in each of classes 99-102; image id -> class."""
    base = root / "CUB_200_2011"
    classes = {c: f"{c:03d}.Bird_{c}" for c in range(1, 201)}
    image_class = {}
    lines = []
    for image_id, c in enumerate([101, 99, 100, 102, 99, 101, 100, 102], start=1):  # file order is not class order
        path = f"{classes[c]}/Bird_{c}_{image_id:04d}.jpg"
        write_image(base / "images" / path, image_id)
        lines.append(f"{image_id} {path}")
        image_class[image_id] = c
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c in image_class.items()))
    (base / "classes.txt").write_text("".join(f"{c} {name}\n" for c, name in classes.items()))
    (base / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i in image_class))  # not used
    return image_class


def test_cub_split_by_class_1_100_train_101_200_test(tmp_path):
    image_class = fake_cub(tmp_path / "cub")
    train = extract("cub200", tmp_path / "cub", "train", "train")
    test = extract("cub200", tmp_path / "cub", "test", "test")
    assert len(train) == 4 and len(test) == 4
    assert set(names_of(train)) == {"099.Bird_99", "100.Bird_100"}
    assert set(names_of(test)) == {"101.Bird_101", "102.Bird_102"}
    assert [item["path"] for item in test.items][0] == "CUB_200_2011/images/101.Bird_101/Bird_101_0001.jpg"
    test_ids = [i for i, c in image_class.items() if c > 100]
    assert [int(item["id"].rsplit("_", 1)[1][:4]) for item in test.items] == test_ids
    assert test.manifest["dataset"] == "cub200" and test.manifest["skipped"] == 0


def test_cub_offline_says_what_to_put_where(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    code = simsearch("extract", "data=cub200", f"data.root={tmp_path / 'none'}", *TINY, "data.download=true", "run.dir=o")
    error = capsys.readouterr().err
    assert code == 2 and "could not be downloaded" in error and "put CUB_200_2011.tgz" in error
    code = simsearch("extract", "data=cub200", f"data.root={tmp_path / 'none'}", *SMALL, "run.dir=o")
    assert code == 2 and "CUB_200_2011/images.txt is missing: put CUB_200_2011.tgz" in capsys.readouterr().err


def fake_cars(root: Path) -> list[int]:
    """cars_annos.mat (a 1 x N struct array, as in the real file) and car_ims/; returns each image's class."""
    classes = [98, 99, 1, 196, 99, 98]
    dtype = [(field, "O") for field in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")]
    annotations = np.zeros((1, len(classes)), dtype=dtype)
    for i, c in enumerate(classes):
        path = f"car_ims/{i + 1:06d}.jpg"
        write_image(root / path, i)
        annotations[0, i] = (path, 1, 2, 8, 9, np.uint8(c), np.uint8(i % 2))
    class_names = np.array([[f"Make Model {c}" for c in range(1, 197)]], dtype=object)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return classes


def test_cars196_split_by_class_1_98_train_99_196_test(tmp_path):
    fake_cars(tmp_path / "cars")
    train = extract("cars196", tmp_path / "cars", "train", "train")
    test = extract("cars196", tmp_path / "cars", "test", "test")
    assert names_of(train) == ["Make Model 98", "Make Model 1", "Make Model 98"]
    assert names_of(test) == ["Make Model 99", "Make Model 196", "Make Model 99"]
    assert [item["path"] for item in test.items] == ["car_ims/000002.jpg", "car_ims/000004.jpg", "car_ims/000005.jpg"]


@pytest.mark.slow
def test_cars196_missing_annotations_name_the_file(tmp_path):
    (tmp_path / "cars").mkdir()
    result = simsearch_subprocess("extract", "data=cars196", f"data.root={tmp_path / 'cars'}", *SMALL, "run.dir=o",
                                  cwd=tmp_path)
    assert result.returncode == 2 and "cars_annos.mat is missing: put cars_annos.mat" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def fake_sop(root: Path) -> None:
    base = root / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path\n"
    rows = {"train": [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG"),
                      (3, 2, 2, "chair_final/222_0.JPG")],
            "test": [(1, 11319, 1, "bicycle_final/333_0.JPG"), (2, 11320, 3, "kettle_final/444_0.JPG"),
                     (3, 11319, 1, "bicycle_final/333_1.JPG")]}
    for split, lines in rows.items():
        for image_id, _, _, path in lines:
            write_image(base / path, image_id + (10 if split == "test" else 0))
        (base / f"Ebay_{split}.txt").write_text(header + "".join(" ".join(map(str, line)) + "\n" for line in lines))


def test_sop_reads_its_train_and_test_files(tmp_path):
    fake_sop(tmp_path / "sop")
    train = extract("sop", tmp_path / "sop", "train", "train")
    test = extract("sop", tmp_path / "sop", "test", "test")
    assert names_of(train) == ["1", "1", "2"] and names_of(test) == ["11319", "11320", "11319"]
    assert test.items[1]["path"] == "Stanford_Online_Products/kettle_final/444_0.JPG"


def test_sop_refuses_a_path_outside_the_root_and_a_malformed_line(tmp_path, capsys):
    fake_sop(tmp_path / "sop")
    listing = tmp_path / "sop" / "Stanford_Online_Products" / "Ebay_test.txt"
    listing.write_text(listing.read_text() + "4 11321 4 ../../../etc/passwd\n")
    assert "names an image outside data.root" in extract_error(capsys, "data=sop", f"data.root={tmp_path / 'sop'}")
    listing.write_text("image_id class_id super_class_id path\n1 11319 bicycle_final/333_0.JPG\n")
    assert "line 2 has 3 fields, expected 4" in extract_error(capsys, "data=sop", f"data.root={tmp_path / 'sop'}")


def fake_inshop(root: Path) -> list[tuple[str, str, str]]:
    """list_eval_partition.txt (count, header, rows) and img/; ids shared between query and gallery."""
    rows = [
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
        ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
        ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
        ("img/MEN/Denim/id_00000080/01_3_back.jpg", "id_00000080", "gallery"),
        ("img/WOMEN/Skirts/id_00000091/03_1_front.jpg", "id_00000091", "query"),
        ("img/WOMEN/Skirts/id_00000091/03_2_side.jpg", "id_00000091", "query"),
        ("img/WOMEN/Skirts/id_00000091/03_4_full.jpg", "id_00000091", "gallery"),
        ("img/WOMEN/Tees/id_00000100/01_1_front.jpg", "id_00000100", "gallery"),
    ]
    for seed, (path, _, _) in enumerate(rows):
        write_image(root / path, seed)
    (root / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{p}  {i}  {s}\n" for p, i, s in rows))
    return rows


def test_inshop_query_and_gallery_stores_evaluate_one_against_the_other(tmp_path, caplog):
    rows = fake_inshop(tmp_path / "inshop")
    query = extract("inshop", tmp_path / "inshop", "query", "query")
    gallery = extract("inshop", tmp_path / "inshop", "gallery", "gallery")
    assert [item["path"] for item in query.items] == [p for p, _, s in rows if s == "query"]
    assert names_of(gallery) == ["id_00000080", "id_00000080", "id_00000091", "id_00000100"]
    assert query.classes == ["id_00000080", "id_00000091"] and gallery.classes[:2] == query.classes
    assert simsearch("eval", "run.dir=query", "logger=none", "eval.k=[1,2]") == 0  # not the benchmark's protocol
    assert "the query split of data=inshop, evaluated leave-one-out" in caplog.text
    assert simsearch("eval", "run.dir=query", "eval.gallery=gallery", "logger=none", "eval.k=[1,2]") == 0
    metrics = read_json(Path("query") / "metrics.json")
    assert metrics["protocol"] == "query-gallery" and metrics["queries"] == 3 and metrics["items"] == 4
    assert metrics["gallery"]["split"] == "gallery" and metrics["gallery"]["count"] == 4
    # relevance by product id across the two stores, against a brute force over their embeddings
    reference = reference_query_gallery(query.vectors().astype(np.float64), names_of(query),
                                        gallery.vectors().astype(np.float64), names_of(gallery), [1, 2])
    for name, value in reference.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name


def test_inshop_splits_and_an_incomplete_partition_file(tmp_path, capsys):
    fake_inshop(tmp_path / "inshop")
    train = extract("inshop", tmp_path / "inshop", "train", "train")
    assert names_of(train) == ["id_00000002", "id_00000002"]
    root = f"data.root={tmp_path / 'inshop'}"
    assert "must be train or query or gallery" in extract_error(capsys, "data=inshop", root, "data.split=test")
    listing = tmp_path / "inshop" / "list_eval_partition.txt"
    listing.write_text(listing.read_text().replace("9\n", "52712\n", 1))
    assert "declares 52712 images but lists 9" in extract_error(capsys, "data=inshop", root)


def damage(root: Path, name: str) -> tuple[str, str]:
    """One hostile copy of a benchmark in its real layout: (data=NAME, the part of the sentence expected)."""
    def edit(path: Path, old: str, new: str, count: int = 1) -> None:
        path.write_text(path.read_text().replace(old, new, count))

    cub, sop = root / "CUB_200_2011", root / "Stanford_Online_Products"
    if name.startswith("cub"):
        fake_cub(root)
    if name.startswith("sop"):
        fake_sop(root)
    if name.startswith("inshop"):
        fake_inshop(root)
    if name == "cub_truncated_at_a_line":  # a silent loss of images before
        (cub / "images.txt").write_text("".join((cub / "images.txt").read_text().splitlines(True)[:3]))
        return "cub200", "images.txt lists 3 images and"
    if name == "cub_class_outside_1_200":  # before: dropped from both splits without a word
        edit(cub / "image_class_labels.txt", "1 101\n", "1 250\n")
        edit(cub / "classes.txt", "\n", "\n250 250.Not_a_bird\n")
        return "cub200", "gives image 1 the class 250, outside cub200's classes 1-200"
    if name == "cub_not_text":  # before: a UnicodeDecodeError traceback
        (cub / "images.txt").write_bytes(b"\xff\xfe\x00binary")
        return "cub200", "images.txt is not a text file"
    if name == "cars_not_a_mat_file":  # before: a MatReadError traceback
        root.mkdir(parents=True)
        (root / "cars_annos.mat").write_bytes(b"not a MATLAB file")
        return "cars196", "is not the Cars196 cars_annos.mat"
    if name == "cars_class_outside_1_196":
        root.mkdir(parents=True)
        fake_cars(root)
        annotations = scipy.io.loadmat(root / "cars_annos.mat")["annotations"]
        annotations[0, 2]["class"] = np.uint8(197)
        scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations})
        return "cars196", "gives image 3 the class 197, outside cars196's classes 1-196"
    if name == "sop_without_header":  # before: the first image was taken for the header and dropped
        edit(sop / "Ebay_test.txt", "image_id class_id super_class_id path\n", "")
        return "sop", "line 1 should be the header 'image_id class_id super_class_id path'"
    if name == "sop_test_class_in_train":  # before: accepted, so train and test shared a class
        edit(sop / "Ebay_test.txt", " 11320 ", " 1 ")
        return "sop", "share 1 class id(s) (e.g. 1): the official train and test classes never overlap"
    if name == "inshop_unknown_status":  # before: the image fell out of every split
        edit(root / "list_eval_partition.txt", "  gallery\n", "  galery\n")
        return "inshop", "evaluation_status 'galery'"
    if name == "inshop_train_item_in_the_gallery":  # before: the test items leaked into training
        edit(root / "list_eval_partition.txt", "id_00000002  train", "id_00000100  train")
        return "inshop", "puts 1 item id(s) (e.g. id_00000100) in train and in query/gallery"
    if name == "inshop_without_count_and_header":  # before: the first two images were dropped
        listing = root / "list_eval_partition.txt"
        listing.write_text("".join(listing.read_text().splitlines(True)[2:]))
        return "inshop", "line 1 should be the number of images"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["cub_truncated_at_a_line", "cub_class_outside_1_200", "cub_not_text",
                                  "cars_not_a_mat_file", "cars_class_outside_1_196", "sop_without_header",
                                  "sop_test_class_in_train", "inshop_unknown_status", "inshop_train_item_in_the_gallery",
                                  "inshop_without_count_and_header"])
def test_damaged_or_foreign_annotation_files_are_one_sentence(tmp_path, capsys, name):
    data, expected = damage(tmp_path / "root", name)
    split = "data.split=gallery" if data == "inshop" else "data.split=test"
    assert expected in extract_error(capsys, f"data={data}", f"data.root={tmp_path / 'root'}", split)


def test_a_missing_image_is_skipped_and_recorded(tmp_path):
    fake_sop(tmp_path / "sop")
    (tmp_path / "sop" / "Stanford_Online_Products" / "kettle_final" / "444_0.JPG").unlink()
    test = extract("sop", tmp_path / "sop", "test", "test")
    assert len(test) == 2 and test.manifest["skipped"] == 1
    assert "kettle_final/444_0.JPG" in (Path("test") / "skipped.jsonl").read_text()


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop", "inshop"])
def test_each_benchmark_has_a_config_file(name):
    assert simsearch("config", f"data={name}") == 0
