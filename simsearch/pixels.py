"""Pixels without torch: decoding image files, reading idx files, making synthetic images.

`simsearch search` and `simsearch duplicates` draw grids from these, so answering a search by item
never imports torch; `simsearch.data` builds its datasets on them.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from simsearch.errors import SimsearchError
from simsearch.files import open_regular

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


# The files simsearch reads, by suffix, and the Pillow decoder of each: Pillow is never asked to try any
# other (a PostScript file named .png would otherwise be handed to Ghostscript).
IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF",
                 ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM"}
IMAGE_SUFFIXES = set(IMAGE_FORMATS)
PIL_FORMATS = sorted(set(IMAGE_FORMATS.values()))
EXIF_ORIENTATION = 0x0112


def open_image(source: Any) -> Image.Image:
    """Image.open restricted to the formats simsearch reads (PIL_FORMATS)."""
    return Image.open(source, formats=PIL_FORMATS)


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


def prepare_image(image: Image.Image) -> Image.Image:
    """Every image simsearch embeds, stored or queried, before its resize (`simsearch.data.prepared_pixels`):
    turned upright by its EXIF orientation, then 8-bit RGB by `to_rgb`. An upright RGB image is returned as
    it is (no copy): preparing twice is preparing once."""
    if image.mode == "RGB" and "transparency" not in image.info and image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return to_rgb(ImageOps.exif_transpose(image))


def open_inside(path: Path, real_root: Path) -> BinaryIO:
    """`path` opened for reading, once, after checking what was opened: a regular file whose real path
    (the kernel's, /proc/self/fd) is inside `real_root`. A link retargeted outside the root between the
    listing and this read, or a pipe swapped in, is refused with the reason (UnreadableImage)."""
    try:  # non-blocking, checked after opening: a pipe swapped in for the file must not hang the run
        handle = open_regular(path)
    except OSError as error:
        raise UnreadableImage(f"{type(error).__name__}: {error.strerror or error}") from None
    except SimsearchError:
        raise UnreadableImage("not a regular file (a pipe, socket or device): not read") from None
    try:
        proc = Path(f"/proc/self/fd/{handle.fileno()}")
        real = Path(os.readlink(proc)) if proc.is_symlink() else path.resolve()
        if not real.is_relative_to(real_root):
            raise UnreadableImage("the file opened is outside data.root (a link changed after the folder was "
                                  "listed): not read")
        return handle
    except BaseException:
        handle.close()
        raise


def decode_image(source: Any) -> Image.Image:
    """Open a path or file object as RGB, honouring EXIF rotation; raise UnreadableImage on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(source) as image:
                image.load()  # decodes fully: truncated files fail here, not later
                return prepare_image(image)
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"too many pixels (decompression bomb): {error}") from None
    except Image.DecompressionBombWarning as error:
        raise UnreadableImage(f"too many pixels (over {Image.MAX_IMAGE_PIXELS}): {error}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"not an image in a format simsearch reads ({', '.join(PIL_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


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


class SyntheticImages:
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

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.array(index))


class ArrayImages:
    """Images held in one uint8 array, (N, H, W) grey or (N, H, W, 3): an idx file's items read back."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")
