"""The datasets simsearch reads: one table. `data.name` is looked up here, and the CLI's usage, the
config check and the README's list all come from it. A new dataset is one `@register_dataset` entry.

An entry carries everything that depends on the kind of dataset: how it is loaded, which splits it has,
whether it needs data.root, what decides its items (the run's fingerprint), whether its items are files
under data.root (run.dir and pictures stay outside), and how its items' pixels are read back for
thumbnails. No other module branches on a dataset's name. This module imports no torch (the loaders
import their collections when they run), so `search` and `serve` read the table for thumbnails cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from simsearch.data.benchmarks import SPLITS as BENCHMARK_SPLITS
from simsearch.data.benchmarks import read_benchmark
from simsearch.errors import SimsearchError
from simsearch.pixels import FASHION_MNIST_FILES, IMAGE_SUFFIXES, ArrayImages, SyntheticImages, read_idx
from simsearch.registry import Registry

if TYPE_CHECKING:
    from simsearch.data.collections import ImageCollection, Resize

# Data options that never change an item's pixels or which item a key names: left out of a registered
# dataset's default fingerprint source (every other data option is in it).
NOT_ITEM_OPTIONS = ("name", "root", "split", "limit", "download", "labels", "decode", "batch_size", "num_workers",
                    "metadata", "metadata_key", "label_column")


@dataclass(frozen=True)
class LoadOptions:
    """What a dataset reader may need besides `cfg.data`: the model's input size and resize rule (folders
    resize in the loader), the run's seed, and whether JPEGs are decoded on the model's device."""

    resize: Resize
    seed: int = 0
    decode_on_device: bool = False


def every_item_option(data: DictConfig, seed: int) -> dict[str, Any]:
    """A registered dataset's default fingerprint source: every data option that may change its items."""
    options = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    return {key: value for key, value in options.items() if key not in NOT_ITEM_OPTIONS}


def rebuilt_collection(manifest: dict[str, Any]) -> Any:
    """A store's items read back through the dataset's own loader (CIFAR-10, the benchmarks, a registered
    dataset): torch and the collections are imported here, on first use."""
    from simsearch.data.collections import Resize

    model = manifest.get("model", {})
    resize = Resize(int(model["image_size"]), str(model.get("interpolation") or "bilinear"))
    return build_collection(OmegaConf.create({**manifest["data"], "limit": None}), resize, int(model.get("seed") or 0))


@dataclass(frozen=True)
class DatasetKind:
    """One dataset kind. `source(data, seed)`: what, beyond its name, root and split, decides which item a key
    names (the fingerprint: a changed value re-embeds). `images(manifest)`: an object whose `.image(index)`
    (or `.image_of_item(item)`) reads a store's item back; items with a path are read from data.root first."""

    load: Callable[[DictConfig, LoadOptions], ImageCollection]
    help: str
    splits: tuple[str, ...] = ("train", "test")  # () : any split the source has (data=hf)
    needs_root: bool = True
    source: Callable[[DictConfig, int], dict[str, Any]] = every_item_option
    images: Callable[[dict[str, Any]], Any] = rebuilt_collection
    items_are_files: bool = False  # its items are files under data.root: run.dir and pictures are written outside it
    decode_matters: bool = False  # data.decode (PIL in the loader or the device's decoder) is part of the fingerprint
    query_gallery: tuple[str, str] | None = None  # the benchmark ranks this query split against this gallery split


DATASETS: Registry[DatasetKind] = Registry("dataset", "data.name")


def register_dataset(name: str, help: str, splits: tuple[str, ...] = ("train", "test"),  # noqa: A002 - the CLI's word
                     needs_root: bool = True, **decisions: Any) -> Callable:
    """`@register_dataset("digits", help=...)` on `load(data, options) -> ImageCollection`: `data=digits` then works.
    `decisions`: the other fields of `DatasetKind` (source, images, items_are_files, ...); the defaults fit a
    dataset read through its own loader."""

    def register(load: Callable[[DictConfig, LoadOptions], ImageCollection]) -> Callable:
        DATASETS.add(name, DatasetKind(load, help, tuple(splits), needs_root, **decisions))
        return load

    return register


def _root(data: DictConfig) -> Path:
    return Path(data.root).expanduser()


def hub_and_image_column(data: DictConfig, seed: int) -> dict[str, Any]:
    """data=hf: the hub dataset; hf and webdataset: which column is the image (unset: as before). A WebDataset
    item's key holds its shard's resolved path, so shards added to data.urls keep the vectors of the others."""
    return {key: data.get(key) for key in ("hub", "image_column") if data.get(key) is not None}


def _idx_images(manifest: dict[str, Any]) -> ArrayImages:
    data = manifest["data"]
    if not data.get("root"):
        raise SimsearchError("the store records no data.root for its Fashion-MNIST files")
    return ArrayImages(read_idx(Path(data["root"]) / FASHION_MNIST_FILES[data["split"]][0]))


@register_dataset("cifar10", help="CIFAR-10 (torchvision's files; data.download=true fetches them)",
                  source=hub_and_image_column)
