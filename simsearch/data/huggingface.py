"""Hugging Face `datasets` as a collection (`data=hf`): a folder written by `save_to_disk`, Parquet or Arrow
files, an `imagefolder` folder, or a dataset of the hub (`data.hub=NAME`, online).

Images are read as their encoded bytes and decoded by simsearch's own decoder, then resized in the loader
like a folder's files: the same image gives the same vector from a folder and from a dataset. An item's key
is its split, its key (`data.key_column`) or row index, and the sha256 of its encoded bytes; the dataset's
path or hub name is part of the run's fingerprint. So rows appended to a dataset are the only ones embedded
again, and a vector is never reused for a row whose image changed.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from simsearch.data.collections import ImageCollection, Resize, prepared_pixels
from simsearch.errors import SimsearchError
from simsearch.pixels import UnreadableImage, decode_image

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
DEFAULT_IMAGE_COLUMN, DEFAULT_LABEL_COLUMN = "image", "label"
HASH_BATCH = 1024  # rows read per step when the images' bytes are hashed


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise SimsearchError("data=hf needs the datasets library: pip install 'simsearch[formats]'") from None
    datasets.disable_progress_bars()  # simsearch draws its own
    return datasets


def open_dataset(data: DictConfig) -> Any:
    """The split `data.split` of the dataset that `data.root` or `data.hub` names."""
    datasets = import_datasets()
    if data.get("hub"):
        return _from_hub(datasets, str(data.hub), str(data.split))
    if not data.root:
        raise SimsearchError("data=hf needs data.root (a save_to_disk folder, Parquet or Arrow files, an imagefolder) "
                             "or data.hub=NAME (a dataset of the Hugging Face hub, online)")
    root = Path(data.root).expanduser()
    if not root.exists():
        raise SimsearchError(f"data.root={root} does not exist")
    if root.is_dir() and any((root / name).is_file() for name in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(root))
    elif root.is_file():
        builder = {".parquet": "parquet", ".arrow": "arrow"}.get(root.suffix.lower())
        if builder is None:
            raise SimsearchError(f"data.root={root} is a file, not a .parquet or .arrow file: give one, or a folder")
        loaded = datasets.load_dataset(builder, data_files={str(data.split): [str(root)]})
    else:
        builder = "parquet" if any(root.rglob("*.parquet")) else "arrow" if any(root.rglob("*.arrow")) else "imagefolder"
        loaded = datasets.load_dataset(builder, data_dir=str(root))
    return _split(loaded, str(data.split), str(root))


def _from_hub(datasets: Any, name: str, split: str) -> Any:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise SimsearchError(f"data.hub={name} needs the Hugging Face hub and this run is offline (HF_HUB_OFFLINE): online, "
                             f"run `python -c \"import datasets; datasets.load_dataset('{name}').save_to_disk('data/{name}')\"` "
                             f"and give data.root=data/{name} instead")
    try:
        return _split(datasets.load_dataset(name), split, name)
    except (ConnectionError, OSError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise SimsearchError(f"data.hub={name} could not be fetched ({reason}): online, save it with "
                             f"`datasets.load_dataset('{name}').save_to_disk('data/{name}')` and give data.root=data/{name}") from None


def _split(loaded: Any, split: str, where: str) -> Any:
    if not hasattr(loaded, "keys"):  # a single Dataset (save_to_disk of one split)
        return loaded
    if split not in loaded:
        raise SimsearchError(f"the dataset {where} has no split '{split}': give data.split={' or '.join(loaded.keys())}")
    return loaded[split]


def encoded_bytes(value: Any) -> bytes:
    """An image cell (decode=False) as its encoded bytes: {"bytes", "path"}, raw bytes, or a path."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        try:
            return Path(value).read_bytes()
        except OSError as error:
            raise UnreadableImage(f"{value}: {error.strerror or error}") from None
    raise UnreadableImage("no image in this row (an empty cell)")


