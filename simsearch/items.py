"""The pixels of a store's items, read back for pictures and thumbnails: files under the recorded data
root, or the recorded dataset, as its entry in the dataset table says. Files, Fashion-MNIST and synthetic
items are read without torch (the table imports none)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from simsearch.data.registry import DATASETS, refuse_inside_collection
from simsearch.drawing import placeholder_image
from simsearch.errors import SimsearchError
from simsearch.pixels import UnreadableImage, decode_image, open_inside
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
        """The reader its dataset's entry names (`DatasetKind.images`): without torch for synthetic,
        Fashion-MNIST and files; through the dataset's own loader otherwise (a registered dataset's too)."""
        if not self.records_images:
            raise SimsearchError(f"the store {self.store.dir} records no images, only vectors")
        name = self.data["name"]
        if name not in DATASETS:
            raise UnreadableImage(f"the store's dataset '{name}' is not registered here (known: {', '.join(DATASETS)}): "
                                 "import its plugin (SIMSEARCH_PLUGINS) to show its items")
        return DATASETS[name].images(self.store.manifest)

    def image_or_placeholder(self, row: int) -> tuple[Image.Image, str | None]:
        """The item's image, or a grey tile saying why it cannot be shown (file moved, deleted, unreadable,
        outside the data root, dataset gone), with that reason: a result is never lost for its picture."""
        try:
            return self.image(row), None
        except (UnreadableImage, SimsearchError, OSError) as error:
            reason = str(error)
            return placeholder_image(reason), reason


def output_path(store: Store, key: str, name: str) -> Path:
    """Where the output `key` (search.grid, duplicates.output, ...) is written: `name` in run.dir (or where an
    absolute or `..` path leads). Refused with a sentence inside the store's folder collection, as run.dir
    is (`simsearch extract`): the picture would become an item of the next extraction. A hidden folder
    there (a name starting with `.`) is never listed, so allowed."""
    path = store.dir / name
    refuse_inside_collection(store.manifest.get("data", {}), key, path, name)
    return path