def _cifar10(data: DictConfig, options: LoadOptions) -> ImageCollection:
    from simsearch.data.collections import load_cifar10

    return load_cifar10(_root(data), data.split, data.download)


@register_dataset("fashion_mnist", help="Fashion-MNIST idx files (Debian: apt-get install dataset-fashion-mnist)",
                  source=hub_and_image_column, images=_idx_images)
def _fashion_mnist(data: DictConfig, options: LoadOptions) -> ImageCollection:
    from simsearch.data.collections import load_fashion_mnist

    return load_fashion_mnist(_root(data), data.split)


@register_dataset("folder", help="every image file under data.root; the top-level folder is the label", splits=("train", "test"),
                  source=hub_and_image_column, items_are_files=True, decode_matters=True)
def _folder(data: DictConfig, options: LoadOptions) -> ImageCollection:
    from simsearch.data.collections import FolderCollection

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


def _synthetic_source(data: DictConfig, seed: int) -> dict[str, Any]:
    """Item i is made from these and its index; it has no root."""
    return {**hub_and_image_column(data, seed), "root": None, "num_classes": data.num_classes,
            "native_size_px": data.native_size_px, "seed": seed}


def _synthetic_images(manifest: dict[str, Any]) -> SyntheticImages:
    data, seed = manifest["data"], int(manifest.get("model", {}).get("seed") or 0)
    return SyntheticImages(int(data["num_items"]), int(data["num_classes"]), int(data["native_size_px"]), seed)


@register_dataset("synthetic", help="clustered random images made on the fly (tests, benchmarks)", needs_root=False,
                  source=_synthetic_source, images=_synthetic_images)
def _synthetic(data: DictConfig, options: LoadOptions) -> ImageCollection:
    from simsearch.data.collections import SyntheticCollection

    return SyntheticCollection(data.num_items, data.num_classes, data.native_size_px, options.seed)


@register_dataset("hf", help="a Hugging Face dataset: data.root= save_to_disk folder, Parquet/Arrow files or imagefolder; "
                               "data.hub=NAME online", splits=(), needs_root=False,
                  source=hub_and_image_column, items_are_files=True)  # an imagefolder is a folder too
def _hf(data: DictConfig, options: LoadOptions) -> ImageCollection:
    from simsearch.data.huggingface import load_hf

    return load_hf(data, options.resize)


def _shard_images(manifest: dict[str, Any]) -> Any:
    """By (shard, key): no listing of every shard first."""
    from simsearch.data.shards import ShardImages, extensions

    return ShardImages(extensions(manifest["data"])[0])


@register_dataset("webdataset", help="WebDataset tar shards: data.urls=shards/train-{000000..000009}.tar (image jpg;png;webp, "
                                       "label cls)", splits=(), needs_root=False, source=hub_and_image_column,
                  images=_shard_images)
def _webdataset(data: DictConfig, options: LoadOptions) -> ImageCollection:
    from simsearch.data.shards import load_webdataset

    return load_webdataset(data, options.resize)


def _benchmark(name: str) -> Callable[[DictConfig, LoadOptions], ImageCollection]:
    def load(data: DictConfig, options: LoadOptions) -> ImageCollection:
        return read_benchmark(name, _root(data), data.split, options.resize, data.download, options.decode_on_device)

    return load


for _name, _help in (("cub200", "CUB-200-2011, official zero-shot split"), ("cars196", "Cars196, official zero-shot split"),
                     ("sop", "Stanford Online Products"), ("inshop", "In-Shop Clothes (query against gallery)")):
    register_dataset(_name, help=_help, splits=BENCHMARK_SPLITS[_name], source=hub_and_image_column,
                     query_gallery=("query", "gallery") if _name == "inshop" else None)(_benchmark(_name))


def dataset_kind(name: str) -> DatasetKind:
    return DATASETS[name]  # an unknown name: one sentence listing the known ones


def refuse_inside_collection(data: DictConfig | dict[str, Any], key: str, path: Path, shown: str) -> None:
    """Refuse `path` (run.dir, a picture) inside a collection of files under data.root: it would become an item of
    the next extraction. A hidden folder there (a name starting with `.`) is never listed, so allowed."""
    name, root = data.get("name"), data.get("root")
    if name not in DATASETS or not DATASETS[name].items_are_files or not root:
        return
    real_root, resolved = Path(root).expanduser().resolve(), path.expanduser().resolve()
    if resolved.is_relative_to(real_root) and not any(part.startswith(".") for part in resolved.relative_to(real_root).parts):
        raise SimsearchError(f"{key}={shown} is inside data.root={root}: it would become an item of the next "
                             "extraction; write it outside the collection (or in a hidden folder, .simsearch)")


def build_collection(data: DictConfig, resize: Resize, seed: int = 0, decode_on_device_by_default: bool = False) -> ImageCollection:
    """The collection a data config names, with `data.limit` applied."""
    from simsearch.data.collections import Subset

    kind = dataset_kind(data.name)
    if kind.splits and data.split not in kind.splits:
        hint = (f" ({data.name} is evaluated as split={kind.query_gallery[0]} against split={kind.query_gallery[1]})"
                if kind.query_gallery else "")
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
