"""The data stage: image collections (folders, datasets, the metric-learning benchmarks) as uint8 pixels
with labels and keys, one table of datasets (`DATASETS`, `register_dataset`), and the batches they feed."""

from simsearch.data.collections import (
    ArrayCollection,
    FolderCollection,
    ImageCollection,
    Resize,
    resize_pixels,
    to_pixels,
)
from simsearch.data.registry import DATASETS, LoadOptions, build_collection, register_dataset

__all__ = ["DATASETS", "ArrayCollection", "FolderCollection", "ImageCollection", "LoadOptions", "Resize",
           "build_collection", "register_dataset", "resize_pixels", "to_pixels"]
