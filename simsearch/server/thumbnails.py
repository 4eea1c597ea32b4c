"""Item thumbnails for the page and the API: decoded reduced, made once each, kept (least recently used out)."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from simsearch.items import ItemImages
from simsearch.pixels import UnreadableImage, decode_image, open_image, open_inside, prepare_image

THUMBNAIL_CACHE_ITEMS = 512  # thumbnails kept in memory (a few tens of KB each)
THUMBNAIL_DECODES = 2  # large images decoded at once: 8 requests for a 9000 px image wait their turn


def thumbnail_bytes(image: Image.Image, size_px: int) -> bytes:
    image = image.copy()
    if max(image.size) < min(64, size_px):  # tiny dataset images (28, 32 px) are enlarged so they can be seen
        scale = 64 // max(image.size) + 1
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.thumbnail((size_px, size_px))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_thumbnail(path: Path, size_px: int, real_root: Path) -> Image.Image:
    """A file reduced to at most size_px per side while it is decoded (JPEG draft mode, Pillow's reducing
    gap), so a 9000 x 9000 photo never sits in memory in full as RGB copies; EXIF rotation honoured. Opened
    once and checked after opening (`open_inside`): a link swapped since the root check is not read."""
    with open_inside(path, real_root) as handle:
        try:
            with open_image(handle) as image:
                image.thumbnail((size_px, size_px), reducing_gap=2.0)
                return prepare_image(image)
        except (ValueError, OSError, Image.DecompressionBombError):  # modes thumbnail cannot reduce: the full decoder
            handle.seek(0)
            return decode_image(handle)


class ThumbnailCache:
    """PNG thumbnails of the store's items, made once each and kept (least recently used out).

    At most THUMBNAIL_DECODES images are decoded at a time, and concurrent requests for one item wait
    for its first decoding instead of decoding it again: 8 requests for a 9000 x 9000 photo decode it
    once. Failures (a moved file) are not cached: the file may come back.
    """

    def __init__(self, images: ItemImages, size_px: int):
        self.images, self.size_px = images, size_px
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.lock = threading.Lock()
        self.decoding = threading.BoundedSemaphore(THUMBNAIL_DECODES)
        self.row_locks: dict[int, threading.Lock] = {}

    def cached(self, row: int) -> bytes | None:
        with self.lock:
            if row in self.cache:
                self.cache.move_to_end(row)
                return self.cache[row]
            return None

    def png(self, row: int) -> bytes:
        if (found := self.cached(row)) is not None:
            return found
        with self.lock:
            row_lock = self.row_locks.setdefault(row, threading.Lock())
        with row_lock:
            if (found := self.cached(row)) is not None:  # made while this request waited
                return found
            with self.decoding:
                data = thumbnail_bytes(self.decode(row), self.size_px)
            with self.lock:
                self.cache[row] = data
                while len(self.cache) > THUMBNAIL_CACHE_ITEMS:
                    self.cache.popitem(last=False)
                self.row_locks.pop(row, None)
        return data

    def decode(self, row: int) -> Image.Image:
        path = self.images.path_of(row)
        if path is None:
            return self.images.image(row)
        if not path.is_file():
            raise UnreadableImage(f"{self.images.store.items[row]['path']} was moved or deleted since extraction")
        return file_thumbnail(path, self.size_px, self.images.root)


