"""Image collections as datasets of uint8 pixels, and the LightningDataModule that batches them.

Every dataset yields `{"pixels", "index", "valid", "reason"}`: uint8 (3, H, W) pixels, the item's
position in the collection, and whether it could be read. Resizing to the model's input size and
normalisation happen batched on the model's device (`simsearch.model.Preprocess`); only folders of
images of mixed sizes are resized once in the loader so that they can be stacked into a batch.
"""

from __future__ import annotations

import gzip
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)

JPEG_SUFFIXES = {".jpg", ".jpeg"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class UnreadableImage(Exception):
    """An input that cannot be decoded into pixels; the run records it and goes on."""


# ---------------------------------------------------------------- decoding


def _grey_to_uint8(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8-bit, keeping the full range."""
    array = np.asarray(image)
    if image.mode.startswith("I;16") or array.dtype == np.uint16:
        array = array.astype(np.uint32) >> 8
    elif image.mode == "I":
        array = np.clip(array, 0, 65535).astype(np.uint32) >> 8 if array.max() > 255 else array
    else:  # "F": scale its own range to 0..255
        low, high = float(array.min()), float(array.max())
        array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (grey, 16-bit, RGBA, palette, CMYK, ...) as 8-bit RGB; transparency over white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _grey_to_uint8(image)
    if image.mode == "P" or image.mode == "LA" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(source: Any) -> Image.Image:
    """Open a path or file object as RGB, honouring EXIF rotation; raise UnreadableImage on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()  # decodes fully: truncated files fail here, not later
                return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"too many pixels (decompression bomb): {error}") from None
    except Image.DecompressionBombWarning as error:
        raise UnreadableImage(f"too many pixels (over {Image.MAX_IMAGE_PIXELS}): {error}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image PIL can identify") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


def pil_to_uint8(image: Image.Image, size_px: int | None = None) -> torch.Tensor:
    """RGB PIL image to a uint8 (3, H, W) tensor, optionally resized (antialiased) to size x size."""
    if size_px is not None and image.size != (size_px, size_px):
        image = image.resize((size_px, size_px), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- datasets


class ImageCollection(Dataset):
    """A collection of images with optional labels; subclasses say how to get pixels and metadata."""

    classes: list[str] = []
    labels: np.ndarray  # (N,) int64, -1 where unknown

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """The item as an RGB PIL image at its own resolution (for grids and thumbnails)."""
        raise NotImplementedError

    def item_record(self, index: int) -> dict[str, Any]:
        """What `items.jsonl` says of the item: at least `id`, and `path` or `index`."""
        return {"id": str(index), "index": index}

    def pixels(self, index: int) -> torch.Tensor:
        return pil_to_uint8(self.image(index))

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

    Files are resized to the model's input size in the loader, the one CPU step that cannot wait
    for the device: images of different sizes must share a size to be stacked into a batch. With
    `decode_on_device`, JPEG files travel as their bytes and are decoded and resized on the model's
    device (nvJPEG on a GPU), so a GPU is not starved by CPU decoding.
    """

    def __init__(self, root: Path, size_px: int, with_labels: bool, decode_on_device: bool = False):
        self.root = root
        self.size_px = size_px
        self.decode_on_device = decode_on_device
        self.paths = sorted(
            (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        relative = [p.relative_to(root) for p in self.paths]
        folders = [r.parts[0] if len(r.parts) > 1 else None for r in relative]
        self.classes = sorted({f for f in folders if f is not None}) if with_labels else []
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.array([class_index.get(f, -1) for f in folders], dtype=np.int64)

    def item_record(self, index: int) -> dict[str, Any]:
        path = self.paths[index].relative_to(self.root).as_posix()
        return {"id": path, "path": path}

    def image(self, index: int) -> Image.Image:
        return decode_image(self.paths[index])

    def pixels(self, index: int) -> torch.Tensor:
        return pil_to_uint8(self.image(index), self.size_px)

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(3, self.size_px, self.size_px, dtype=torch.uint8)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        if not (self.decode_on_device and path.suffix.lower() in JPEG_SUFFIXES):
            return super().__getitem__(index)
        try:
            encoded = read_jpeg_bytes(path)
        except UnreadableImage as error:
            return {"pixels": self.placeholder(), "index": index, "valid": False, "reason": str(error)}
        return {"pixels": self.placeholder(), "index": index, "valid": True, "reason": "", "encoded": encoded}


def read_jpeg_bytes(path: Path) -> torch.Tensor:
    """A JPEG file's bytes for decoding on the device, after PIL has checked its header (size limits)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                if image.format != "JPEG":
                    raise UnreadableImage(f"not a JPEG file ({image.format})")
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"too many pixels (decompression bomb): {error}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image PIL can identify") from None
    except OSError as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


def decode_jpegs_on(device: torch.device, batch: dict[str, Any], size_px: int) -> None:
    """Decode the batch's encoded JPEGs on `device` and resize them into `batch["pixels"]` in place;
    a file the decoder rejects is marked invalid, with the reason, and the rest of the batch goes on."""
    from torchvision.io import ImageReadMode, decode_jpeg

    positions = [i for i, data in enumerate(batch.get("encoded") or []) if data is not None]
    if not positions:
        return
    for position in positions:  # one at a time: a corrupt file must not take its batch down with it
        try:
            image = decode_jpeg(batch["encoded"][position], mode=ImageReadMode.RGB, device=device,
                                apply_exif_orientation=True)
        except RuntimeError as error:
            batch["valid"][position] = False
            batch["reason"][position] = f"JPEG decoding failed: {str(error).splitlines()[0]}"
            continue
        resized = torch.nn.functional.interpolate(image[None].float(), size=(size_px, size_px), mode="bilinear",
                                                  antialias=True, align_corners=False)
        batch["pixels"][position] = resized[0].round().clamp(0, 255).to(torch.uint8).to(batch["pixels"].device)


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format, gzipped or not) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SimsearchError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise SimsearchError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


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