class HFCollection(ImageCollection):
    """One split of a Hugging Face dataset: images from `image_column`, labels from `label_column` (class
    names from its ClassLabel feature; sorted values for a column of text), keys from `key_column` or the
    row index."""

    def __init__(self, dataset: Any, split: str, resize: Resize, image_column: str, label_column: str | None,
                 key_column: str | None):
        datasets = import_datasets()
        self.split, self.resize, self.image_column = split, resize, image_column
        if image_column not in dataset.column_names:
            raise SimsearchError(f"data.image_column={image_column} is not a column of the dataset "
                                 f"(columns: {', '.join(dataset.column_names)})")
        if key_column is not None and key_column not in dataset.column_names:
            raise SimsearchError(f"data.key_column={key_column} is not a column of the dataset "
                                 f"(columns: {', '.join(dataset.column_names)})")
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.classes, self.labels = self._labels(dataset, label_column, datasets)
        self.ids = [str(k) for k in dataset[key_column]] if key_column else [str(i) for i in range(len(dataset))]
        if key_column and len(set(self.ids)) != len(self.ids):
            duplicated = Counter(self.ids).most_common(1)[0][0]
            raise SimsearchError(f"data.key_column={key_column} holds '{duplicated}' more than once: give a column of unique keys")
        self._digests: list[str] | None = None  # computed on first use: a thumbnail needs only its own row's
        self.keyed = key_column is not None

    @staticmethod
    def _labels(dataset: Any, column: str | None, datasets: Any) -> tuple[list[str], np.ndarray]:
        if column is None:
            return [], np.full(len(dataset), -1, dtype=np.int64)
        values = dataset[column]
        feature = dataset.features[column]
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names), np.array([-1 if v is None else v for v in values], dtype=np.int64)
        names = sorted({str(v) for v in values if v is not None})
        index = {name: i for i, name in enumerate(names)}
        return names, np.array([-1 if v is None else index[str(v)] for v in values], dtype=np.int64)

    @staticmethod
    def _digest(value: Any) -> str:
        """The sha256 of a row's encoded image (an empty string where there is none): part of its key."""
        try:
            return hashlib.sha256(encoded_bytes(value)).hexdigest()[:32]
        except UnreadableImage:
            return ""

    @property
    def digests(self) -> list[str]:
        if self._digests is None:
            batches = self.dataset.select_columns([self.image_column]).iter(batch_size=HASH_BATCH)
            self._digests = [self._digest(value) for batch in batches for value in batch[self.image_column]]
        return self._digests

    def _key(self, index: int, digest: str) -> str:
        return f"{self.split}/{self.ids[index]}:{digest}"

    def item_record(self, index: int) -> dict[str, Any]:
        return {"id": self.ids[index], "index": index, "key": self._key(index, self.digests[index])}

    def image(self, index: int) -> Image.Image:
        return decode_image(io.BytesIO(encoded_bytes(self.dataset[index][self.image_column])))

    def image_of_item(self, item: dict[str, Any]) -> Image.Image:
        """The image of a stored item, read back by its id (a key column) or index and checked against its key:
        a dataset changed since the extraction shows no other row's picture."""
        if self.keyed:
            if not hasattr(self, "_row_of_id"):
                self._row_of_id = {identifier: row for row, identifier in enumerate(self.ids)}
            index = self._row_of_id.get(str(item.get("id")), len(self))
        else:
            index = int(item["index"])
        value = self.dataset[index][self.image_column] if index < len(self) else None
        if value is None or self._key(index, self._digest(value)) != item.get("key"):
            raise UnreadableImage(f"item {item.get('id')} changed or left the dataset since extraction")
        return decode_image(io.BytesIO(encoded_bytes(value)))

    def pixels(self, index: int) -> torch.Tensor:
        return prepared_pixels(self.image(index), self.resize)

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(3, self.resize.size_px, self.resize.size_px, dtype=torch.uint8)


def load_hf(data: DictConfig, resize: Resize) -> HFCollection:
    """`data=hf`: the collection of `data.root` or `data.hub`, with the columns the config names."""
    dataset = open_dataset(data)
    image_column = data.get("image_column") or DEFAULT_IMAGE_COLUMN
    label_column = data.get("label_column") or DEFAULT_LABEL_COLUMN
    if data.labels == "none" or (label_column not in dataset.column_names and not data.get("label_column")):
        label_column = None  # the default column, absent: no labels
    elif label_column not in dataset.column_names:
        raise SimsearchError(f"data.label_column={label_column} is not a column of the dataset "
                             f"(columns: {', '.join(dataset.column_names)})")
    return HFCollection(dataset, str(data.split), resize, image_column, label_column, data.get("key_column"))
