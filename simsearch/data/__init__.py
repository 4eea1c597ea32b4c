"""The data stage: image collections (folders, datasets, the metric-learning benchmarks) as uint8 pixels
with labels and keys, one table of datasets (`DATASETS`, `register_dataset`), and the batches they feed.

The table imports no torch; the collections (torch datasets) are imported on first use of their names,
so reading the table for a store's thumbnails (`search`, `serve`) stays light."""

from importlib import import_module
from typing import Any

from simsearch.data.registry import DATASETS, LoadOptions, build_collection, register_dataset

_COLLECTIONS = ("ArrayCollection", "FolderCollection", "ImageCollection", "Resize", "prepared_pixels", "resize_pixels",
                "to_pixels")

__all__ = ["DATASETS", "LoadOptions", "build_collection", "register_dataset", *_COLLECTIONS]


def __getattr__(name: str) -> Any:
    if name in _COLLECTIONS:
        return getattr(import_module("simsearch.data.collections"), name)
    raise AttributeError(f"module 'simsearch.data' has no attribute '{name}'")
