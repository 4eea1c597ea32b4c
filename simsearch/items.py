"""The pixels of a store's items, read back for pictures and thumbnails: files under the recorded data
root, or the recorded dataset. Files, Fashion-MNIST and synthetic items are read without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from simsearch.drawing import placeholder_image
from simsearch.errors import SimsearchError
from simsearch.pixels import FASHION_MNIST_FILES, SyntheticImages, UnreadableImage, decode_image, open_inside, read_idx
from simsearch.store import Store


class ItemImages:
    """Pixels of the store's items: files under the recorded data root, or the recorded dataset.

    Files, Fashion-MNIST and synthetic items are read without torch; CIFAR-10 goes through torchvision.
    """

    def __init__(self, store: Store):
        self.store = store
        self.data = store.manifest["data"]
        self.root = Path(self.data["root"]).resolve() if self.data.get("root") else None
        self._dataset: Any = None  # anything with .image(index) -> PIL image

    @property
    def records_images(self) -> bool:
        """False for a store of bare vectors (made from Python, say): it has no pixels to show."""
        return self.data.get("name") not in (None, "vectors")

    def path_of(self, row: int) -> Path | None:
        """The file behind a row, guaranteed inside the data root; None for dataset items."""
        relative = self.store.items[row].get("path")
        if relative is None or self.root is None:
            return None
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise SimsearchError(f"item path {relative!r} leaves the data root")
        return path

    def image(self, row: int) -> Image.Image:
        path = self.path_of(row)
        if path is not None:
            if not path.is_file():
                raise UnreadableImage(f"{self.store.items[row]['path']} was moved or deleted since extraction")
            with open_inside(path, self.root) as handle:  # checked again once opened: a link swapped meanwhile
                return decode_image(handle)
        if self._dataset is None:
            self._dataset = self._open_dataset()
        item = self.store.items[row]
        if hasattr(self._dataset, "image_of_item"):  # read back by the item's key (data=hf, data=webdataset)
            return self._dataset.image_of_item(item)
        return self._dataset.image(int(item["index"]))

    def _open_dataset(self) -> Any:
        data, seed = self.data, int(self.store.manifest.get("model", {}).get("seed", 0))
        if data.get("name") == "synthetic":
            return SyntheticImages(int(data["num_items"]), int(data["num_classes"]), int(data["native_size_px"]), seed)
        if data.get("name") == "fashion_mnist" and self.root is not None:
            return ArrayImages(read_idx(self.root / FASHION_MNIST_FILES[data["split"]][0]))
        if data.get("name") == "webdataset":  # by (shard, key): no listing of every shard first
            from simsearch.data.shards import ShardImages, extensions

            return ShardImages(extensions(data)[0])
        if data.get("name") in (None, "vectors"):
            raise SimsearchError(f"the store {self.store.dir} records no images, only vectors")
        return dataset_images(data, self.store.manifest, seed)

    def image_or_placeholder(self, row: int) -> tuple[Image.Image, str | None]:
        """The item's image, or a grey tile saying why it cannot be shown (file moved, deleted, unreadable,
        outside the data root, dataset gone), with that reason: a result is never lost for its picture."""
        try:
            return self.image(row), None
        except (UnreadableImage, SimsearchError, OSError) as error:
            reason = str(error)
            return placeholder_image(reason), reason


class ArrayImages:
    """Images held in one uint8 array, (N, H, W) grey or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


def dataset_images(data: dict[str, Any], manifest: dict[str, Any], seed: int) -> Any:
    """A dataset that only its reader can open (CIFAR-10, the benchmarks): torch and the data stage are
    imported here, on first use, so that the pixels of files and idx datasets never pay for them."""
    from omegaconf import OmegaConf

    from simsearch.data import Resize, build_collection

    model = manifest.get("model", {})
    resize = Resize(int(model["image_size"]), str(model.get("interpolation") or "bilinear"))
    return build_collection(OmegaConf.create({**data, "limit": None}), resize, seed)


def output_path(store: Store, key: str, name: str) -> Path:
    """Where the output `key` (search.grid, duplicates.output, ...) is written: `name` in run.dir (or where an
    absolute or `..` path leads). Refused with a sentence inside the store's folder collection, as run.dir
    is (`simsearch extract`): the picture would become an item of the next extraction. A hidden folder
    there (a name starting with `.`) is never listed, so allowed."""
    path = store.dir / name
    data = store.manifest.get("data", {})
    if data.get("name") != "folder" or not data.get("root"):
        return path
    root, resolved = Path(data["root"]).resolve(), path.resolve()
    if resolved.is_relative_to(root) and not any(part.startswith(".") for part in resolved.relative_to(root).parts):
        raise SimsearchError(f"{key}={name} is inside data.root={data['root']}: it would become an item of the next "
                             "extraction; write it outside the collection (or in a hidden folder, .simsearch)")
    return path
