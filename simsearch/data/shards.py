"""WebDataset tar shards as a collection (`data=webdataset`, `data.urls=shards/train-{000000..000099}.tar`).

Shards are listed, not streamed: the tar headers of every shard are read once (`tarfile`, seeking past the
data), members grouped into samples by webdataset's own rule (`base_plus_ext`: the key is the name up to the
first dot of its base name, consecutive members of one key are one sample) and each sample's image member
remembered by (shard, offset, size). Each item is then read by seeking into its shard. That keeps the
collection a map-style dataset like every other: items keyed (resume, incremental extraction), split across
DDP ranks and workers by the same sampler and merged by key, without duplicates or gaps, and thumbnails read
back by (shard, key). webdataset's streaming pipeline (an IterableDataset) has no index to resume from or to
split by; the library is used for what defines the format: URL expansion and the key rule.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image

from simsearch.data.collections import ImageCollection, Resize, prepared_pixels
from simsearch.errors import SimsearchError
from simsearch.pixels import UnreadableImage, decode_image

DEFAULT_IMAGE_EXTENSIONS, DEFAULT_LABEL_EXTENSION = "jpg;png;webp", "cls"
MAX_LABEL_BYTES = 1024  # a label member larger than this is not a label


def import_webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise SimsearchError("data=webdataset needs the webdataset library: pip install 'simsearch[formats]'") from None
    return webdataset


COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


@dataclass(frozen=True)
class Member:
    offset: int  # of the member's data in the shard
    size: int
    data: bytes | None = None  # read while listing: the label member only


def expand_shards(urls: Any) -> list[str]:
    """`data.urls` (a brace pattern, `::`-separated patterns, or a list of them) as a list of shard paths."""
    webdataset = import_webdataset()
    patterns = list(urls) if isinstance(urls, (list, tuple, ListConfig)) else [urls]
    shards = [shard for pattern in patterns for shard in webdataset.shardlists.expand_urls(str(pattern))]
    if not shards:
        raise SimsearchError("data=webdataset needs data.urls: tar shards, e.g. data.urls=shards/train-{000000..000009}.tar")
    return shards


def list_shard(path: Path, read_extension: str | None = None) -> tuple[list[tuple[str, dict[str, Member]]], str | None]:
    """The samples of one shard in order, each (key, {extension: member}), the `read_extension` members' data
    read (labels), and why the listing stopped early (a truncated or damaged shard), if it did."""
    webdataset = import_webdataset()
    with open(path, "rb") as handle:
        if handle.read(4).startswith(COMPRESSED):
            raise SimsearchError(f"shard {path} is compressed: simsearch reads plain .tar shards (it seeks to each "
                                 "image); decompress it (gunzip) first")
    samples: list[tuple[str, dict[str, Member]]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, extension = webdataset.tariterators.base_plus_ext(info.name)
                if key is None:
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                extension = extension.lower()
                data = tar.extractfile(info).read(MAX_LABEL_BYTES) if extension == read_extension else None
                samples[-1][1][extension] = Member(info.offset_data, info.size, data)
            end = tar.offset  # where the end-of-archive marker (two zero blocks) must start
    except (tarfile.TarError, OSError, EOFError) as error:
        return samples, f"damaged shard: {error}"
    if path.stat().st_size < end + 2 * tarfile.BLOCKSIZE:  # tarfile stops quietly at a cut header
        return samples, "damaged shard: truncated (it ends without the end-of-archive marker)"
    return samples, None


def read_member(path: Path, member: Member) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(member.offset)
        data = handle.read(member.size)
    if len(data) != member.size:
        raise UnreadableImage(f"truncated: {len(data)} of {member.size} bytes in the shard")
    return data


def parse_label(data: bytes) -> str | None:
    text = data[:MAX_LABEL_BYTES].decode("utf-8", "replace").strip()
    return text or None


class ShardCollection(ImageCollection):
    """Every sample of the shards with an image (the first of `image_extensions` it has), in shard order."""

    def __init__(self, shards: list[str], resize: Resize, image_extensions: list[str], label_extension: str | None):
        self.resize, self.image_extensions = resize, image_extensions
        self.entries: list[tuple[str, str, Member]] = []  # (shard as given, sample key, image member)
        self.paths: dict[str, Path] = {}
        self.stamps: dict[str, str] = {}  # shard -> size:mtime_ns, part of its items' keys
        self.unlisted = []
        label_texts: list[str | None] = []
        for shard in shards:
            path = Path(shard).expanduser().resolve()
            if not path.is_file():
                raise SimsearchError(f"shard {shard} (from data.urls) does not exist")
            stat = path.stat()
            self.paths[shard], self.stamps[shard] = path, f"{stat.st_size}:{stat.st_mtime_ns}"
            samples, problem = list_shard(path, label_extension)
            if problem:
                self.unlisted.append({"id": shard, "shard": shard, "reason": f"{problem} (samples after this point not read)"})
            seen: set[str] = set()
            for key, members in samples:
                image = next((e for e in image_extensions if e in members), None)
                if image is None or key in seen:
                    reason = "a second sample of this key in the shard" if key in seen else \
                        f"no image member ({';'.join(image_extensions)}; found {';'.join(sorted(members))})"
                    self.unlisted.append({"id": f"{shard}/{key}", "shard": shard, "sample": key, "reason": reason})
                    continue
                seen.add(key)
                self.entries.append((shard, key, members[image]))
                label = members.get(label_extension) if label_extension else None
                label_texts.append(parse_label(label.data) if label is not None and label.data is not None else None)
        self.classes, self.labels = self._classes(label_texts)

    @staticmethod
    def _classes(texts: list[str | None]) -> tuple[list[str], np.ndarray]:
        """Integer labels (webdataset's `cls`) name classes "0", "1", ...; text labels are classes, sorted."""
        known = [t for t in texts if t is not None]
        if known and all(t.isdigit() for t in known):
            classes = [str(i) for i in range(max(map(int, known)) + 1)]
            return classes, np.array([-1 if t is None else int(t) for t in texts], dtype=np.int64)
        classes = sorted(set(known))
        index = {name: i for i, name in enumerate(classes)}
        return classes, np.array([-1 if t is None else index[t] for t in texts], dtype=np.int64)

    def item_record(self, index: int) -> dict[str, Any]:
        """Keyed by the shard's resolved path, size and mtime (a shard rewritten is embedded again) and the
        sample's `__key__`: shards added to or removed from data.urls leave the others' vectors reusable."""
        shard, key, _ = self.entries[index]
        path = str(self.paths[shard])
        return {"id": f"{shard}/{key}", "index": index, "shard": path, "sample": key, "key": f"{path}:{self.stamps[shard]}/{key}"}

    def image(self, index: int) -> Image.Image:
        shard, _, member = self.entries[index]
        return decode_image(io.BytesIO(read_member(self.paths[shard], member)))

    def pixels(self, index: int) -> torch.Tensor:
        return prepared_pixels(self.image(index), self.resize)

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(3, self.resize.size_px, self.resize.size_px, dtype=torch.uint8)


class ShardImages:
    """Thumbnails of a store's WebDataset items, read back by (shard, key): a shard's headers are listed on
    its first use, then each image is one seek and read."""

    def __init__(self, image_extensions: list[str]):
        self.image_extensions = image_extensions
        self.listed: dict[str, dict[str, dict[str, Member]]] = {}

    def image_of_item(self, item: dict[str, Any]) -> Image.Image:
        shard, key = item.get("shard"), item.get("sample")
        if not shard or key is None:
            raise UnreadableImage(f"item {item.get('id')} records no shard and sample key")
        path = Path(shard)
        if shard not in self.listed:
            if not path.is_file():
                raise UnreadableImage(f"shard {shard} was moved or deleted since extraction")
            self.listed[shard] = dict(list_shard(path)[0])
        members = self.listed[shard].get(key, {})
        image = next((e for e in self.image_extensions if e in members), None)
        if image is None:
            raise UnreadableImage(f"sample {key} is no longer in shard {shard}")
        return decode_image(io.BytesIO(read_member(path, members[image])))


def extensions(data: DictConfig | dict[str, Any]) -> tuple[list[str], str | None]:
    """The image extensions tried in turn and the label extension, from `data.image_column`/`label_column`."""
    images = [e.strip().lower() for e in str(data.get("image_column") or DEFAULT_IMAGE_EXTENSIONS).split(";") if e.strip()]
    label = None if data.get("labels") == "none" else str(data.get("label_column") or DEFAULT_LABEL_EXTENSION).lower()
    return images, label


def load_webdataset(data: DictConfig, resize: Resize) -> ShardCollection:
    images, label = extensions(data)
    collection = ShardCollection(expand_shards(data.urls), resize, images, label)
    if len(collection) == 0:
        raise SimsearchError(f"no sample with an image ({';'.join(images)}) in the shards of data.urls={data.urls}")
    return collection
