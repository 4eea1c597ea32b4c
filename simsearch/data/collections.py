"""Image collections as datasets of uint8 pixels, and the one resize rule every image goes through.

Every dataset yields `{"pixels", "index", "valid", "reason"}`: uint8 (3, H, W) pixels, the item's
position in the collection, and whether it could be read. Resizing to the model's input size and
normalisation happen batched on the model's device (`simsearch.model.Preprocess`); only folders of
images of mixed sizes are resized in the loader, with the same `prepared_pixels`, so that they stack.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from simsearch.errors import SimsearchError
from simsearch.pixels import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    IMAGE_SUFFIXES,
    SyntheticImages,
    UnreadableImage,
    decode_image,
    open_inside,
    prepare_image,
    read_idx,
)

log = logging.getLogger(__name__)

JPEG_SUFFIXES = {".jpg", ".jpeg"}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Resize:
    """The model's input size and interpolation (`model.image_size`, `model.interpolation`)."""

    size_px: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise SimsearchError(f"model.interpolation must be {' or '.join(INTERPOLATIONS)}, not '{self.interpolation}'")


def resize_pixels(pixels: torch.Tensor, resize: Resize) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) to uint8 at size x size: antialiased, with the model's interpolation,
    rounded back to 8 bits.

    The one resize of simsearch: a folder's file in the loader, a dataset item and a query image on the
    model's device all pass through it, so the same image gives the same vector however it arrives.
    The whole image is resized (no centre crop: retrieval must see all of an item).
    """
    size = (resize.size_px, resize.size_px)
    batch = pixels[None] if pixels.ndim == 3 else pixels
    if tuple(batch.shape[-2:]) != size:
        resized = F.interpolate(batch.float(), size=size, mode=resize.interpolation, antialias=True, align_corners=False)
        batch = resized.round_().clamp_(0, 255).to(torch.uint8)
    return batch[0] if pixels.ndim == 3 else batch


def prepared_pixels(image: Image.Image | torch.Tensor, resize: Resize) -> torch.Tensor:
    """The one preparation of every image simsearch embeds, stored or queried, as uint8 (3, S, S) (or a
    batch): a PIL image (a decoded file, a dataset's image, a query) through `prepare_image` (EXIF rotation,
    `to_rgb`: transparency over white, 16-bit scaled); a uint8 tensor, already upright RGB (JPEGs decoded on
    the device with apply_exif_orientation and ImageReadMode.RGB, dataset arrays), as it is; then the one
    resize rule, `resize_pixels`, with the model's size and interpolation."""
    return resize_pixels(to_pixels(image) if isinstance(image, Image.Image) else image, resize)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image, prepared (`prepare_image`: upright, `to_rgb`), as a uint8 (3, H, W) tensor at its own size."""
    return torch.from_numpy(np.asarray(prepare_image(image), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- datasets


class ImageCollection(Dataset):
    """A collection of images with optional labels; subclasses say how to get pixels and metadata."""

    classes: list[str] = []
    labels: np.ndarray  # (N,) int64, -1 where unknown
    split: str = "test"  # part of a dataset item's key
    unlisted: list[dict[str, Any]] = []  # inputs found but not listed (folders: bad links), with the reason

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """The item as an RGB PIL image at its own resolution (for grids and thumbnails)."""
        raise NotImplementedError

    def item_record(self, index: int) -> dict[str, Any]:
        """What `items.jsonl` says of the item: `id`, `path` or `index`, and `key`, the item's identity
        within its source (a dataset's split and index): a stored vector is reused only by key."""
        return {"id": str(index), "index": index, "key": f"{self.split}/{index}"}

    def pixels(self, index: int) -> torch.Tensor:
        return to_pixels(self.image(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            pixels, valid, reason = self.pixels(index), True, ""
        except UnreadableImage as error:
            pixels, valid, reason = self.placeholder(), False, str(error)
        return {"pixels": pixels, "index": index, "valid": valid, "reason": reason}

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(3, 1, 1, dtype=torch.uint8)


class ArrayCollection(ImageCollection):
    """Images held in one uint8 array (N, H, W) or (N, H, W, 3): CIFAR-10, Fashion-MNIST, synthetic."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes

    def pixels(self, index: int) -> torch.Tensor:
        array = torch.from_numpy(np.array(self.images[index]))  # a writable copy of one item
        return array.expand(3, -1, -1).contiguous() if array.ndim == 2 else array.permute(2, 0, 1).contiguous()

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


class FolderCollection(ImageCollection):
    """Every image file under a root, found recursively, in sorted path order.

    Hidden files and folders (a name starting with `.`: `.thumbnails/`, `.DS_Store`) are ignored.
    Symbolic links are followed while their target stays inside the root; a link that leaves the
    root, a dangling link and a link loop are not read but recorded in `self.unlisted` with the
    reason (they end up in skipped.jsonl), as is every file of a format not read. Each file's size,
    modification time and change time are taken when the folder is listed: with its relative path they are
    the item's key (see `item_record`).

    Files are resized to the model's input size in the loader, the one CPU step that cannot wait
    for the device: images of different sizes must share a size to be stacked into a batch. With
    `decode_on_device`, JPEG files travel as their bytes and are decoded and resized on the model's
    device (nvJPEG on a GPU), so a GPU is not starved by CPU decoding.
    """

    def __init__(self, root: Path, resize: Resize, with_labels: bool, decode_on_device: bool = False):
        self.root = root
        self.resize = resize
        self.decode_on_device = decode_on_device
        listed, self.unlisted = list_image_files(root)
        self.paths = [path for path, _ in listed]
        self.stats = [stat for _, stat in listed]  # (size in bytes, mtime in ns, ctime in ns) when listed
        relative = [p.relative_to(root) for p in self.paths]
        folders = [r.parts[0] if len(r.parts) > 1 else None for r in relative]
        self.classes = sorted({f for f in folders if f is not None}) if with_labels else []
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.array([class_index.get(f, -1) for f in folders], dtype=np.int64)

    def item_record(self, index: int) -> dict[str, Any]:
        """The key is path, size, mtime and ctime: a file changed in place or moved is a new item, even
        rewritten at the same size with its mtime put back (`touch -r`): no one can set a ctime back."""
        path = self.paths[index].relative_to(self.root).as_posix()
        size, mtime_ns, ctime_ns = self.stats[index]
        return {"id": path, "path": path, "key": f"{path}:{size}:{mtime_ns}:{ctime_ns}"}

    @cached_property
    def real_root(self) -> Path:
        return self.root.resolve()

    def image(self, index: int) -> Image.Image:
        """The file opened once and checked after opening (`open_inside`), then decoded."""
        with open_inside(self.paths[index], self.real_root) as handle:
            return decode_image(handle)

    def pixels(self, index: int) -> torch.Tensor:
        return prepared_pixels(self.image(index), self.resize)

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(3, self.resize.size_px, self.resize.size_px, dtype=torch.uint8)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        if not (self.decode_on_device and path.suffix.lower() in JPEG_SUFFIXES):
            return super().__getitem__(index)
        try:
            with open_inside(path, self.real_root) as handle:
                encoded = read_jpeg_bytes(handle)
        except UnreadableImage as error:
            return {"pixels": self.placeholder(), "index": index, "valid": False, "reason": str(error)}
        return {"pixels": self.placeholder(), "index": index, "valid": True, "reason": "", "encoded": encoded}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_image_files(root: Path) -> tuple[list[tuple[Path, tuple[int, int, int]]], list[dict[str, Any]]]:
    """Image files under `root` in sorted relative-path order, each with (size, mtime_ns, ctime_ns), and
    every other entry that is not read, with the reason: links not followed (one rule: followed while
    the target is inside `root`), files of other formats (.avif, .heic, .svg, .txt...), pipes and
    devices named like images, folders named like images that hold none. Hidden entries are ignored."""
    real_root = root.resolve()
    files: list[tuple[Path, tuple[int, int, int]]] = []
    unlisted: list[dict[str, Any]] = []
    visited: set[Path] = {real_root}

    def unlist(path: Path, reason: str) -> None:
        relative = path.relative_to(root).as_posix()
        record = {"id": relative, "path": relative, "reason": reason}
        if not _is_utf8(relative):  # the name's bytes as \xNN (JSON holds text only), and exactly, in hex
            shown = os.fsencode(relative).decode("utf-8", "backslashreplace")
            record = {"id": shown, "path": shown, "path_hex": os.fsencode(relative).hex(), "reason": reason}
        unlisted.append(record)

    def target_of(path: Path) -> Path | None:
        """The resolved target of a link inside the root, or None after recording why not."""
        try:
            target = path.resolve(strict=True)
        except RuntimeError:
            unlist(path, "symlink loop")
            return None
        except OSError as error:
            if isinstance(error, FileNotFoundError):
                unlist(path, "dangling symlink: its target does not exist")
            else:
                unlist(path, "symlink loop" if error.errno == 40 else f"unreadable symlink: {error}")
            return None
        if not target.is_relative_to(real_root):
            unlist(path, f"symlink leaves data.root (to {target}): not followed")
            return None
        return target

    def walk(folder: Path) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            unlist(folder, f"unreadable folder: {error.strerror or error}")
            return
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            path = folder / entry.name
            if not _is_utf8(entry.name):
                unlist(path, "the name is not valid UTF-8 (items.jsonl holds names as UTF-8 text): not read; "
                             "rename it, e.g. with convmv")
                continue
            target = target_of(path) if entry.is_symlink() else path
            if target is None:
                continue
            suffix = path.suffix.lower()
            if target.is_dir():
                real = target.resolve()
                if real in visited or real_root.is_relative_to(real):
                    unlist(path, "symlink loop: a folder already listed")
                    continue
                visited.add(real)
                before = len(files)
                walk(path)
                if suffix in IMAGE_SUFFIXES and len(files) == before:
                    unlist(path, "a folder named like an image file, holding no image: not read")
            elif suffix in IMAGE_SUFFIXES and target.is_file():
                stat = target.stat()
                files.append((path, (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)))
            elif suffix in IMAGE_SUFFIXES:
                unlist(path, "not a regular file (a pipe, socket or device named like an image): not read")
            else:
                unlist(path, f"not read: {f'the suffix {suffix}' if suffix else 'a file without a suffix'} is not "
                             f"an image format simsearch reads ({' '.join(sorted(IMAGE_SUFFIXES))})")

    walk(root)
    files.sort(key=lambda item: item[0].relative_to(root).as_posix())
    return files, unlisted


def _is_utf8(name: str) -> bool:
    """False for a file name whose bytes are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jpeg_bytes(handle: BinaryIO) -> torch.Tensor:
    """A JPEG file's bytes (from its open file) for decoding on the device, after PIL has checked its header
    (size limits)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(handle, formats=["JPEG"])  # the header only; the handle stays open for the bytes
            if image.format != "JPEG":
                raise UnreadableImage(f"not a JPEG file ({image.format})")
        handle.seek(0)
        return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"too many pixels (decompression bomb): {error}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image PIL can identify") from None
    except OSError as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


def load_fashion_mnist(root: Path, split: str) -> ArrayCollection:
    image_file, label_file = FASHION_MNIST_FILES[split]
    for name in (image_file, label_file):
        if not (root / name).is_file():
            raise SimsearchError(
                f"Fashion-MNIST file {root / name} is missing: install Debian's dataset-fashion-mnist "
                f"(files in /usr/share/datasets/fashion-mnist) or put the idx .gz files in data.root={root}"
            )
    return ArrayCollection(read_idx(root / image_file), read_idx(root / label_file), FASHION_MNIST_CLASSES)


def load_cifar10(root: Path, split: str, download: bool) -> ArrayCollection:
    """CIFAR-10 through torchvision's own reader of its pickled batches (never unpickled here)."""
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        # torchvision checks the md5 of every batch on every start; the archive's md5 is still checked
        # on download. Here the files must be present (a checksum of None means "exists").
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

        def _check_integrity(self) -> bool:  # only the split being read needs to be there
            files = self.train_list if self.train else self.test_list
            return all((Path(self.root) / self.base_folder / name).is_file() for name, _ in files)

    missing = (
        f"CIFAR-10 ({split} split) is not in {root}: put cifar-10-python.tar.gz from {CIFAR10_URL} "
        f"there and extract it (giving {root / 'cifar-10-batches-py'}), or run online with data.download=true"
    )
    try:
        dataset = LocalCIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError:
        raise SimsearchError(missing) from None
    except OSError as error:  # URLError and socket errors: offline
        raise SimsearchError(f"{missing} (download failed: {error})") from None
    return ArrayCollection(dataset.data, np.asarray(dataset.targets), list(dataset.classes))


class BenchmarkCollection(FolderCollection):
    """Image files named by a benchmark's annotation files (not found by walking folders), labelled by class name."""

    def __init__(self, root: Path, relative_paths: list[str], item_classes: list[str], resize: Resize,
                 decode_on_device: bool = False):
        self.root, self.resize, self.decode_on_device = root, resize, decode_on_device
        self.paths = [root / path for path in relative_paths]
        self.stats = [file_stat(path) for path in self.paths]  # with the path, the item's key (see FolderCollection)
        self.unlisted: list[dict] = []  # the annotation files name every item: none is left unlisted
        self.classes = list(dict.fromkeys(item_classes))  # in the order of the annotation file
        number = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.array([number[name] for name in item_classes], dtype=np.int64)


def file_stat(path: Path) -> tuple[int, int, int]:
    """(size, mtime_ns, ctime_ns) of a listed image; (-1, 0, 0) for a missing one, which the loader then records
    as skipped."""
    try:
        stat = path.stat()
    except OSError:
        return -1, 0, 0
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class SyntheticCollection(SyntheticImages, ImageCollection):
    """Clustered images made on demand (`simsearch.images.SyntheticImages`) as a dataset."""

    def pixels(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.array(index)).permute(2, 0, 1).contiguous()


class Subset(ImageCollection):
    """The first `limit` items of a collection, keeping its metadata."""

    def __init__(self, base: ImageCollection, limit: int):
        self.base = base
        self.classes, self.split, self.unlisted = base.classes, base.split, base.unlisted
        self.labels = base.labels[:limit]

    def __getattr__(self, name: str) -> Any:  # root, paths, size_px... of the base
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def image(self, index: int) -> Image.Image:
        return self.base.image(index)

    def item_record(self, index: int) -> dict[str, Any]:
        return self.base.item_record(index)

    def pixels(self, index: int) -> torch.Tensor:
        return self.base.pixels(index)

    def placeholder(self) -> torch.Tensor:
        return self.base.placeholder()


