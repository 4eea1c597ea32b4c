"""The datasets simsearch reads: one table. `data.name` is looked up here, and the CLI's usage, the
config check and the README's list all come from it. A new dataset is one `@register_dataset` entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from simsearch.data.benchmarks import SPLITS as BENCHMARK_SPLITS
from simsearch.data.benchmarks import read_benchmark
from simsearch.data.collections import (
    IMAGE_SUFFIXES,
    FolderCollection,
    ImageCollection,
    Resize,
    Subset,
    SyntheticCollection,
    load_cifar10,
    load_fashion_mnist,
)
from simsearch.data.huggingface import load_hf
from simsearch.data.shards import load_webdataset
from simsearch.errors import SimsearchError


@dataclass(frozen=True)
class LoadOptions:
    """What a dataset reader may need besides `cfg.data`: the model's input size and resize rule (folders
    resize in the loader), the run's seed, and whether JPEGs are decoded on the model's device."""

    resize: Resize
    seed: int = 0
    decode_on_device: bool = False


@dataclass(frozen=True)
class DatasetKind:
    load: Callable[[DictConfig, LoadOptions], ImageCollection]
    help: str
    splits: tuple[str, ...] = ("train", "test")  # () : any split the source has (data=hf)
    needs_root: bool = True


DATASETS: dict[str, DatasetKind] = {}


def register_dataset(name: str, help: str, splits: tuple[str, ...] = ("train", "test"),  # noqa: A002 - the CLI's word
                     needs_root: bool = True) -> Callable:
    """`@register_dataset("digits", help=...)` on `load(data, options) -> ImageCollection`: `data=digits` then works."""

    def register(load: Callable[[DictConfig, LoadOptions], ImageCollection]) -> Callable:
        DATASETS[name] = DatasetKind(load, help, tuple(splits), needs_root)
        return load

    return register


def _root(data: DictConfig) -> Path:
    return Path(data.root).expanduser()


@register_dataset("cifar10", help="CIFAR-10 (torchvision's files; data.download=true fetches them)")
def _cifar10(data: DictConfig, options: LoadOptions) -> ImageCollection:
    return load_cifar10(_root(data), data.split, data.download)


@register_dataset("fashion_mnist", help="Fashion-MNIST idx files (Debian: apt-get install dataset-fashion-mnist)")
def _fashion_mnist(data: DictConfig, options: LoadOptions) -> ImageCollection:
    return load_fashion_mnist(_root(data), data.split)


@register_dataset("folder", help="every image file under data.root; the top-level folder is the label", splits=("train", "test"))
def _folder(data: DictConfig, options: LoadOptions) -> ImageCollection:
    root = _root(data)
    if not root.is_dir():
        raise SimsearchError(f"data.root={root} does not exist or is not a folder")
    if data.labels not in ("folder", "none"):
        raise SimsearchError(f"data.labels must be folder or none, not '{data.labels}'")
    collection = FolderCollection(root, options.resize, with_labels=data.labels == "folder",
                                  decode_on_device=options.decode_on_device)
    if len(collection) == 0:
        raise SimsearchError(f"no images under {root} (looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return collection


@register_dataset("synthetic", help="clustered random images made on the fly (tests, benchmarks)", needs_root=False)
def _synthetic(data: DictConfig, options: LoadOptions) -> ImageCollection:
    return SyntheticCollection(data.num_items, data.num_classes, data.native_size_px, options.seed)


@register_dataset("hf", help="a Hugging Face dataset: data.root= save_to_disk folder, Parquet/Arrow files or imagefolder; "
                               "data.hub=NAME online", splits=(), needs_root=False)
def _hf(data: DictConfig, options: LoadOptions) -> ImageCollection:
    return load_hf(data, options.resize)


@register_dataset("webdataset", help="WebDataset tar shards: data.urls=shards/train-{000000..000009}.tar (image jpg;png;webp, "
                                       "label cls)", splits=(), needs_root=False)
def _webdataset(data: DictConfig, options: LoadOptions) -> ImageCollection:
    return load_webdataset(data, options.resize)


def _benchmark(name: str) -> Callable[[DictConfig, LoadOptions], ImageCollection]:
    def load(data: DictConfig, options: LoadOptions) -> ImageCollection:
        return read_benchmark(name, _root(data), data.split, options.resize, data.download, options.decode_on_device)

    return load


for _name, _help in (("cub200", "CUB-200-2011, official zero-shot split"), ("cars196", "Cars196, official zero-shot split"),
                     ("sop", "Stanford Online Products"), ("inshop", "In-Shop Clothes (query against gallery)")):
    register_dataset(_name, help=_help, splits=BENCHMARK_SPLITS[_name])(_benchmark(_name))


def dataset_kind(name: str) -> DatasetKind:
    if name not in DATASETS:
        raise SimsearchError(f"unknown data.name '{name}' (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def build_collection(data: DictConfig, resize: Resize, seed: int = 0, decode_on_device_by_default: bool = False) -> ImageCollection:
    """The collection a data config names, with `data.limit` applied."""
    kind = dataset_kind(data.name)
    if kind.splits and data.split not in kind.splits:
        hint = " (In-Shop is evaluated as split=query against split=gallery)" if data.name == "inshop" else ""
        raise SimsearchError(f"data.split for data={data.name} must be {' or '.join(kind.splits)}, not '{data.split}'{hint}")
    if kind.needs_root and not data.root:
        raise SimsearchError(f"data.root must be given for data={data.name}")
    if data.decode not in ("auto", "device", "loader"):
        raise SimsearchError(f"data.decode must be auto, device or loader, not '{data.decode}'")
    on_device = data.decode == "device" or (data.decode == "auto" and decode_on_device_by_default)
    collection = kind.load(data, LoadOptions(resize, seed, on_device))
    collection.split = data.split
    if data.limit is not None:
        if data.limit < 1:
            raise SimsearchError(f"data.limit must be at least 1, not {data.limit}")
        if data.limit < len(collection):
            collection = Subset(collection, data.limit)
    return collection