class SyntheticCollection(ImageCollection):
    """Clustered images made on demand: each class a random pattern, each item that pattern plus its own
    seeded noise. Nothing is held in memory, so a million items cost no more RAM than ten."""

    def __init__(self, num_items: int, num_classes: int, size_px: int, seed: int):
        self.seed, self.size_px = seed, size_px
        rng = np.random.default_rng(seed)
        self.patterns = rng.integers(0, 256, size=(num_classes, size_px, size_px, 3)).astype(np.float32)
        self.labels = np.arange(num_items, dtype=np.int64) % num_classes
        self.classes = [f"class_{c}" for c in range(num_classes)]

    def array(self, index: int) -> np.ndarray:
        noise = np.random.default_rng((self.seed, index)).normal(0, 25, size=self.patterns.shape[1:])
        return np.clip(self.patterns[self.labels[index]] + noise, 0, 255).astype(np.uint8)

    def pixels(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.array(index)).permute(2, 0, 1).contiguous()

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.array(index))


class Subset(ImageCollection):
    """The first `limit` items of a collection, keeping its metadata."""

    def __init__(self, base: ImageCollection, limit: int):
        self.base = base
        self.classes = base.classes
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


def build_collection(data: DictConfig, image_size_px: int, seed: int = 0,
                     decode_on_device_by_default: bool = False) -> ImageCollection:
    """The collection a data config names, with `data.limit` applied."""
    if data.split not in ("train", "test"):
        raise SimsearchError(f"data.split must be train or test, not '{data.split}'")
    root = Path(data.root).expanduser() if data.root else None
    if data.name == "synthetic":
        collection: ImageCollection = SyntheticCollection(data.num_items, data.num_classes, data.native_size_px, seed)
    elif root is None:
        raise SimsearchError(f"data.root must be given for data={data.name}")
    elif data.name == "cifar10":
        collection = load_cifar10(root, data.split, data.download)
    elif not root.is_dir():
        raise SimsearchError(f"data.root={root} does not exist or is not a folder")
    elif data.name == "fashion_mnist":
        collection = load_fashion_mnist(root, data.split)
    elif data.name == "folder":
        if data.labels not in ("folder", "none"):
            raise SimsearchError(f"data.labels must be folder or none, not '{data.labels}'")
        if data.decode not in ("auto", "device", "loader"):
            raise SimsearchError(f"data.decode must be auto, device or loader, not '{data.decode}'")
        on_device = data.decode == "device" or (data.decode == "auto" and decode_on_device_by_default)
        collection = FolderCollection(root, image_size_px, with_labels=data.labels == "folder", decode_on_device=on_device)
        if len(collection) == 0:
            raise SimsearchError(
                f"no images under {root} (looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
    else:
        raise SimsearchError(f"unknown data.name '{data.name}' (cifar10, fashion_mnist, folder, synthetic)")
    if data.limit is not None:
        if data.limit < 1:
            raise SimsearchError(f"data.limit must be at least 1, not {data.limit}")
        if data.limit < len(collection):
            collection = Subset(collection, data.limit)
    return collection


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples; a placeholder of an unreadable image takes the batch's pixel size."""
    valid = [s for s in samples if s["valid"]]
    shape = valid[0]["pixels"].shape if valid else samples[0]["pixels"].shape
    pixels = torch.stack(
        [s["pixels"] if s["valid"] else torch.zeros(shape, dtype=torch.uint8) for s in samples]
    )
    batch = {
        "pixels": pixels,
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
        "reason": [s["reason"] for s in samples],
    }
    if any("encoded" in s for s in samples):  # JPEG bytes to decode on the model's device
        batch["encoded"] = [s.get("encoded") for s in samples]
    return batch


class Selection(Dataset):
    """Some items of a collection, in order, each keeping its own index (what a resumed run still needs)."""

    def __init__(self, collection: ImageCollection, indices: np.ndarray):
        self.collection, self.indices = collection, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.collection[int(self.indices[position])]


class ImageDataModule:
    """Serves one collection to `Trainer.predict`, in order; the sampler Lightning adds under DDP splits it.

    A plain class (not a LightningDataModule): importing the data stage must not import Lightning."""

    def __init__(self, data: DictConfig, image_size_px: int, seed: int = 0, pin_memory: bool = False,
                 decode_on_device_by_default: bool = False):
        self.decode_on_device_by_default = decode_on_device_by_default
        self.data = data
        self.image_size_px = image_size_px
        self.seed = seed
        self.pin_memory = pin_memory
        self.collection: ImageCollection | None = None
        self.indices: np.ndarray | None = None  # None: every item

    def setup(self, stage: str | None = None) -> None:
        if self.collection is None:
            self.collection = build_collection(self.data, self.image_size_px, self.seed, self.decode_on_device_by_default)

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        workers = self.data.num_workers
        dataset = self.collection if self.indices is None else Selection(self.collection, self.indices)
        return DataLoader(
            dataset,
            batch_size=self.data.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )


def augment(pixels: torch.Tensor, strong: bool) -> torch.Tensor:
    """Per-image random resized crop and flip (and colour jitter when `strong`), uint8 in and out."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(pixels.shape[-2:], scale=(0.35 if strong else 0.6, 1.0), antialias=True),
             v2.RandomHorizontalFlip()]
    if strong:
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    transform = v2.Compose(steps)
    return torch.stack([transform(image) for image in pixels])
