"""The metric-learning benchmarks, read from their own annotation files with their official splits.

- `data=cub200`, split train / test: classes 1-100 / 101-200 of CUB-200-2011; under data.root,
  `CUB_200_2011/` with `images.txt`, `image_class_labels.txt`, `classes.txt` and `images/`.
- `data=cars196`, split train / test: classes 1-98 / 99-196 of Cars196; `cars_annos.mat` and `car_ims/`.
- `data=sop`, split train / test: Stanford Online Products' `Ebay_train.txt` / `Ebay_test.txt`, in
  `Stanford_Online_Products/` beside the `*_final/` image folders.
- `data=inshop`, split train / query / gallery: In-Shop Clothes' `list_eval_partition.txt` (or
  `Eval/list_eval_partition.txt`) and `img/` (or `Img/img/`).

The train and test classes never overlap (zero-shot retrieval, as in the papers); In-Shop is evaluated
as its query split against its gallery split (`simsearch eval run.dir=QUERY eval.gallery=GALLERY`),
whose items share class names (the product ids). Only CUB-200-2011 has a stable download address;
for the others, a missing file is named with where it belongs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from simsearch.errors import SimsearchError

if TYPE_CHECKING:  # the collection (torch) is imported when a benchmark is read, not for its table of splits
    from simsearch.data.collections import BenchmarkCollection, Resize

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CLASS_COUNT = {"cub200": 200, "cars196": 196}  # train: the first half of the classes, test: the second
SPLITS = {"cub200": ("train", "test"), "cars196": ("train", "test"), "sop": ("train", "test"),
          "inshop": ("train", "query", "gallery")}
SOP_HEADER = "image_id class_id super_class_id path"
WHERE = {
    "cub200": f"put CUB_200_2011.tgz ({CUB_URL}) in data.root and extract it there, giving CUB_200_2011/images.txt",
    "cars196": "put cars_annos.mat and the extracted car_ims.tgz (car_ims/000001.jpg ...) directly in data.root",
    "sop": "extract Stanford_Online_Products.zip in data.root, giving Stanford_Online_Products/Ebay_train.txt",
    "inshop": "put list_eval_partition.txt (from Eval/) and the extracted img.zip (img/WOMEN/...) in data.root",
}


def read_benchmark(name: str, root: Path, split: str, resize: Resize, download: bool = False,
                   decode_on_device: bool = False) -> BenchmarkCollection:
    """The `split` of benchmark `name` under `root` (see the module's table)."""
    if split not in SPLITS[name]:
        hint = " (In-Shop is evaluated as split=query against split=gallery)" if name == "inshop" else ""
        raise SimsearchError(f"data.split for data={name} must be {' or '.join(SPLITS[name])}, not '{split}'{hint}")
    if name == "cub200" and download:
        download_cub(root)
    base, paths, classes = READERS[name](root, split)
    if not paths:
        raise SimsearchError(f"{name} has no images in its {split} split under {root}")
    from_root = [(base / path).relative_to(root).as_posix() for path in paths]  # items.jsonl paths: under data.root
    from simsearch.data.collections import BenchmarkCollection

    return BenchmarkCollection(root, from_root, classes, resize, decode_on_device)


def missing(name: str, path: Path) -> SimsearchError:
    return SimsearchError(f"{path} is missing: {WHERE[name]}")


def first_existing(name: str, candidates: list[Path]) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise missing(name, candidates[0])


def table(path: Path, columns: int, header: str | None = None, counted: bool = False) -> list[list[str]]:
    """Whitespace-separated rows of an annotation file, each checked to have `columns` fields. `counted`:
    the file starts with its number of rows (In-Shop), which must match; `header`: then a line of these
    field names. A file that fails a check is another data set's, or damaged: one sentence says which line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SimsearchError(f"{path} is not a text file (not UTF-8): data.root holds another data set, "
                             "or the file is damaged") from None
    first = int(counted) + int(header is not None)  # lines before the rows
    if counted and not (lines and lines[0].strip().isdigit()):
        raise SimsearchError(f"{path} line 1 should be the number of images, not {(lines or [''])[0].strip()!r}")
    if header is not None and (len(lines) < first or lines[first - 1].split() != header.split()):
        found = lines[first - 1].strip() if len(lines) >= first else "the end of the file"
        raise SimsearchError(f"{path} line {first} should be the header {header!r}, not {found!r}")
    rows = []
    for number, line in enumerate(lines[first:], start=first + 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != columns:
            raise SimsearchError(f"{path} line {number} has {len(fields)} fields, expected {columns}: {line.strip()!r}")
        rows.append(fields)
    if counted and int(lines[0]) != len(rows):
        raise SimsearchError(f"{path} declares {lines[0].strip()} images but lists {len(rows)}: the file is incomplete")
    return rows


def inside(path: str, annotation: Path) -> str:
    """An image path from an annotation file, refused if it would leave data.root."""
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts:
        raise SimsearchError(f"{annotation} names an image outside data.root: {path!r}")
    return path


def as_int(text: str, path: Path) -> int:
    try:
        return int(text)
    except ValueError:
        raise SimsearchError(f"{path}: expected a number, found {text!r}") from None


def check_classes(name: str, classes: dict[int, int], path: Path) -> None:
    """Every class number of a benchmark with numbered classes lies in its official range (CUB 1-200,
    Cars 1-196): a class outside would silently fall out of both splits."""
    official = range(1, CLASS_COUNT[name] + 1)
    outside = {image: c for image, c in classes.items() if c not in official}
    if outside:
        image, c = next(iter(outside.items()))
        raise SimsearchError(f"{path} gives image {image} the class {c}, outside {name}'s classes 1-{CLASS_COUNT[name]} "
                             f"({len(outside)} such image(s)): data.root holds another data set or a modified copy")


def read_cub(root: Path, split: str) -> tuple[Path, list[str], list[str]]:
    """CUB-200-2011: classes 1-100 train, 101-200 test (its train_test_split.txt is for classification)."""
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    files = {name: base / name for name in ("images.txt", "image_class_labels.txt", "classes.txt")}
    for path in files.values():
        if not path.is_file():
            raise missing("cub200", root / "CUB_200_2011" / path.name)
    class_names = {as_int(i, files["classes.txt"]): name for i, name in table(files["classes.txt"], 2)}
    class_of = {as_int(image, files["image_class_labels.txt"]): as_int(c, files["image_class_labels.txt"])
                for image, c in table(files["image_class_labels.txt"], 2)}
    listed = [(as_int(image, files["images.txt"]), path) for image, path in table(files["images.txt"], 2)]
    if len({image for image, _ in listed}) != len(listed) or {image for image, _ in listed} != set(class_of):
        raise SimsearchError(f"{files['images.txt']} lists {len(listed)} images and {files['image_class_labels.txt']} "
                             f"gives classes to {len(class_of)} other or repeated ones: one of them is incomplete or "
                             "damaged (the official files list the same 11,788 image ids once each)")
    check_classes("cub200", class_of, files["image_class_labels.txt"])
    half = CLASS_COUNT["cub200"] // 2
    wanted = range(1, half + 1) if split == "train" else range(half + 1, 2 * half + 1)
    paths, classes = [], []
    for image, path in sorted(listed):
        if class_of[image] not in class_names:
            raise SimsearchError(f"image {image} of {files['images.txt']} has the class {class_of[image]}, "
                                 f"which {files['classes.txt']} does not name")
        if class_of[image] in wanted:
            paths.append(inside(f"images/{path}", files["images.txt"]))
            classes.append(class_names[class_of[image]])
    return base, paths, classes


def read_cars(root: Path, split: str) -> tuple[Path, list[str], list[str]]:
    """Cars196 from cars_annos.mat (fields relative_im_path, class, test): classes 1-98 train, 99-196 test."""
    import scipy.io

    path = root / "cars_annos.mat"
    if not path.is_file():
        raise missing("cars196", path)
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
        annotations = np.atleast_1d(mat["annotations"])
        names = [str(n) for n in np.atleast_1d(mat.get("class_names", []))]
        records = [(str(a.relative_im_path), int(getattr(a, "class"))) for a in annotations]
    except (ValueError, KeyError, AttributeError, TypeError, OSError, NotImplementedError,
            scipy.io.matlab.MatReadError) as error:
        raise SimsearchError(f"{path} is not the Cars196 cars_annos.mat (annotations with relative_im_path and class): "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    check_classes("cars196", {number: c for number, (_, c) in enumerate(records, start=1)}, path)
    half = CLASS_COUNT["cars196"] // 2
    wanted = range(1, half + 1) if split == "train" else range(half + 1, 2 * half + 1)
    kept = [(inside(image, path), c) for image, c in records if c in wanted]
    label = (lambda c: names[c - 1]) if len(set(names)) == len(names) >= 196 else str
    return root, [image for image, _ in kept], [label(c) for _, c in kept]


def read_sop(root: Path, split: str) -> tuple[Path, list[str], list[str]]:
    """Stanford Online Products: Ebay_train.txt / Ebay_test.txt (image_id class_id super_class_id path)."""
    base = root / "Stanford_Online_Products" if (root / "Stanford_Online_Products").is_dir() else root
    path = base / f"Ebay_{split}.txt"
    if not path.is_file():
        raise missing("sop", root / "Stanford_Online_Products" / path.name)
    rows = table(path, 4, header=SOP_HEADER)
    other = base / f"Ebay_{'test' if split == 'train' else 'train'}.txt"
    if other.is_file():  # the official split: no class is in both files
        shared = {as_int(c, path) for _, c, _, _ in rows} & {as_int(c, other) for _, c, _, _ in table(other, 4, header=SOP_HEADER)}
        if shared:
            raise SimsearchError(f"{path.name} and {other.name} in {base} share {len(shared)} class id(s) (e.g. {min(shared)}): "
                                 "the official train and test classes never overlap; these files are not the official split")
    return base, [inside(image, path) for _, _, _, image in rows], [class_id for _, class_id, _, _ in rows]


def read_inshop(root: Path, split: str) -> tuple[Path, list[str], list[str]]:
    """In-Shop Clothes: list_eval_partition.txt (a count, a header, then image_name item_id evaluation_status)."""
    path = first_existing("inshop", [root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"])
    base = root / "Img" if not (root / "img").is_dir() and (root / "Img" / "img").is_dir() else root
    rows = table(path, 3, header="image_name item_id evaluation_status", counted=True)
    unknown = {status for _, _, status in rows} - set(SPLITS["inshop"])
    if unknown:
        raise SimsearchError(f"{path} gives images the evaluation_status {sorted(unknown)[0]!r}: the official file "
                             "has only train, query and gallery")
    shared = {item for _, item, status in rows if status == "train"} & {item for _, item, status in rows if status != "train"}
    if shared:  # the official partition: "items of clothes images are NOT overlapped"
        raise SimsearchError(f"{path} puts {len(shared)} item id(s) (e.g. {min(shared)}) in train and in query/gallery: "
                             "the official partition never shares an item between them")
    kept = [(inside(image, path), item) for image, item, status in rows if status == split]
    return base, [image for image, _ in kept], [item for _, item in kept]


READERS = {"cub200": read_cub, "cars196": read_cars, "sop": read_sop, "inshop": read_inshop}


def download_cub(root: Path) -> None:
    """Fetch and extract CUB-200-2011 into root unless it is there (md5 checked)."""
    if (root / "CUB_200_2011" / "images.txt").is_file() or (root / "images.txt").is_file():
        return
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CUB_URL, str(root), filename="CUB_200_2011.tgz", md5=CUB_MD5)
    except (OSError, RuntimeError) as error:  # URLError and socket errors: offline; RuntimeError: bad checksum
        raise SimsearchError(f"CUB-200-2011 could not be downloaded ({error}): {WHERE['cub200']}") from None
